"""Generation through `MultimodalModel.generate` (HF `GenerationMixin`), on the tiny offline parts.

Covers: text-only generation equals the bare language model's; encoders run once, at prefill; a
left-padded batch generates what each sample generates alone; the KV cache is used; image and audio
in one prompt.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mmcore.testing import tiny_multimodal_model

IMAGE_TOKENS = 4  # tokens per image (28x28 CLIP, patch 14, CLS dropped)
AUDIO_TOKENS = 10  # tokens per audio clip (Whisper, max_source_positions=10)


@functools.cache
def _model(family: str):
    mllm, tokenizer = tiny_multimodal_model(family)
    return mllm.eval(), tokenizer


@pytest.fixture(params=["llama", "qwen2"])
def family_model(request):
    return _model(request.param)


@pytest.fixture
def llama_model():
    return _model("llama")


def _text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _prompt(mllm, tokenizer, *pieces) -> list[int]:
    """BOS, then each piece: a string (text), "<image>" or "<audio>" (a run of placeholder ids)."""
    ids = [tokenizer.bos_token_id]
    token_ids = mllm.config.modality_token_ids
    for piece in pieces:
        if piece == "<image>":
            ids += [token_ids["vision"]] * IMAGE_TOKENS
        elif piece == "<audio>":
            ids += [token_ids["audio"]] * AUDIO_TOKENS
        else:
            ids += _text(tokenizer, piece)
    return ids


def _left_pad(samples: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in samples)
    input_ids = torch.tensor([[pad_id] * (length - len(s)) + s for s in samples])
    attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in samples])
    return input_ids, attention_mask


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _audio(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, 20, generator=torch.Generator().manual_seed(seed))


def _greedy(new_tokens: int) -> dict:
    # min_new_tokens == max_new_tokens: an EOS cannot end one sample early, so lengths are comparable.
    return dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


@torch.no_grad()
def test_text_only_generation_equals_language_model(family_model):
    mllm, tokenizer = family_model
    samples = [
        _prompt(mllm, tokenizer, "user : what is in the image ? assistant :"),
        _prompt(mllm, tokenizer, "hello world"),
    ]
    input_ids, attention_mask = _left_pad(samples, tokenizer.pad_token_id)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    got = mllm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    expected = mllm.language_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert got.sequences.shape[1] > input_ids.shape[1]
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert len(got.logits) == len(expected.logits)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("via", ["kwargs", "encoder_inputs"])
@pytest.mark.parametrize(
    "modalities", [("vision",), ("audio",), ("vision", "audio")], ids=["image", "audio", "image+audio"]
)
@torch.no_grad()
def test_encoders_run_once_at_prefill(llama_model, modalities, via):
    """Decode steps see only the new token and the KV cache. ``via="encoder_inputs"`` matters: HF's
    generate drops well-known names such as ``pixel_values`` after prefill by itself, but not
    ``encoder_inputs`` (or an encoder's custom input names); mmcore must."""
    mllm, tokenizer = llama_model
    pieces, per_encoder = ["a picture of"], {}
    if "vision" in modalities:
        pieces += ["<image>"]
        per_encoder["vision"] = {"pixel_values": _images(1)}
    if "audio" in modalities:
        pieces += ["the sound of", "<audio>"]
        per_encoder["audio"] = {"input_features": _audio(1)}
    if via == "kwargs":
        inputs = {k: v for named in per_encoder.values() for k, v in named.items()}
    else:
        inputs = {"encoder_inputs": per_encoder}
    input_ids = torch.tensor([_prompt(mllm, tokenizer, *pieces, "describe it .")])

    calls = {name: 0 for name in mllm.encoders}
    llm_calls = 0

    def count(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    def count_llm(module, args, output):
        nonlocal llm_calls
        llm_calls += 1

    handles = [mllm.encoders[name].module.register_forward_hook(count(name)) for name in mllm.encoders]
    handles.append(mllm.language_model.register_forward_hook(count_llm))
    try:
        out = mllm.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True, **_greedy(6), **inputs
        )
    finally:
        for handle in handles:
            handle.remove()

    assert out.shape == (1, input_ids.shape[1] + 6)
    assert llm_calls == 6  # one prefill + five decode steps
    assert calls == {name: int(name in modalities) for name in mllm.encoders}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_left_padded_batch_matches_single_samples(family):
    mllm, tokenizer = _model(family)
    samples = [
        _prompt(mllm, tokenizer, "user :", "<image>", "what is in the image ? assistant :"),
        _prompt(mllm, tokenizer, "a picture of a cat", "<image>"),
    ]
    assert len(samples[0]) != len(samples[1])
    pixel_values = _images(2, seed=1)
    input_ids, attention_mask = _left_pad(samples, tokenizer.pad_token_id)
    assert attention_mask[1, 0] == 0  # the shorter prompt really is padded on the left
    new = 6
    batched = mllm.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **_greedy(new)
    )
    assert batched.shape == (2, input_ids.shape[1] + new)
    for i, sample in enumerate(samples):
        alone_ids = torch.tensor([sample])
        alone = mllm.generate(
            input_ids=alone_ids,
            attention_mask=torch.ones_like(alone_ids),
            pixel_values=pixel_values[i : i + 1],
            **_greedy(new),
        )
        assert batched[i, -new:].tolist() == alone[0, -new:].tolist(), f"sample {i}"
    # Each sample's own image matters: swapping the images changes what the batch generates.
    swapped = mllm.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values.flip(0), **_greedy(new),
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    original = mllm.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **_greedy(new),
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert not torch.allclose(swapped.logits[0], original.logits[0], atol=1e-5)


