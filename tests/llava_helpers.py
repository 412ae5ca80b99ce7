"""What the LLaVA-NeXT and LLaVA-OneVision conversion tests share, over their ``source`` fixture (the
dict of `mmcore.convert.testing.convert_saved`): the round trip back to the transformers class, and the
saved conversion rebuilt with nothing passed."""

from __future__ import annotations

import torch

from mmcore.convert.testing import assert_bit_exact, save_and_load


def assert_round_trip_is_bit_exact(source, tmp_path, architecture: str, config_fields) -> None:
    """HF -> mmcore -> HF gives ``architecture`` holding the source's tower and newline; through a saved
    mmcore directory it is bit-exact (weights and ``config_fields``)."""
    from mmcore import MultimodalModel

    hf = source["hf"]
    back = MultimodalModel.from_hf(hf).to_hf()
    assert type(back).__name__ == architecture
    assert (
        back.model.vision_tower is hf.model.vision_tower
        and back.model.image_newline is hf.model.image_newline
    )
    source["mllm"].save_pretrained(tmp_path / "mmcore")
    assert_bit_exact(MultimodalModel.from_pretrained(tmp_path / "mmcore").to_hf(), hf, config_fields)


def assert_saved_conversion_matches(source, tmp_path, prompts, atol: float, **items):
    """The converted model and processor saved to ``tmp_path`` and loaded with nothing passed: the processor
    makes the source batch's ids from ``prompts`` and ``items`` (left-padded) and the model's logits on it
    equal the HF model's on the source batch within ``atol``. Returns the loaded model."""
    mllm, processor = save_and_load(source["mllm"], source["processor"], tmp_path)
    batch = processor(prompts, padding_side="left", **items)
    assert torch.equal(batch["input_ids"], source["batch"]["input_ids"])
    with torch.no_grad():
        logits, expected = mllm(**batch).logits, source["hf"](**source["batch"]).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=atol)
    return mllm
