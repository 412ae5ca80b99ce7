"""Reference equivalence: an mmcore model assembled from a LLaVA's own parts behaves like the LLaVA.

`transformers.LlavaForConditionalGeneration` is built from tiny random configs; the mmcore model reuses
its vision tower, its projector (as a custom projector), its decoder and its lm_head, with LLaVA's
feature selection (penultimate layer, CLS dropped) expressed as a `SelectFeatureLayer` callback.
Logits, greedy generations and the loss must match on a left-padded batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmcore.testing import mmcore_twin_of_llava

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1  # inside the vocabulary: LLaVA embeds input_ids as they are
PAD, BOS, EOS = 0, 1, 2
IMAGE_SIZE, PATCH_SIZE = 28, 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
VISION_WIDTH, TEXT_WIDTH = 24, 32
ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    vision_config = CLIPVisionConfig(
        hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION_WIDTH,
    )  # fmt: skip
    text_config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    reference_state = {k: v.detach().clone() for k, v in llava.state_dict().items()}

    mllm = mmcore_twin_of_llava(llava).eval()
    return llava, mllm, reference_state


@pytest.fixture(scope="module")
def batch():
    """Two prompts of different lengths, left-padded, each with one image at a different position."""
    gen = torch.Generator().manual_seed(1)

    def text(n: int) -> list[int]:
        return torch.randint(4, 100, (n,), generator=gen).tolist()

    samples = [
        [BOS, *text(3), *[IMAGE_TOKEN] * NUM_IMAGE_TOKENS, *text(5)],
        [BOS, *text(2), *[IMAGE_TOKEN] * NUM_IMAGE_TOKENS, *text(1)],
    ]
    length = max(len(s) for s in samples)
    input_ids = torch.tensor([[PAD] * (length - len(s)) + s for s in samples])
    attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in samples])
    pixel_values = torch.randn(len(samples), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    # The batch really is left-padded, with the images at different positions.
    assert attention_mask[:, 0].tolist() == [1, 0]
    starts = [(row == IMAGE_TOKEN).nonzero()[0].item() for row in input_ids]
    assert starts[0] != starts[1]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def test_weights_are_llavas_and_untouched(models):
    llava, mllm, reference_state = models
    # Assembling the mmcore model must not re-initialise the parts it was handed.
    for key, value in llava.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], rtol=0, atol=0, msg=key)
    assert mllm.encoders["vision"].module is llava.model.vision_tower
    assert mllm.encoders["vision"].projector.projection is llava.model.multi_modal_projector
    assert mllm.language_model.model is llava.model.language_model
    assert mllm.get_output_embeddings() is llava.lm_head
    assert mllm.get_input_embeddings() is llava.get_input_embeddings()


@torch.no_grad()
def test_logits_match(models, batch):
    llava, mllm, _ = models
    expected = llava(**batch).logits
    got = mllm(**batch).logits
    assert got.shape == expected.shape == (*batch["input_ids"].shape, VOCAB)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    # The image actually matters: without it the logits differ (so this test can fail).
    no_image = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(no_image, expected, atol=1e-3)


@torch.no_grad()
def test_greedy_generation_matches(models, batch):
    llava, mllm, _ = models
    kwargs = dict(do_sample=False, max_new_tokens=8, pad_token_id=PAD, eos_token_id=EOS)
    expected = llava.generate(**batch, **kwargs)
    got = mllm.generate(**batch, **kwargs)
    prompt_len = batch["input_ids"].shape[1]
    assert expected.shape[1] > prompt_len
    assert torch.equal(got[:, :prompt_len], batch["input_ids"])
    assert got.tolist() == expected.tolist()


@torch.no_grad()
def test_generated_placeholder_is_embedded_as_a_token(models, batch):
    """A placeholder id with no features in the call (e.g. one the model generated during decode) is
    embedded as the token it is, as LLaVA does, not as some other id."""
    llava, mllm, _ = models
    input_ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, 5)
    input_ids[:, -1] = IMAGE_TOKEN
    text_only = {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}
    expected = llava(**text_only).logits
    got = mllm(**text_only).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("placeholders_in_labels", [True, False], ids=["labels-with-placeholders", "labels-masked"])
@torch.no_grad()
def test_loss_matches(models, batch, placeholders_in_labels):
    llava, mllm, _ = models
    input_ids = batch["input_ids"]
    labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
    llava_labels = labels.masked_fill(input_ids == IMAGE_TOKEN, -100)  # LLaVA leaves masking to the caller
    mmcore_labels = labels if placeholders_in_labels else llava_labels  # mmcore masks placeholders itself
    expected = llava(**batch, labels=llava_labels).loss
    got = mllm(**batch, labels=mmcore_labels).loss
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    # Counting the placeholder positions gives a different loss: the comparison is sensitive to it.
    unmasked = llava(**batch, labels=labels).loss
    assert not torch.allclose(unmasked, expected, atol=1e-4)
