"""Cornstarch's `MultimodalProcessor` and OmniLMM's ``initialize_vision_tokenizer``, as their users
write them, on mmcore (import line changed: ``cornstarch.models.multimodal_language_model`` ->
``mmcore``): ``predefined_tokens``, ``num_feature_calculation_funcs`` called with the processor's
inputs and outputs, default token counts for the HF image processors transformers knows (checked
against transformers' own counting and the real encoders' outputs), and extra special tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcore import ModalEncoderModule, MultimodalModel
from mmcore.errors import ConfigError, TokenIdError
from mmcore.modeling.tokens import add_modality_tokens
from mmcore.testing import tiny_llm, tiny_tokenizer, tiny_whisper_encoder

OMNILMM_EXTRA = ["<box>", "</box>", "<ref>", "</ref>", "<quad>", "</quad>"]


# -- OmniLMM: initialize_vision_tokenizer's extra special tokens -----------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: tied input/output embeddings
def test_add_modality_tokens_adds_omnilmm_extra_tokens_mean_initialised(family):
    tok = tiny_tokenizer()
    llm = tiny_llm(family, vocab_size=len(tok))
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    old_in = llm.get_input_embeddings().weight.detach().clone()
    old_out = llm.get_output_embeddings().weight.detach().clone()
    model = MultimodalModel(encoders={"vision": ModalEncoderModule(tiny_whisper_encoder())}, language_model=llm)

    added = add_modality_tokens(tok, model, wrap=True, extra_tokens=OMNILMM_EXTRA)

    assert dict(added) == model.config.modality_token_ids == {"vision": tok.convert_tokens_to_ids("<vision>")}
    assert added.wrap == {"vision": tuple(tok.convert_tokens_to_ids(["<vision_start>", "<vision_end>"]))}
    assert added.extra == {t: tok.convert_tokens_to_ids(t) for t in OMNILMM_EXTRA}
    assert model.config.extra_token_ids == added.extra
    # every token is new: the new ids are all nine, the rows past the old vocabulary
    assert added.new_ids == added.all_ids == list(range(old_in.shape[0], old_in.shape[0] + 9))
    assert tok.tokenize("<ref>a cat</ref><box>1 2 3 4</box>").count("<box>") == 1  # special: never split
    new_in, new_out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert torch.equal(new_in[: old_in.shape[0]], old_in)
    for row in added.new_ids:
        assert torch.allclose(new_in[row], old_in.mean(0), atol=1e-6)
        assert torch.allclose(new_out[row], old_out.mean(0), atol=1e-6)
    assert (llm.get_output_embeddings().weight is llm.get_input_embeddings().weight) == tied


def test_add_modality_tokens_new_ids_are_only_the_rows_it_created(tmp_path):
    from mmcore.training.token_rows import new_token_ids

    tok = tiny_tokenizer()
    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_whisper_encoder())}, language_model=tiny_llm(vocab_size=len(tok))
    )
    first = add_modality_tokens(tok, model)
    again = add_modality_tokens(tok, model, extra_tokens=["<box>", "</box>"])
    assert first.new_ids == [first["vision"]]
    assert again.new_ids == sorted(again.extra.values())  # <vision> existed already: not new
    # the training stage's "train only the new rows" finds every token mmcore added, from the config
    assert new_token_ids(model) == sorted([first["vision"], *again.extra.values()])
    model.save_pretrained(tmp_path)
    assert MultimodalModel.from_pretrained(tmp_path).config.extra_token_ids == again.extra


def test_add_modality_tokens_refuses_an_extra_token_that_is_a_placeholder():
    tok = tiny_tokenizer()
    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_whisper_encoder())}, language_model=tiny_llm(vocab_size=len(tok))
    )
    with pytest.raises(TokenIdError, match="already modality placeholder"):
        add_modality_tokens(tok, model, extra_tokens=["<vision>"])


# -- Cornstarch: predefined_tokens ------------------------------------------------------------------------------
class _Images:
    """(3, h, w) images -> ``pixel_values`` at 28 px (the tiny CLIP tower's size)."""

    def __call__(self, items):
        return {
            "pixel_values": torch.stack(
                [
                    torch.nn.functional.interpolate(torch.as_tensor(np.asarray(i), dtype=torch.float32)[None], size=28)[0]
                    for i in items
                ]
            )
        }


def test_predefined_tokens_use_the_data_sets_own_placeholder_and_survive_save_load(tmp_path):
    from mmcore import MultimodalProcessor
    from mmcore.testing import tiny_multimodal_model

    model, tokenizer = tiny_multimodal_model()
    image = np.full((3, 28, 28), 0.5, dtype=np.float32)
    processor = MultimodalProcessor(
        encoder_processors={"vision": _Images()},
        llm_tokenizer=tokenizer,
        model=model,
        num_feature_calculation_funcs={"vision": lambda items, processed: [4] * len(items)},
        predefined_tokens={"vision": "<image>"},
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert processor.token_ids["vision"] == model.config.modality_token_ids["vision"] == image_id
    assert tokenizer.tokenize("a<image>b").count("<image>") == 1  # special: never split
    batch = processor("<image> what is this?", vision=[image])
    assert batch["input_ids"][0].tolist().count(image_id) == 4
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what?"}]}]
    assert processor(messages=parts, vision=[image])["input_ids"][0].tolist().count(image_id) == 4
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**batch, labels=batch["input_ids"]).loss)

    processor.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(
        tmp_path, model, encoder_processors={"vision": _Images()},
        num_feature_calculation_funcs={"vision": lambda items, processed: [4] * len(items)},
    )  # fmt: skip
    assert again.tokens["vision"] == "<image>" and again.token_ids["vision"] == image_id
    assert len(again.tokenizer) == len(tokenizer)  # nothing added a second time