@torch.no_grad()
def test_generation_uses_kv_cache(llama_model):
    mllm, tokenizer = llama_model
    input_ids = torch.tensor([_prompt(mllm, tokenizer, "a picture of", "<image>", "describe it .")])
    attention_mask = torch.ones_like(input_ids)
    new = 5
    out = mllm.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=_images(1), use_cache=True,
        return_dict_in_generate=True, **_greedy(new),
    )  # fmt: skip
    assert out.past_key_values is not None
    # The cache holds every position the model has run on: the prompt and all but the last new token.
    assert out.past_key_values.get_seq_length() == input_ids.shape[1] + new - 1
    assert out.sequences.shape == (1, input_ids.shape[1] + new)
    # Decoding from the cache gives what re-running the whole sequence each step gives.
    no_cache = mllm.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=_images(1), use_cache=False,
        **_greedy(new),
    )  # fmt: skip
    assert no_cache.tolist() == out.sequences.tolist()


@torch.no_grad()
def test_image_and_audio_in_one_prompt(llama_model):
    mllm, tokenizer = llama_model
    samples = [
        _prompt(mllm, tokenizer, "a picture of", "<image>", "and the sound of", "<audio>", "describe both ."),
        _prompt(mllm, tokenizer, "<audio>", "<image>", "what is it ?"),
    ]
    input_ids, attention_mask = _left_pad(samples, tokenizer.pad_token_id)
    new = 5
    kwargs = dict(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=_images(2), **_greedy(new),
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    out = mllm.generate(input_features=_audio(2), **kwargs)
    assert out.sequences.shape == (2, input_ids.shape[1] + new)
    assert torch.equal(out.sequences[:, : input_ids.shape[1]], input_ids)
    # The audio reaches the model: other audio gives other logits at the first new token.
    other = mllm.generate(input_features=_audio(2, seed=7), **kwargs)
    assert not torch.allclose(out.logits[0], other.logits[0], atol=1e-5)


@torch.no_grad()
def test_generate_passes_the_language_models_own_arguments_through():
    """token_type_ids is GPT-2's own argument (as mm_token_type_ids is a Qwen2-VL text model's): generate
    hands it to the language model, with the same tokens as the language model's own generate."""
    model, _ = tiny_multimodal_model("gpt2")
    model.eval()
    ids, types = torch.tensor([[1, 5, 6]]), torch.tensor([[0, 1, 1]])
    ours = model.generate(input_ids=ids, token_type_ids=types, max_new_tokens=3, do_sample=False)
    theirs = model.language_model.generate(input_ids=ids, token_type_ids=types, max_new_tokens=3, do_sample=False)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="bogus"):  # a typo is still caught, by the language model's check
        model.generate(input_ids=ids, bogus=1, max_new_tokens=2)


@torch.no_grad()
def test_features_encoded_once_are_reused_with_no_encoder_run():
    """OmniLMM's return_vision_hidden_states / vision_hidden_states: a multi-turn chat about one image."""
    mllm, tokenizer = _model("llama")
    image = _images(1, seed=3)
    first = torch.tensor([_prompt(mllm, tokenizer, "<image>", "what is this ?")])
    second = torch.tensor([_prompt(mllm, tokenizer, "<image>", "and its colour ?")])
    out, features = mllm.generate(input_ids=first, pixel_values=image, return_modality_features=True, **_greedy(4))
    assert torch.equal(out, mllm.generate(input_ids=first, pixel_values=image, **_greedy(4)))
    assert set(features) == {"vision"} and features["vision"].shape == (IMAGE_TOKENS, 32)
    assert torch.equal(features["vision"], mllm.encode(pixel_values=image)["vision"])

    fresh = mllm.generate(input_ids=second, pixel_values=image, **_greedy(4))
    calls = []
    hook = mllm.encoders["vision"].module.register_forward_hook(lambda *a: calls.append(1))
    try:
        reused = mllm.generate(input_ids=second, modality_features=features, **_greedy(4))
        logits = mllm(input_ids=second, modality_features=features).logits
    finally:
        hook.remove()
    assert calls == []  # the vision tower did not run
    assert torch.equal(reused, fresh)
    torch.testing.assert_close(logits, mllm(input_ids=second, pixel_values=image).logits, rtol=0, atol=0)
    with pytest.raises(Exception, match="not both"):
        mllm(input_ids=second, pixel_values=image, modality_features=features)
