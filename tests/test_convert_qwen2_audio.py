"""Qwen2-Audio with its own processor: a tiny random Qwen2-Audio and its Qwen2AudioProcessor saved to a
directory convert to an mmcore model and processor (the real loading code, offline) whose batch is
Qwen2AudioProcessor's, with equal logits (fp32, atol 1e-5) and greedy generations for a left-padded
batch of two clips of different lengths; the processor saves and loads; ``mmcore export`` writes a
directory transformers loads with no mmcore, with equal logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcore import MultimodalModel
from mmcore.errors import ConfigError
from mmcore.processing import MultimodalProcessor, ProcessorCall

RATE = 16000  # a tiny feature extractor: 2 s windows, hops of 1600 samples -> 20 frames, the tiny tower's
PROMPTS = [
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nwhat is it?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>\nand this one, is it the same?<|im_end|>\n<|im_start|>assistant\n",
]


def tiny_qwen2_audio_with_processor():
    from tokenizers import AddedToken
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    from mmcore.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    specials = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    audio = Qwen2AudioEncoderConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                                    num_mel_bins=8, max_source_positions=10)  # fmt: skip
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(0)
    hf = Qwen2AudioForConditionalGeneration(config).to(torch.float32).eval()
    extractor = WhisperFeatureExtractor(feature_size=8, sampling_rate=RATE, hop_length=1600, chunk_length=2, n_fft=400)
    return hf, Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template="{{ messages }}")


def clips():
    rng = np.random.default_rng(3)
    return [rng.standard_normal(32000).astype(np.float32) * 0.1, rng.standard_normal(19000).astype(np.float32) * 0.1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    hf, hf_processor = tiny_qwen2_audio_with_processor()
    source = tmp_path_factory.mktemp("qwen2-audio")
    hf.save_pretrained(source)
    hf_processor.save_pretrained(source)
    mllm, processor = MultimodalModel.from_pretrained_multimodal_model(source, return_processor=True)
    hf_processor.tokenizer.padding_side = "left"
    expected = dict(hf_processor(text=PROMPTS, audio=clips(), return_tensors="pt", padding=True))
    return hf, mllm.eval(), processor, expected


def test_the_processor_makes_qwen2_audio_processors_batch(converted):
    _, _, processor, expected = converted
    assert isinstance(processor.encoder_processors["audio"], ProcessorCall)
    batch = processor(PROMPTS, audio=clips(), padding_side="left")
    assert batch["feature_attention_mask"].sum(-1).tolist() == [20, 12]  # each clip's real frames
    for key in ("input_ids", "attention_mask", "input_features", "feature_attention_mask"):
        assert torch.equal(batch[key], expected[key]), key
    audio_id = processor.token_ids["audio"]
    assert (batch["input_ids"] == audio_id).sum(-1).tolist() == [5, 3]  # tokens as each clip's length


@torch.no_grad()
def test_logits_and_generations_equal_qwen2_audio_on_its_processors_batch(converted):
    hf, mllm, processor, expected = converted
    batch = processor(PROMPTS, audio=clips(), padding_side="left")
    assert sorted(batch["attention_mask"][:, 0].tolist()) == [0, 1]  # left-padded: the shorter row
    torch.testing.assert_close(mllm(**batch).logits, hf(**expected).logits, rtol=0, atol=1e-5)
    pad = processor.tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=pad)
    assert mllm.generate(**batch, **kwargs).tolist() == hf.generate(**expected, **kwargs).tolist()


def test_the_processor_saves_and_loads_with_its_call(converted, tmp_path):
    _, mllm, processor, expected = converted
    mllm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = MultimodalProcessor.from_pretrained(tmp_path)
    call = loaded.encoder_processors["audio"]
    assert isinstance(call, ProcessorCall) and call.rename == {"attention_mask": "feature_attention_mask"}
    assert call.kwargs["padding"] == "max_length" and call.kwargs["return_attention_mask"] is True
    again = loaded(PROMPTS, audio=clips(), padding_side="left")
    for key in ("input_ids", "input_features", "feature_attention_mask"):
        assert torch.equal(again[key], expected[key]), key


def test_a_processor_call_takes_json_values_only():
    with pytest.raises(ConfigError, match="JSON values"):
        ProcessorCall(object(), {"dtype": torch.float32})
    with pytest.raises(ConfigError, match="rename"):
        ProcessorCall(object(), rename={"attention_mask": 3})


def test_the_converter_needs_the_checkpoints_feature_extractor(converted):
    from mmcore.convert import qwen2_audio

    _, mllm, processor, _ = converted
    with pytest.raises(ConfigError, match="WhisperFeatureExtractor"):
        qwen2_audio.processor_from_hf(mllm, processor.tokenizer, feature_extractor=None)


WITHOUT_MMCORE = """
import numpy as np, torch
from transformers import AutoModelForMultimodalLM, AutoProcessor
model = AutoModelForMultimodalLM.from_pretrained({out!r}).eval()
processor = AutoProcessor.from_pretrained({out!r})
processor.tokenizer.padding_side = "left"
rng = np.random.default_rng(3)
clips = [rng.standard_normal(32000).astype(np.float32) * 0.1, rng.standard_normal(19000).astype(np.float32) * 0.1]
batch = processor(text={prompts!r}, audio=clips, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
torch.save({{"logits": logits, "class": type(model).__name__, "input_ids": batch["input_ids"]}}, RESULT)
"""


def test_export_loads_with_no_mmcore_and_gives_equal_logits(converted, tmp_path):
    from mmcore.convert.testing import export_with_cli, run_without_mmcore

    _, mllm, processor, expected = converted
    out, report = export_with_cli(mllm, processor, tmp_path)
    assert report["architectures"] == ["Qwen2AudioForConditionalGeneration"]
    loaded = run_without_mmcore(WITHOUT_MMCORE.format(out=str(out), prompts=PROMPTS), tmp_path)
    assert loaded["class"] == "Qwen2AudioForConditionalGeneration"
    assert torch.equal(loaded["input_ids"], expected["input_ids"])
    with torch.no_grad():
        reference = mllm(**processor(PROMPTS, audio=clips(), padding_side="left")).logits
    torch.testing.assert_close(loaded["logits"], reference, rtol=0, atol=1e-5)


def test_the_converter_needs_the_checkpoints_tokenizer(converted):
    from mmcore.convert import qwen2_audio
    from mmcore.errors import TokenIdError
    from mmcore.testing import tiny_tokenizer

    _, mllm, processor, _ = converted
    (call,) = processor.encoder_processors.values()
    with pytest.raises(TokenIdError, match=r"tokenizer's <\|AUDIO\|> is id None, but the model's"):
        qwen2_audio.processor_from_hf(mllm, tiny_tokenizer(), feature_extractor=call.processor)