@pytest.mark.parametrize(
    "tokens, message",
    [
        ({"audio": "<audio>"}, r"predefined_tokens for \['audio'\]"),
        ({"vision": ""}, "non-empty string"),
    ],
)
def test_predefined_tokens_that_cannot_work_are_config_errors(tokens, message):
    from mmcore import MultimodalProcessor
    from mmcore.testing import tiny_multimodal_model

    model, tokenizer = tiny_multimodal_model()
    with pytest.raises(ConfigError, match=message):
        MultimodalProcessor({"vision": _Images()}, tokenizer, model, {"vision": lambda i, o: [4] * len(i)}, tokens)


# -- Cornstarch: num_feature_calculation_funcs as Cornstarch calls them, and default counts ---------------------
def test_a_count_function_in_cornstarchs_form_reads_inputs_and_outputs():
    from mmcore import MultimodalProcessor
    from mmcore.testing import tiny_multimodal_model

    model, tokenizer = tiny_multimodal_model()
    seen = {}

    def cornstarch_count(inputs, outputs):  # inputs: {"images": [...]}, outputs: the processor's result
        seen.update(images=len(inputs["images"]), pixels=tuple(outputs["pixel_values"].shape))
        return [4] * len(inputs["images"])

    processor = MultimodalProcessor({"vision": _Images()}, tokenizer, model, {"vision": cornstarch_count})
    image = np.zeros((3, 28, 28), dtype=np.float32)
    batch = processor("<vision><vision> two", vision=[image, image])
    assert seen == {"images": 2, "pixels": (2, 3, 28, 28)}
    assert batch["input_ids"][0].tolist().count(processor.token_ids["vision"]) == 8


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_a_transformers_image_processor_needs_no_count_function(tower, tmp_path):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from mmcore import MultimodalProcessor
    from mmcore.callbacks import SelectFeatureLayer
    from mmcore.processing import FixedCount
    from mmcore.testing import tiny_clip_vision, tiny_siglip_vision

    tok = tiny_tokenizer()
    if tower == "clip":  # LLaVA's selection: CLS dropped, 4 patches
        encoder = ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=SelectFeatureLayer(-2, 1))
        image_processor, expected = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=28), 4
    else:
        encoder = ModalEncoderModule(tiny_siglip_vision())
        image_processor, expected = SiglipImageProcessor(size={"height": 28, "width": 28}), 4
    model = MultimodalModel({"vision": encoder}, tiny_llm(vocab_size=len(tok)))
    add_modality_tokens(tok, model)
    processor = MultimodalProcessor({"vision": image_processor}, tok, model)
    assert isinstance(processor._counters["vision"], FixedCount) and processor._counters["vision"].n == expected
    from PIL import Image

    batch = processor("<vision> what?", vision=[Image.new("RGB", (90, 30), "red")])
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]  # the merge found every feature
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)  # nothing passed again
    assert torch.equal(again("<vision> what?", vision=[Image.new("RGB", (90, 30), "red")])["input_ids"], batch["input_ids"])
