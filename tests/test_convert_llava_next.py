"""LLaVA-NeXT in and out: a transformers LlavaNextForConditionalGeneration directory converts to an
mmcore model sharing its modules (equal logits and greedy generations on a left-padded batch of two
aspect ratios, the processor's ids equal), and back (LLaVA-NeXT -> mmcore -> LLaVA-NeXT bit-exact;
``mmcore export`` loads with no mmcore importable and gives equal logits)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mmcore_plugin_clip", "mmcore_plugin_siglip")),
    reason="needs mmcore-plugin-clip and mmcore-plugin-siglip installed (make test puts them on the path)",
)

ATOL = 1e-5
PROMPTS = ["user: <image> what is this? assistant:", "user: describe <image> please assistant:"]
#: LlavaNextConfig fields that decide what the model computes or how its inputs are made.
CONFIG_FIELDS = (
    "image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
    "multimodal_projector_bias", "image_grid_pinpoints", "tie_word_embeddings",
)  # fmt: skip


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 70), (64, 40))]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def source(request, tmp_path_factory):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mmcore import MultimodalModel
    from mmcore.convert.testing import tiny_llava_next

    hf, processor = tiny_llava_next(request.param)
    path = tmp_path_factory.mktemp(f"llava-next-{request.param}")
    hf.save_pretrained(path)
    processor.save_pretrained(path)
    hf = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    hf_processor = AutoProcessor.from_pretrained(path)
    hf_processor.tokenizer.padding_side = "left"
    batch = dict(hf_processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True))
    mllm, processor = MultimodalModel.from_pretrained_multimodal_model(path, return_processor=True)
    return {"path": path, "hf": hf, "hf_processor": hf_processor, "batch": batch, "mllm": mllm.eval(),
            "processor": processor}  # fmt: skip


@torch.no_grad()
def test_logits_and_greedy_generations_equal_llava_next(source):
    hf, mllm, batch = source["hf"], source["mllm"], source["batch"]
    torch.testing.assert_close(mllm(**batch).logits, hf(**batch).logits, rtol=0, atol=ATOL)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert mllm.generate(**batch, **kwargs).tolist() == hf.generate(**batch, **kwargs).tolist()


def test_the_conversion_holds_the_checkpoints_modules(source):
    from mmcore import MultimodalModel
    from mmcore.builtin.anyres import AnyResFlatten, AnyResPack

    hf = source["hf"]
    mllm = MultimodalModel.from_hf(hf)  # in memory
    encoder = mllm.encoders["image"]
    assert encoder.module is hf.model.vision_tower
    assert isinstance(encoder.preprocess_callback, AnyResFlatten)
    assert isinstance(encoder.postprocess_projector_callback, AnyResPack)
    assert encoder.postprocess_projector_callback.image_newline is hf.model.image_newline
    assert mllm.language_model.model is hf.model.language_model
    assert mllm.config.modality_token_ids == {"image": hf.config.image_token_index}


def test_processor_makes_the_hf_processors_batch(source):
    ours = source["processor"](PROMPTS, image=images(), padding_side="left")
    batch = source["batch"]
    for key in ("input_ids", "attention_mask", "image_sizes"):
        assert torch.equal(ours[key], batch[key]), key
    torch.testing.assert_close(ours["pixel_values"], batch["pixel_values"], rtol=0, atol=0)


@torch.no_grad()
def test_saved_conversion_rebuilds_model_and_processor_with_nothing_passed(source, tmp_path):
    from mmcore import MultimodalModel
    from mmcore.processing import MultimodalProcessor

    source["mllm"].save_pretrained(tmp_path)
    source["processor"].save_pretrained(tmp_path)
    mllm = MultimodalModel.from_pretrained(tmp_path).eval()
    processor = MultimodalProcessor.from_pretrained(tmp_path)
    batch = processor(PROMPTS, image=images(), padding_side="left")
    assert torch.equal(batch["input_ids"], source["batch"]["input_ids"])
    torch.testing.assert_close(mllm(**batch).logits, source["hf"](**source["batch"]).logits, rtol=0, atol=ATOL)


def test_llava_next_to_mmcore_to_llava_next_is_bit_exact(source, tmp_path):
    from mmcore import MultimodalModel

    hf = source["hf"]
    back = MultimodalModel.from_hf(hf).to_hf()
    assert type(back).__name__ == "LlavaNextForConditionalGeneration"
    assert back.model.vision_tower is hf.model.vision_tower and back.model.image_newline is hf.model.image_newline
    source["mllm"].save_pretrained(tmp_path / "mmcore")
    again = MultimodalModel.from_pretrained(tmp_path / "mmcore").to_hf()
    expected, got = hf.state_dict(), again.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    for field in CONFIG_FIELDS:
        assert getattr(again.config, field) == getattr(hf.config, field), field


def test_export_loads_without_mmcore_and_gives_equal_logits(source, tmp_path):
    from typer.testing import CliRunner

    from mmcore.cli import app as cli_app

    model_dir, out = tmp_path / "model", tmp_path / "exported"
    source["mllm"].save_pretrained(model_dir)
    source["processor"].save_pretrained(model_dir)
    result = CliRunner().invoke(cli_app.build_app(), ["export", str(model_dir), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["architectures"] == ["LlavaNextForConditionalGeneration"]
    from mmcore.convert.testing import load_without_mmcore

    loaded = load_without_mmcore(out, tmp_path, image_sizes=[(30, 70), (64, 40)], texts=repr(PROMPTS))
    assert (loaded["class"], loaded["processor"]) == ("LlavaNextForConditionalGeneration", "LlavaNextProcessor")
    assert torch.equal(loaded["batch"]["input_ids"], source["batch"]["input_ids"])
    with torch.no_grad():
        expected = source["mllm"](**loaded["batch"]).logits
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=ATOL)
