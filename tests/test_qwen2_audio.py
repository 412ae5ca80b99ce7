"""Qwen2-Audio on mmcore: clips pay for their own length (Qwen2-Audio's tower, padding mask and per-clip
trim as built-in callbacks), equal to transformers' Qwen2AudioForConditionalGeneration built from the
same tiny parts: logits (fp32, atol 1e-5) and greedy generations for a left-padded batch of two clips of
different lengths; the family converts in (from_hf, a saved directory) and out (to_hf, bit-exact)."""

from __future__ import annotations

import pytest
import torch

from mmcore import MultimodalModel
from mmcore.builtin.qwen2_audio import Qwen2AudioPaddingMask, Qwen2AudioTrim, qwen2_audio_output_lengths
from mmcore.errors import EncoderInputError

AUDIO_TOKEN, PAD = 300, 0
FRAMES = 20  # the tiny tower's window: max_source_positions 10, conv strides 1 and 2


def tiny_qwen2_audio():
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2Config,
    )

    audio = Qwen2AudioEncoderConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                                    num_mel_bins=8, max_source_positions=10)  # fmt: skip
    text = Qwen2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_id=AUDIO_TOKEN)
    return Qwen2AudioForConditionalGeneration(config).to(torch.float32).eval()


def batch():
    """Clip 0 fills the window (20 frames -> 5 tokens), clip 1 is 12 frames (3 tokens); left-padded."""
    gen = torch.Generator().manual_seed(1)
    frames = torch.tensor([20, 12])
    _, tokens = qwen2_audio_output_lengths(frames)
    assert tokens.tolist() == [5, 3]
    rows = [[1] + [AUDIO_TOKEN] * 5 + [5, 6], [1] + [AUDIO_TOKEN] * 3 + [7, 8, 9]]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    features = torch.randn(2, 8, FRAMES, generator=gen)
    feature_mask = (torch.arange(FRAMES)[None, :] < frames[:, None]).long()
    features = features * feature_mask[:, None, :]  # the padding is silence, as the feature extractor's
    return dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                feature_attention_mask=feature_mask)  # fmt: skip


@pytest.fixture(scope="module")
def pair():
    hf = tiny_qwen2_audio()
    return hf, MultimodalModel.from_hf(hf).eval()


@torch.no_grad()
def test_logits_and_generations_equal_qwen2_audio(pair):
    hf, mllm = pair
    b = batch()
    torch.testing.assert_close(mllm(**b).logits, hf(**b).logits, rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert mllm.generate(**b, **kwargs).tolist() == hf.generate(**b, **kwargs).tolist()


@torch.no_grad()
def test_each_clip_costs_its_own_length_and_the_padding_is_masked(pair):
    _, mllm = pair
    b = batch()
    encoder = mllm.encoders["audio"]
    clips = encoder(input_features=b["input_features"], feature_attention_mask=b["feature_attention_mask"])
    assert [c.shape for c in clips] == [torch.Size([5, 32]), torch.Size([3, 32])]
    # Frames 15+ of the short clip reach only positions the mask hides (the convolutions' edge at its
    # 6th position still sees frames 12-14, as in transformers): its tokens do not change, and they
    # would without the mask.
    noisy = b["input_features"].clone()
    noisy[1, :, 15:] = 5.0
    again = encoder(input_features=noisy, feature_attention_mask=b["feature_attention_mask"])
    torch.testing.assert_close(again[1], clips[1], rtol=0, atol=1e-6)
    encoder.preprocess_callback = None
    try:
        unmasked = encoder(input_features=noisy, feature_attention_mask=b["feature_attention_mask"])
    finally:
        encoder.preprocess_callback = Qwen2AudioPaddingMask()
    assert not torch.allclose(unmasked[1], clips[1], atol=1e-3)


@torch.no_grad()
def test_saved_and_converted_directories_rebuild_with_nothing_passed(pair, tmp_path):
    hf, mllm = pair
    b = batch()
    mllm.save_pretrained(tmp_path / "mmcore")
    loaded = MultimodalModel.from_pretrained(tmp_path / "mmcore").eval()
    assert isinstance(loaded.encoders["audio"].preprocess_callback, Qwen2AudioPaddingMask)
    assert isinstance(loaded.encoders["audio"].postprocess_projector_callback, Qwen2AudioTrim)
    torch.testing.assert_close(loaded(**b).logits, hf(**b).logits, rtol=0, atol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    converted = MultimodalModel.from_pretrained_multimodal_model(tmp_path / "hf").eval()
    torch.testing.assert_close(converted(**b).logits, hf(**b).logits, rtol=0, atol=1e-5)


def test_qwen2_audio_to_mmcore_to_qwen2_audio_is_bit_exact(pair, tmp_path):
    hf, mllm = pair
    assert mllm.to_hf().model.audio_tower is hf.model.audio_tower
    mllm.save_pretrained(tmp_path)
    again = MultimodalModel.from_pretrained(tmp_path).to_hf()
    assert type(again).__name__ == "Qwen2AudioForConditionalGeneration"
    expected, got = hf.state_dict(), again.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert again.config.audio_token_id == hf.config.audio_token_id


def test_without_the_feature_mask_the_error_names_it():
    with pytest.raises(EncoderInputError, match="additional_args=\\['feature_attention_mask'\\]"):
        Qwen2AudioPaddingMask()({"input_features": torch.zeros(1, 8, FRAMES)})
