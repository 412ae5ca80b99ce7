"""LLaVA-NeXT any-resolution tiling (anyres) on mmcore equals transformers' LlavaNextForConditionalGeneration.

The mmcore model is assembled from the same tiny parts (tower, projector Linears, image_newline,
decoder, head: shared, not copied): `anyres_encoder` (AnyResFlatten, LLaVA-NeXT's feature selection,
AnyResPack), and is compared on a left-padded batch of 2 with images of different aspect ratios, as
LlavaNextProcessor makes it: logits (fp32, atol 1e-5) and greedy generations. CLIP + Mistral with the
``default`` strategy, SigLIP + Llama with ``full``, as in the Cornstarch document's example.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore import MultimodalModel
from mmcore.builtin.anyres import AnyResFlatten, AnyResPack, AnyResTokenCount, anyres_encoder
from mmcore.convert.testing import tiny_llava_next
from mmcore.errors import ConfigError, EncoderInputError
from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig

TILE, PATCH = 28, 14  # 2x2 tokens per tile
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]  # as tiny_llava_next's
PROMPTS = ["user: <image> what is this? assistant:", "user: describe <image> please assistant:"]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 70), (64, 40))]


def mmcore_twin(hf):
    """The mmcore model holding ``hf``'s own modules, assembled with mmcore's public parts."""
    from transformers import AutoModelForCausalLM

    config = hf.config
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config.text_config)
    llm.model, llm.lm_head = hf.model.language_model, hf.lm_head
    hf_projector = hf.model.multi_modal_projector
    with torch.device("meta"):
        projector = MultimodalProjector(
            MultimodalProjectorConfig(projector_type="mlp2x_gelu", in_features=24, out_features=32)
        )
    projector.projection[0], projector.projection[2] = hf_projector.linear_1, hf_projector.linear_2
    encoder = anyres_encoder(
        hf.model.vision_tower, projector, grid_pinpoints=config.image_grid_pinpoints, hidden_size=32,
        feature_layer=config.vision_feature_layer, strategy=config.vision_feature_select_strategy,
    )  # fmt: skip
    encoder.postprocess_projector_callback.image_newline = hf.model.image_newline
    mllm = MultimodalModel(encoders={"vision": encoder}, language_model=llm)
    mllm.set_modality_token_ids({"vision": config.image_token_index})
    return mllm.eval()


@pytest.fixture(scope="module", params=["clip", "siglip"])
def pair(request):
    hf, processor = tiny_llava_next(request.param)
    processor.tokenizer.padding_side = "left"
    batch = dict(processor(text=PROMPTS, images=_images(), return_tensors="pt", padding=True))
    assert batch["attention_mask"][:, 0].tolist() == [1, 0] or batch["attention_mask"][:, 0].tolist() == [0, 1]
    return hf, mmcore_twin(hf), processor, batch


@torch.no_grad()
def test_logits_equal_llava_next_for_a_left_padded_batch_of_two_aspect_ratios(pair):
    hf, mllm, _, batch = pair
    assert batch["pixel_values"].dim() == 5 and batch["image_sizes"].tolist() == [[30, 70], [64, 40]]
    expected = hf(**batch).logits
    got = mllm(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_greedy_generation_equals_llava_next(pair):
    hf, mllm, processor, batch = pair
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert mllm.generate(**batch, **kwargs).tolist() == hf.generate(**batch, **kwargs).tolist()


def test_processor_counts_each_images_tokens_as_llava_next_does(pair):
    from mmcore.processing import MultimodalProcessor

    hf, mllm, processor, batch = pair
    config = hf.config
    ours = MultimodalProcessor(
        {"vision": processor.image_processor},
        processor.tokenizer,
        mllm,
        {"vision": AnyResTokenCount(config.image_grid_pinpoints, TILE, PATCH)},
        predefined_tokens={"vision": "<image>"},
        padding_side="left",
    )
    got = ours(PROMPTS, vision=_images())
    assert torch.equal(got["input_ids"], batch["input_ids"])
    assert torch.equal(got["attention_mask"], batch["attention_mask"])
    assert torch.equal(got["image_sizes"], batch["image_sizes"])
    torch.testing.assert_close(got["pixel_values"], batch["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():  # and what the model yields per image is exactly that count
        packed = mllm.encoders["vision"](pixel_values=got["pixel_values"], image_sizes=got["image_sizes"])
    counts = AnyResTokenCount(config.image_grid_pinpoints, TILE, PATCH)({}, dict(got))
    assert [f.shape[0] for f in packed] == counts
    assert len(set(counts)) == 2  # the two aspect ratios cost different numbers of tokens


@torch.no_grad()
def test_saved_anyres_model_reloads_with_its_image_newline(pair, tmp_path):
    hf, mllm, _, batch = pair
    mllm.save_pretrained(tmp_path)
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()
    pack = loaded.encoders["vision"].postprocess_projector_callback
    assert isinstance(pack, AnyResPack) and isinstance(loaded.encoders["vision"].preprocess_callback, AnyResFlatten)
    assert torch.equal(pack.image_newline, hf.model.image_newline)
    torch.testing.assert_close(loaded(**batch).logits, hf(**batch).logits, rtol=0, atol=1e-5)


def test_image_newline_trains_with_the_projector():
    from mmcore.training import apply_stage

    hf, _ = tiny_llava_next("clip")
    mllm = mmcore_twin(hf)
    apply_stage(mllm, "align")
    pack = mllm.encoders["vision"].postprocess_projector_callback
    assert pack.image_newline.requires_grad
    assert not any(p.requires_grad for p in mllm.encoders["vision"].module.parameters())


def test_anyres_errors_name_what_is_missing():
    with pytest.raises(ConfigError, match="grid_pinpoints"):
        AnyResFlatten([[28]], TILE)
    pack = AnyResPack(PINPOINTS, TILE, PATCH, 32)
    with pytest.raises(EncoderInputError, match="additional_args=\\['image_sizes'\\]"):
        pack({}, (torch.zeros(3, 4, 32),))
    with pytest.raises(EncoderInputError, match="make 3 tiles but the tower gave features for 2"):
        pack({"image_sizes": torch.tensor([[20, 50]])}, (torch.zeros(2, 4, 32),))


def test_processor_with_the_anyres_count_saves_and_reloads_without_passing_it_again(pair, tmp_path):
    from mmcore.processing import MultimodalProcessor

    hf, mllm, processor, batch = pair
    ours = MultimodalProcessor(
        {"vision": processor.image_processor}, processor.tokenizer, mllm,
        {"vision": AnyResTokenCount(hf.config.image_grid_pinpoints, TILE, PATCH)},
        predefined_tokens={"vision": "<image>"}, padding_side="left",
    )  # fmt: skip
    mllm.save_pretrained(tmp_path)
    ours.save_pretrained(tmp_path)
    again = MultimodalProcessor.from_pretrained(tmp_path)
    assert torch.equal(again(PROMPTS, vision=_images())["input_ids"], batch["input_ids"])


@torch.no_grad()
def test_the_cornstarch_documents_form_with_hfs_own_pack_image_features(pair):
    """A user's own callbacks around transformers' ``pack_image_features`` (the Cornstarch document's
    LLaVA-NeXT example, its import line changed) give LlavaNext's logits too."""
    from transformers.modeling_outputs import BaseModelOutput
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from mmcore import ModalEncoderModule
    from mmcore.callbacks import SelectFeatureLayer

    hf, twin, _, batch = pair
    config = hf.config

    def num_patches(image_sizes):
        return [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
                for s in image_sizes]  # fmt: skip

    def preprocess_callback(inputs):
        pixel_values = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], num_patches(inputs["image_sizes"]))])
        return {**inputs, "pixel_values": pixel_values}

    def postprocess_projector_callback(inputs, output):
        image_features = torch.split(output[0], num_patches(inputs["image_sizes"]), dim=0)
        packed, _ = hf.model.pack_image_features(
            image_features, inputs["image_sizes"], config.vision_feature_select_strategy, image_newline=hf.model.image_newline
        )
        return BaseModelOutput(last_hidden_state=packed)

    strategy_drop = 1 if config.vision_feature_select_strategy == "default" else 0
    vision = ModalEncoderModule(
        model=hf.model.vision_tower,
        projector=twin.encoders["vision"].projector,
        preprocess_callback=preprocess_callback,
        postprocess_module_callback=SelectFeatureLayer(config.vision_feature_layer, strategy_drop),
        postprocess_projector_callback=postprocess_projector_callback,
        additional_args=["image_sizes"],
    )
    mllm = MultimodalModel(encoders={"vision": vision}, language_model=twin.language_model).eval()
    mllm.set_modality_token_ids({"vision": config.image_token_index})
    torch.testing.assert_close(mllm(**batch).logits, hf(**batch).logits, rtol=0, atol=1e-5)
