"""Converting a transformers LLaVA into mmcore: `from_hf`, `from_pretrained_multimodal_model`, ``mmcore convert``.

Each source is a tiny random ``LlavaForConditionalGeneration`` (CLIP or SigLIP tower + llama) saved
with its ``LlavaProcessor`` into a directory and converted through the real loading code, offline.
The conversion must give LLaVA's logits (fp32, atol 1e-5) and greedy generations on a left-padded
batch of 2 made by the HF processor, hold LLaVA's own modules (no weight copied), rebuild from its
saved directory with no module passed, and its processor must make the HF processor's input ids.
"""

from __future__ import annotations

import json

import pytest
import torch
from plugin_marks import needs_plugins
from typer.testing import CliRunner

from mmcore.convert.testing import random_images

pytestmark = needs_plugins("clip", "siglip")

ATOL = 1e-5
PROMPTS = ["<image> what is in the image ?", "hello <image>"]


def images():
    return random_images(((30, 40), (50, 20)))


@pytest.fixture(scope="module", params=["clip", "siglip"])
def source(request, tmp_path_factory):
    """A saved tiny LLaVA directory, LLaVA loaded back from it, its processor's batch and the conversion
    (Cornstarch's call, on the class: mmcore.convert.from_pretrained_multimodal_model is the same)."""
    from mmcore.convert.testing import convert_saved, tiny_llava

    llava, processor = tiny_llava(request.param)
    path = tmp_path_factory.mktemp(f"llava-{request.param}")
    converted = convert_saved(llava, processor, path, text=PROMPTS, images=images())
    # Left-padded, images at different positions: the comparison covers both.
    assert converted["batch"]["attention_mask"][:, 0].tolist() == [1, 0]
    return {"tower": request.param, **converted}


@torch.no_grad()
def test_logits_match_llava(source):
    hf, mllm, batch = source["hf"], source["mllm"], source["batch"]
    expected = hf(**batch).logits
    torch.testing.assert_close(mllm(**batch).logits, expected, rtol=0, atol=ATOL)
    # The image matters, so the comparison can fail.
    no_image = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(no_image, expected, atol=1e-3)


