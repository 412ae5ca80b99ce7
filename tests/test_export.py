"""mmcore to transformers: `to_hf`, ``mmcore export`` and the round trip LLaVA -> mmcore -> LLaVA.

The exported directory is loaded in a subprocess where mmcore and its plugins cannot be imported
(``python -I -S`` with only the interpreter's site-packages on the path, not the .pth files that make
the editable mmcore importable); its logits must equal the mmcore model's.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from plugin_marks import needs_plugins
from typer.testing import CliRunner

pytestmark = needs_plugins("clip", "siglip")

ATOL = 1e-5
#: LlavaConfig fields that decide what the model computes or how its inputs are made.
CONFIG_FIELDS = (
    "image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
    "multimodal_projector_bias", "image_seq_length", "tie_word_embeddings",
)  # fmt: skip


def run_cli(*args):
    from mmcore.cli import app as cli_app

    return CliRunner().invoke(cli_app.build_app(), [str(a) for a in args])


def assembled_model(projector: str = "mlp2x_gelu"):
    """An mmcore-native model (the clip plugin's tiny tower + a tiny llama), with its processor."""
    from mmcore import MultimodalModel, build_encoder
    from mmcore.modeling.tokens import add_modality_tokens
    from mmcore.processing import MultimodalProcessor
    from mmcore.testing import tiny_llm, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    mllm = MultimodalModel(
        encoders={"vision": build_encoder("clip", preset="tiny")},
        language_model=tiny_llm(vocab_size=len(tokenizer)),
        init_projector_type=projector,
    )
    add_modality_tokens(tokenizer, mllm)
    return mllm.eval(), MultimodalProcessor.from_model(mllm, tokenizer)


# -- round trip --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_llava_to_mmcore_to_llava_is_bit_exact(tower, tmp_path):
    from mmcore import MultimodalModel
    from mmcore.convert import convert_pretrained, from_hf, to_hf
    from mmcore.convert.testing import assert_bit_exact, tiny_llava

    llava, processor = tiny_llava(tower)
    # In memory: the same modules come back.
    back = to_hf(from_hf(llava))
    assert back.model.vision_tower is llava.model.vision_tower
    assert MultimodalModel.from_hf(llava).to_hf().model.vision_tower is llava.model.vision_tower
    assert back.model.language_model is llava.model.language_model and back.lm_head is llava.lm_head
    # Through both directories (LLaVA's, then the converted one's): the same tensors and config.
    llava.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    converted = convert_pretrained(tmp_path / "llava")
    converted.model.save_pretrained(tmp_path / "mmcore")
    again = MultimodalModel.from_pretrained(tmp_path / "mmcore").to_hf()  # the method, as users call it
    assert_bit_exact(again, llava, CONFIG_FIELDS)
    for sub in ("vision_config", "text_config"):
        ours, theirs = getattr(again.config, sub).to_diff_dict(), getattr(llava.config, sub).to_diff_dict()
        for key in ("architectures", "_name_or_path", "transformers_version", "dtype"):
            ours.pop(key, None), theirs.pop(key, None)
        assert ours == theirs, sub


# -- what has no transformers counterpart ----------------------------------------------------------------------
def _two_encoders():
    from mmcore.testing import tiny_multimodal_model

    return tiny_multimodal_model()[0]


def _resampler():
    return assembled_model("resampler")[0]


def _unknown_callback():
    from mmcore.callbacks import DropPrefixTokens

    mllm = assembled_model()[0]
    mllm.encoders["vision"].postprocess_projector_callback = DropPrefixTokens(1)
    return mllm


def _timm_tower():
    if importlib.util.find_spec("mmcore_plugin_eva02") is None:
        pytest.skip("needs mmcore-plugin-eva02")
    from mmcore import MultimodalModel, build_encoder
    from mmcore.testing import tiny_llm

    mllm = MultimodalModel(
        encoders={"vision": build_encoder("eva02", preset="tiny")}, language_model=tiny_llm(),
        init_projector_type="mlp2x_gelu",
    )  # fmt: skip
    mllm.set_modality_token_ids({"vision": 5})
    return mllm


def _lora():
    from mmcore.training import add_lora

    mllm = assembled_model()[0]
    add_lora(mllm, r=2)
    return mllm


@pytest.mark.parametrize(
    "build, needle",
    [
        (_two_encoders, "2 encoders (vision, audio)"),
        (_resampler, "its projector (resampler) has no LLaVA counterpart"),
        (_unknown_callback, "its postprocess_projector callback DropPrefixTokens(num_tokens=1)"),
        (_timm_tower, "timm."),
        (_lora, "merge the adapters first"),
    ],
    ids=["two-encoders", "resampler", "callback", "timm-tower", "peft-llm"],
)
def test_to_hf_names_the_part_without_a_counterpart(build, needle):
    from mmcore.convert import NoTransformersCounterpartError, to_hf

    with pytest.raises(NoTransformersCounterpartError) as info:
        to_hf(build())
    assert needle in str(info.value)


# -- mmcore export -----------------------------------------------------------------------------------------------
def test_export_loads_without_mmcore_and_gives_equal_logits(tmp_path):
    from mmcore.convert.testing import export_with_cli, load_without_mmcore

    mllm, processor = assembled_model()
    out, report = export_with_cli(mllm, processor, tmp_path)
    assert report["architectures"] == ["LlavaForConditionalGeneration"]
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json",
            "tokenizer.json", "chat_template.jinja"} <= files  # fmt: skip
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"

    messages = ('[[{"role": "user", "content": token + " what is in the image ?"}], [{"role": "user", "content": "hi " + token}]]')
    loaded = load_without_mmcore(
        out, tmp_path, image_sizes=[(30, 40), (50, 20)],
        texts=f"[processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in {messages}]",
    )  # fmt: skip
    assert loaded["class"] == "LlavaForConditionalGeneration"
    batch = loaded["batch"]
    assert batch["attention_mask"][:, 0].tolist() == [1, 0]  # left-padded
    # The exported processor makes what mmcore's makes; the exported model computes what mmcore's does.
    ours = processor(loaded["texts"], vision=[[im] for im in images()], padding_side="left")
    assert torch.equal(ours["input_ids"], batch["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], batch["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = mllm(**batch).logits
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=ATOL)


def images():
    from mmcore.convert.testing import random_images

    return random_images(((30, 40), (50, 20)))


def test_export_refuses_a_model_without_a_counterpart_in_one_line(tmp_path):
    mllm, processor = assembled_model("resampler")
    mllm.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    result = run_cli("export", tmp_path / "model", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "resampler" in lines[0]
    assert not (tmp_path / "out").exists()


def test_merge_lora_then_export_keeps_processor_and_chat_template(tmp_path):
    from mmcore import MultimodalModel
    from mmcore.convert.export import export_hf
    from mmcore.training import add_lora, merge_lora

    mllm, processor = assembled_model()
    add_lora(mllm, r=2)
    mllm.save_pretrained(tmp_path / "lora")
    processor.save_pretrained(tmp_path / "lora")
    merged = merge_lora(MultimodalModel.from_pretrained(tmp_path / "lora")).eval()
    from mmcore.processing import MultimodalProcessor

    export_hf(merged, MultimodalProcessor.from_pretrained(tmp_path / "lora", merged), tmp_path / "out")
    from transformers import AutoProcessor

    exported = AutoProcessor.from_pretrained(tmp_path / "out")
    assert exported.chat_template == processor.tokenizer.chat_template
    assert exported.image_token == "<vision>"