@torch.no_grad()
def test_greedy_generation_matches_llava(source):
    hf, mllm, batch = source["hf"], source["mllm"], source["batch"]
    tokenizer = source["hf_processor"].tokenizer
    kwargs = dict(do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    expected = hf.generate(**batch, **kwargs)
    assert expected.shape[1] == batch["input_ids"].shape[1] + 8
    assert mllm.generate(**batch, **kwargs).tolist() == expected.tolist()


def test_parts_are_the_plugin_encoder_llavas_projector_and_image_token(source):
    from mmcore.callbacks import SelectFeatureLayer

    mllm, hf = source["mllm"], source["hf"]
    assert list(mllm.encoders) == ["image"]
    encoder = mllm.encoders["image"]
    assert encoder.source["kind"] == "plugin" and encoder.source["encoder"] == f"{source['tower']}:{source['tower']}"
    assert encoder.source["recipe"]["checkpoint"] == str(source["path"])
    drop = 1 if source["tower"] == "clip" else 0  # strategy "default" drops CLS; SigLIP's is "full"
    assert encoder.postprocess_module_callback == SelectFeatureLayer(layer=-2, drop_prefix_tokens=drop)
    assert encoder.projector.config.projector_type == "mlp2x_gelu"
    assert mllm.modality_token_ids == {"image": hf.config.image_token_index}
    assert hf.config.image_token_index < mllm.get_input_embeddings().num_embeddings  # kept in the vocabulary
    # The recipe carries the checkpoint's image processor, so the saved directory rebuilds it.
    recipe_processor = encoder.source["recipe"]["processor"]
    assert recipe_processor["size"] == source["hf_processor"].image_processor.size


def test_from_hf_shares_llavas_modules_and_copies_no_weight():
    from mmcore.convert import from_hf
    from mmcore.convert.testing import tiny_llava

    llava, _ = tiny_llava("clip")
    before = {k: v.clone() for k, v in llava.state_dict().items()}
    mllm = from_hf(llava)
    encoder = mllm.encoders["image"]
    assert encoder.module is llava.model.vision_tower
    assert encoder.projector.projection[0] is llava.model.multi_modal_projector.linear_1
    assert encoder.projector.projection[2] is llava.model.multi_modal_projector.linear_2
    assert mllm.language_model.model is llava.model.language_model  # the LLM is shared, not copied
    assert mllm.get_output_embeddings() is llava.lm_head
    llava_storage = {t.untyped_storage().data_ptr() for t in llava.state_dict().values()}
    assert {t.untyped_storage().data_ptr() for t in mllm.state_dict().values()} <= llava_storage
    for key, value in llava.state_dict().items():  # converting initialised nothing
        assert torch.equal(value, before[key]), key


def test_processor_makes_the_hf_processors_ids_with_the_chat_template(source):
    processor, batch = source["processor"], source["batch"]
    ours = processor(PROMPTS, image=[[im] for im in images()], padding_side="left")
    assert torch.equal(ours["input_ids"], batch["input_ids"])
    assert torch.equal(ours["attention_mask"], batch["attention_mask"])
    torch.testing.assert_close(ours["pixel_values"], batch["pixel_values"], rtol=0, atol=1e-6)
    assert processor.tokenizer.chat_template == source["hf_processor"].chat_template
    messages = [{"role": "user", "content": "<image> describe"}]
    assert processor.apply_chat_template(messages, tokenize=False) == source["hf_processor"].apply_chat_template(
        messages, tokenize=False
    )


@torch.no_grad()
def test_saved_conversion_rebuilds_with_no_module_passed(source, tmp_path):
    from mmcore import MultimodalModel
    from mmcore.processing import MultimodalProcessor

    source["mllm"].save_pretrained(tmp_path)
    source["processor"].save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["encoders"]["image"]
    assert record["source"]["kind"] == "plugin"
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()
    batch = source["batch"]
    torch.testing.assert_close(loaded(**batch).logits, source["hf"](**batch).logits, rtol=0, atol=ATOL)
    reloaded = MultimodalProcessor.from_pretrained(tmp_path, loaded)
    ids = reloaded(PROMPTS, image=[[im] for im in images()], padding_side="left")["input_ids"]
    assert torch.equal(ids, batch["input_ids"])


def test_dry_run_builds_on_meta_without_reading_weights(source, tmp_path):
    import shutil

    from mmcore.convert import convert_pretrained

    copy = tmp_path / "no-weights"
    shutil.copytree(source["path"], copy)
    (copy / "model.safetensors").unlink()  # nothing to read: a dry run must not need it
    converted = convert_pretrained(copy, device="meta")
    assert all(p.is_meta for p in converted.model.parameters())
    assert converted.model.modality_token_ids == source["mllm"].modality_token_ids


# -- errors ------------------------------------------------------------------------------------------------
def test_unknown_model_type_names_it_and_the_known_families(tmp_path):
    import re

    from transformers import AutoConfig, LlamaConfig

    from mmcore.convert import MISSING, UnknownFamilyError, convert_pretrained, from_hf
    from mmcore.testing import tiny_llm

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnknownFamilyError, match=r"model_type 'llama'.*families mmcore converts: llava, llava_next"):
        convert_pretrained(tmp_path / "llama")
    for model_type, why in MISSING.items():  # a family transformers has and mmcore does not yet
        AutoConfig.for_model(model_type).save_pretrained(tmp_path / model_type)
        with pytest.raises(UnknownFamilyError, match=rf"'{model_type}' is not converted yet \({re.escape(why[:20])}"):
            convert_pretrained(tmp_path / model_type)
        break
    with pytest.raises(UnknownFamilyError, match=r"model_type 'llama'"):
        from_hf(tiny_llm())


def test_siglip_with_default_strategy_is_refused():
    from mmcore.convert import from_hf
    from mmcore.convert.testing import tiny_llava
    from mmcore.errors import ConfigError

    llava, _ = tiny_llava("siglip")
    llava.config.vision_feature_select_strategy = "default"
    with pytest.raises(ConfigError, match="SigLIP tower with vision_feature_select_strategy='default'"):
        from_hf(llava)


# -- the command line ----------------------------------------------------------------------------------------
def run_cli(*args):
    from mmcore.cli import app as cli_app

    return CliRunner().invoke(cli_app.build_app(), [str(a) for a in args])


def test_cli_convert_writes_an_mmcore_directory(source, tmp_path):
    if source["tower"] != "clip":
        pytest.skip("one tower is enough for the command line")
    from mmcore import MultimodalModel

    out = tmp_path / "converted"
    result = run_cli("convert", source["path"], "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["family"] == "llava" and report["processor"] is True
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    loaded = MultimodalModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**source["batch"]).logits, source["hf"](**source["batch"]).logits, rtol=0, atol=ATOL)

    dry = run_cli("convert", source["path"], "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["total_params"] == report["total_params"]

    again = run_cli("convert", source["path"], "-o", out)  # exists, no --overwrite
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_cli_convert_unknown_source_is_one_line_exit_2(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path / "llama")
    result = run_cli("convert", tmp_path / "llama", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "'llama'" in lines[0] and "llava" in lines[0]
    assert not (tmp_path / "out").exists()
