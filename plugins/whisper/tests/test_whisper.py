"""mmcore-plugin-whisper: the contract, presets, the real loading path, log-mel features, windows,
and each clip's own token count (trim_padding)."""

import json
import math
from pathlib import Path

import pytest
import torch
from mmcore_plugin_whisper.callbacks import TrimPadding, positions_of_frames
from mmcore_plugin_whisper.factory import WhisperAudioProcessor
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

import mmcore
from mmcore.errors import ConfigError
from mmcore.plugins import get_registry
from mmcore.testing import check_encoder_plugin, tiny_assembled_model
from mmcore.testing.suite import EncoderSuite

TINY = dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=8)


def factory():
    return mmcore.get_factory("whisper")


def recipe_of(encoder):
    return encoder.source["recipe"]


def tone(seconds, rate, freq=440.0):
    t = torch.arange(int(round(seconds * rate))) / rate
    return 0.5 * torch.sin(2 * math.pi * freq * t)


class TestWhisperSuite(EncoderSuite):
    plugin = "whisper"
    option_variants = {"whisper": [{"trim_padding": False}, {"max_seconds": 0.1}]}
    readme = Path(__file__).parents[1] / "README.md"


def test_contract_counts_the_tiny_presets_window(tmp_path):
    report = check_encoder_plugin("whisper", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.tokens_per_item == [10, 10]  # the tiny preset's 0.2 s window
    assert {"processor", "meta_presets", "save_load"} <= set(report.checks)


def test_the_spec_names_whisper_large_v3():
    spec = get_registry().get_encoder("whisper")
    assert spec.modality == "audio" and spec.default_checkpoint == "openai/whisper-large-v3"


def test_build_from_tiny_preset():
    encoder = mmcore.build_encoder("whisper", preset="tiny")
    assert isinstance(encoder.module, WhisperEncoder)
    assert encoder.output_width == 16
    assert encoder.input_map == {
        "input_features": "input_features",
        "feature_attention_mask": "feature_attention_mask",
    }
    assert encoder.postprocess_projector_callback == TrimPadding()
    features = encoder(input_features=torch.randn(3, 8, 20))  # no mask: every clip keeps the window
    assert features.shape == (3, 10, 16)


def whisper_encoder_parameters(d_model, layers, mels, positions):
    """Parameter count of a Whisper encoder, from its layer shapes (k_proj has no bias)."""
    convs = (mels * d_model * 3 + d_model) + (d_model * d_model * 3 + d_model)
    attention = 4 * d_model * d_model + 3 * d_model
    mlp = 2 * 4 * d_model * d_model + 4 * d_model + d_model
    norms = 2 * 2 * d_model
    return convs + positions * d_model + layers * (attention + mlp + norms) + 2 * d_model


@pytest.mark.parametrize(
    "preset, d_model, layers, mels",
    [("whisper-tiny", 384, 4, 80), ("whisper-large-v2", 1280, 32, 80), ("whisper-large-v3", 1280, 32, 128),
     ("whisper-large-v3-turbo", 1280, 32, 128)],
)  # fmt: skip
def test_full_size_presets_on_meta_device(preset, d_model, layers, mels):
    encoder = mmcore.build_encoder("whisper", preset=preset, device="meta")
    params = list(encoder.module.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert sum(p.numel() for p in params) == whisper_encoder_parameters(d_model, layers, mels, 1500)
    assert encoder.module.conv1.in_channels == mels and encoder.output_width == d_model


def test_large_v3_encoder_is_635m_trainable_and_a_5s_window_costs_250_tokens():
    encoder = mmcore.build_encoder("whisper", preset="whisper-large-v3", device="meta")
    trainable = sum(p.numel() for p in encoder.module.parameters() if p.requires_grad)
    assert trainable == 635_048_960  # all but the fixed 1500 x 1280 position table
    short = mmcore.build_encoder("whisper", preset="whisper-large-v3", max_seconds=5, device="meta")
    assert short.module.embed_positions.num_embeddings == 250
    with torch.device("meta"):
        inputs = factory().dummy_inputs(recipe_of(short), batch_size=2)
    assert inputs["input_features"].shape == (2, 128, 500)
    assert short.module(**inputs).last_hidden_state.shape == (2, 250, 1280)  # a dry run, no memory
    assert factory().num_tokens(recipe_of(short), inputs) == [250, 250]


@pytest.fixture
def saved_whisper(tmp_path):
    """A tiny whole-model Whisper checkpoint saved the way the hub ones are."""
    config = WhisperConfig(
        **TINY, max_source_positions=10, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=3,
    )  # fmt: skip
    torch.manual_seed(1)
    model = WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "whisper-full")
    return model, tmp_path / "whisper-full"


def test_loads_the_encoder_from_a_whole_model_checkpoint(saved_whisper):
    model, path = saved_whisper
    encoder = mmcore.build_encoder("whisper", str(path))
    assert not any("decoder" in name for name, _ in encoder.module.named_parameters())
    expected = model.model.encoder.state_dict()
    got = encoder.module.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    x = torch.randn(2, 8, 20)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(input_features=x), model.model.encoder(x).last_hidden_state)


def test_loads_an_encoder_only_checkpoint_with_a_shorter_window(saved_whisper, tmp_path):
    model, _ = saved_whisper
    model.model.encoder.save_pretrained(tmp_path / "encoder-only")
    encoder = mmcore.build_encoder("whisper", str(tmp_path / "encoder-only"), max_seconds=0.1)
    table = encoder.module.embed_positions.weight
    assert table.shape == (5, 16) and not table.requires_grad
    assert torch.equal(table, model.model.encoder.embed_positions.weight[:5])
    assert encoder.module.config.max_source_positions == 5
    assert encoder(input_features=torch.randn(1, 8, 10)).shape == (1, 5, 16)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    from transformers import CLIPVisionConfig

    CLIPVisionConfig().save_pretrained(tmp_path / "clip")
    with pytest.raises(ConfigError, match="clip_vision_model"):
        mmcore.build_encoder("whisper", str(tmp_path / "clip"))
    with pytest.raises(ConfigError, match="cannot read a Whisper config"):
        mmcore.build_encoder("whisper", str(tmp_path / "missing"))
    WhisperConfig(**TINY).save_pretrained(tmp_path / "config-only")
    with pytest.raises(ConfigError, match="cannot load weights"):
        mmcore.build_encoder("whisper", str(tmp_path / "config-only"))


@pytest.mark.parametrize("mels, seconds", [(80, 30), (128, 5)])
def test_log_mel_matches_whisper_feature_extractor(mels, seconds):
    window = seconds * 16000
    generator = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(n, generator=generator) for n in (window // 3, window, window + 777, 1234)]
    waves[1] = waves[1] + tone(seconds, 16000)  # a loud item: the per-item max floor differs per row
    reference = WhisperFeatureExtractor(feature_size=mels, chunk_length=seconds)(
        [w.numpy() for w in waves], sampling_rate=16000, return_tensors="pt"
    ).input_features
    processor = WhisperAudioProcessor(mels, positions=seconds * 50)
    batched = processor(waves)["input_features"]
    assert batched.shape == reference.shape == (4, mels, seconds * 100)
    assert (batched - reference).abs().max() < 1e-4
    one_by_one = torch.cat([processor([w])["input_features"] for w in waves])
    assert torch.allclose(batched, one_by_one, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_log_mel_runs_on_the_device_of_the_waveforms():
    processor = WhisperAudioProcessor(80, positions=250)
    waves = [tone(3, 16000), tone(7, 16000, 220.0)]
    on_gpu = processor([w.cuda() for w in waves])["input_features"]
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu() - processor(waves)["input_features"]).abs().max() < 1e-4
    assert processor(waves, device="cuda")["input_features"].device.type == "cuda"


@pytest.mark.parametrize("rate", [8000, 44100])
def test_resampling_to_16khz_keeps_duration_and_pitch(rate):
    processor = WhisperAudioProcessor(80, positions=1500)
    wave = processor.waveform((tone(1.0, rate, freq=440.0), rate), 0, 16000)
    assert wave.shape == (16000,)
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 1  # 1 s at 16 kHz: one bin per Hz
    pair = processor([(tone(1.0, rate), rate)])["input_features"]
    direct = processor([tone(1.0, 16000)])["input_features"]
    assert pair.shape == direct.shape == (1, 80, 3000)


def test_processor_takes_arrays_stereo_and_a_rate_for_all_items():
    import numpy as np

    processor = WhisperAudioProcessor(8, positions=10)
    mono = tone(0.1, 16000).numpy()
    stereo = np.stack([mono, mono])
    assert torch.equal(processor([mono])["input_features"], processor([stereo])["input_features"])
    at_8k = processor([tone(0.1, 8000)], sampling_rate=8000)["input_features"]
    assert at_8k.shape == (1, 8, 20)
    assert torch.equal(processor((tone(0.1, 8000), 8000.0))["input_features"], at_8k)  # one pair, not a list
    assert torch.equal(processor(mono)["input_features"], processor([mono])["input_features"])  # one clip
    assert processor((mono, mono))["input_features"].shape == (2, 8, 20)  # a tuple of clips


@pytest.mark.parametrize(
    "item, match",
    [(torch.zeros(0), "non-empty"), (torch.zeros(2, 3, 4), "waveform"), (torch.ones(100, dtype=torch.int16), "float"),
     ((torch.zeros(100), 0), "sample rate"), ((torch.zeros(100), 8000, 1), "waveform, sample_rate")],
)  # fmt: skip
def test_processor_rejects_bad_items(item, match):
    with pytest.raises(ConfigError, match=match):
        WhisperAudioProcessor(8, positions=10)([item])


@pytest.mark.parametrize("max_seconds, tokens", [(None, 10), (0.1, 5), (0.04, 2)])
def test_without_trim_padding_every_clip_costs_the_window(max_seconds, tokens):
    options = {} if max_seconds is None else {"max_seconds": max_seconds}
    encoder = mmcore.build_encoder("whisper", preset="tiny", trim_padding=False, **options).eval()
    assert encoder.input_map == {"input_features": "input_features"}
    assert encoder.postprocess_projector_callback is None
    processor = factory().processor(recipe_of(encoder))
    clips = [
        tone(0.05, 16000),
        tone(0.2, 16000),
        (tone(0.5, 44100), 44100),
    ]  # shorter and longer than any window
    inputs = processor(clips)
    with torch.no_grad():
        features = encoder(**inputs)
    assert features.shape == (3, tokens, 16)
    assert factory().num_tokens(recipe_of(encoder), inputs) == [tokens] * 3


def test_recipe_records_the_window():
    encoder = mmcore.build_encoder("whisper", preset="whisper-base", max_seconds=10, device="meta")
    recipe = recipe_of(encoder)
    assert recipe["max_seconds"] == 10 and recipe["config"]["max_source_positions"] == 500
    assert recipe["trim_padding"] is True  # new recipes record the option (on by default)
    assert factory().processor(recipe).num_samples == 160000


@pytest.mark.parametrize(
    "kwargs, match",
    [({"preset": "whisper-huge"}, "whisper-huge"), ({"preset": "tiny", "max_seconds": 0.013}, "max_seconds"),
     ({"preset": "whisper-tiny", "max_seconds": 31}, "max_seconds"), ({"preset": "tiny", "max_seconds": "5"}, "max_seconds"),
     ({"preset": "tiny", "window": 5}, "window"), ({"preset": "tiny", "trim_padding": "yes"}, "trim_padding")],
)  # fmt: skip
def test_bad_preset_or_option_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        mmcore.build_encoder("whisper", device="meta", **kwargs)


def assembled_with_processor(encoder, **model_options):
    """The encoder + a tiny LLM, and the `MultimodalProcessor` for both (the same tokenizer)."""
    model, tokenizer = tiny_assembled_model({"audio": encoder}, **model_options)
    return model, mmcore.MultimodalProcessor.from_model(model, tokenizer)


def test_processor_output_runs_through_the_assembled_model(tmp_path):
    torch.manual_seed(0)
    encoder = mmcore.build_encoder("whisper", preset="tiny", max_seconds=0.1)
    model, _ = tiny_assembled_model({"audio": encoder})
    audio_id = model.modality_token_ids["audio"]
    f, recipe = factory(), recipe_of(encoder)
    processed = f.processor(recipe)(f.dummy_items(recipe, 2))
    counts = f.num_tokens(recipe, processed)
    assert counts == [3, 5]  # 0.05 s and a clip longer than the 0.1 s window (trim_padding)
    rows = [[1, 5] + [audio_id] * counts[0] + [6, 7], [1] + [audio_id] * counts[1] + [8, 9, 10]]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [3] * (width - len(row)) for row in rows])  # right-padded
    out = model(input_ids=input_ids, labels=input_ids, **processed)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in model.encoders["audio"].projector.parameters())

    model.eval()
    model.save_pretrained(tmp_path / "model")
    loaded = mmcore.MultimodalModel.from_pretrained(tmp_path / "model").eval()
    assert loaded.encoders["audio"].module.config.max_source_positions == 5
    with torch.no_grad():
        before = model(input_ids=input_ids, **processed).logits
        after = loaded(input_ids=input_ids, **processed).logits
    assert torch.equal(before, after)


# -- trim_padding: each clip pays for its own length ------------------------------------------------------
@pytest.mark.parametrize("max_seconds, expected", [(None, [1, 3, 2, 10, 10]), (0.1, [1, 3, 2, 5, 5])])
def test_trim_padding_keeps_the_positions_each_clip_covers(max_seconds, expected):
    options = {} if max_seconds is None else {"max_seconds": max_seconds}
    torch.manual_seed(0)
    trimmed = mmcore.build_encoder("whisper", preset="tiny", **options).eval()
    full = mmcore.build_encoder("whisper", preset="tiny", trim_padding=False, **options).eval()
    full.module.load_state_dict(trimmed.module.state_dict())
    # samples at 16 kHz: 16, 800, 482, 3200 and 8000 (resampled), so frames (hop 160, capped at the
    # window) 1, 5, 4, 20 / 10 and 20 / 10; positions (frames - 1) // 2 + 1
    clips = [
        tone(0.001, 16000), tone(0.05, 16000), tone(0.0301, 16000), tone(0.2, 16000), (tone(0.5, 44100), 44100),
    ]  # fmt: skip
    inputs = factory().processor(recipe_of(trimmed))(clips)
    assert factory().num_tokens(recipe_of(trimmed), inputs) == expected
    with torch.no_grad():
        features = trimmed(**inputs)
        window = full(input_features=inputs["input_features"])
    assert [tuple(f.shape) for f in features] == [(n, 16) for n in expected]
    # the padding is encoded as without the option; only the positions past each clip are dropped
    assert all(torch.equal(f, window[i, :n]) for i, (f, n) in enumerate(zip(features, expected)))


def test_mask_and_count_match_the_feature_extractor_and_qwen2_audio():
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    def qwen2_audio_lengths(frames):  # before its pooling step; the method does not read self
        return Qwen2AudioEncoder._get_feat_extract_output_lengths(None, frames)[0]

    frames = torch.arange(1, 3001)
    assert torch.equal(positions_of_frames(frames), qwen2_audio_lengths(frames))
    samples = [1, 159, 160, 161, 16000, 48000, 48001, 479999, 480000, 480777]
    generator = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(n, generator=generator) for n in samples]
    reference = WhisperFeatureExtractor(feature_size=128)(
        [w.numpy() for w in waves], sampling_rate=16000, return_attention_mask=True, return_tensors="pt"
    )
    ours = WhisperAudioProcessor(128, positions=1500, return_mask=True)(waves)
    assert torch.equal(ours["feature_attention_mask"].long(), reference.attention_mask.long())
    recipe = factory().make_recipe(preset="whisper-large-v3")
    expected = qwen2_audio_lengths(reference.attention_mask.sum(-1)).tolist()
    assert factory().num_tokens(recipe, ours) == expected == [1, 1, 1, 1, 50, 150, 151, 1500, 1500, 1500]


def test_real_size_whisper_large_v3_3s_costs_150_tokens_and_30s_1500():
    encoder = mmcore.build_encoder("whisper", preset="whisper-large-v3", device="meta")
    recipe = recipe_of(encoder)
    inputs = factory().processor(recipe)([tone(3, 16000), tone(30, 16000), tone(45, 16000)])
    assert factory().num_tokens(recipe, inputs) == [150, 1500, 1500]
    on_meta = {
        "input_features": torch.empty(3, 128, 3000, device="meta"),
        "feature_attention_mask": inputs["feature_attention_mask"],
    }
    with torch.no_grad():
        features = encoder(**on_meta)  # a dry run: no memory
    assert [tuple(f.shape) for f in features] == [(150, 1280), (1500, 1280), (1500, 1280)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trim_padding_on_the_gpu_counts_and_cuts_as_on_the_cpu():
    torch.manual_seed(0)
    encoder = mmcore.build_encoder("whisper", preset="tiny").eval()
    recipe = recipe_of(encoder)
    processor = factory().processor(recipe)
    clips = [tone(0.05, 16000), tone(0.13, 16000)]  # 5 and 13 frames
    on_cpu, on_gpu = processor(clips), processor(clips, device="cuda")
    assert on_gpu["feature_attention_mask"].device.type == "cuda"
    assert torch.equal(on_gpu["feature_attention_mask"].cpu(), on_cpu["feature_attention_mask"])
    assert factory().num_tokens(recipe, on_gpu) == factory().num_tokens(recipe, on_cpu) == [3, 7]
    with torch.no_grad():
        cpu_features = encoder(**on_cpu)
        gpu_features = encoder.cuda()(**on_gpu)
    shapes = [tuple(f.shape) for f in gpu_features]
    assert shapes == [tuple(f.shape) for f in cpu_features] == [(3, 16), (7, 16)]
    assert all(torch.allclose(g.cpu(), c, atol=1e-3) for g, c in zip(gpu_features, cpu_features))


def test_a_1s_and_a_3s_clip_batch_through_the_assembled_model():
    torch.manual_seed(0)
    encoder = mmcore.build_encoder("whisper", preset="whisper-tiny", max_seconds=3)
    model, processor = assembled_with_processor(encoder)
    clips = [tone(1, 16000), tone(3, 16000, 220.0)]
    inputs, counts = processor.process_items({"audio": clips})
    assert counts["audio"] == [50, 150]
    with torch.no_grad():
        features = model.encoders["audio"](**inputs["audio"])
    assert [f.shape[0] for f in features] == counts["audio"]

    batch = processor(["<audio> a low tone", "a high <audio> tone"], audio=[[clips[0]], [clips[1]]])
    assert set(batch) >= {"input_features", "feature_attention_mask"}  # both reach the encoder
    assert (batch["input_ids"] == processor.token_ids["audio"]).sum(-1).tolist() == [50, 150]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in model.encoders["audio"].projector.parameters())


def test_trim_padding_is_recorded_and_rebuilt_at_load(tmp_path):
    torch.manual_seed(0)
    model, processor = assembled_with_processor(mmcore.build_encoder("whisper", preset="tiny"))
    model.eval().save_pretrained(tmp_path / "model")
    record = json.loads((tmp_path / "model" / "config.json").read_text())["encoders"]["audio"]
    assert record["source"]["recipe"]["trim_padding"] is True
    assert record["callbacks"] == {"postprocess_projector": {"name": "whisper:trim_padding", "params": {}}}
    assert set(record["input_names"]) == {"input_features", "feature_attention_mask"}
    loaded = mmcore.MultimodalModel.from_pretrained(tmp_path / "model").eval()
    assert loaded.encoders["audio"].postprocess_projector_callback == TrimPadding()
    processor = mmcore.MultimodalProcessor.from_model(loaded, processor.tokenizer)
    batch = processor(["<audio> <audio> two clips"], audio=[[tone(0.05, 16000), tone(0.15, 16000)]])
    assert (batch["input_ids"] == processor.token_ids["audio"]).sum() == 3 + 8
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_a_recipe_saved_without_the_option_loads_with_the_whole_window(tmp_path):
    torch.manual_seed(0)
    encoder = mmcore.build_encoder("whisper", preset="tiny", trim_padding=False)
    model, processor = assembled_with_processor(encoder)
    model.eval().save_pretrained(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    record = config["encoders"]["audio"]
    del record["source"]["recipe"]["trim_padding"]  # what this plugin wrote before the option existed
    assert record["callbacks"] == {} and record["input_names"] == {"input_features": "input_features"}
    config_path.write_text(json.dumps(config))

    loaded = mmcore.MultimodalModel.from_pretrained(tmp_path / "model").eval()
    encoder = loaded.encoders["audio"]
    recipe = recipe_of(encoder)
    assert "trim_padding" not in recipe and encoder.postprocess_projector_callback is None
    assert encoder.input_map == {"input_features": "input_features"}
    clips = [tone(0.05, 16000), tone(0.15, 16000)]
    inputs = factory().processor(recipe)(clips)
    assert set(inputs) == {"input_features"}
    assert factory().num_tokens(recipe, inputs) == [10, 10]
    processor = mmcore.MultimodalProcessor.from_model(loaded, processor.tokenizer)
    batch = processor(["<audio> <audio> two clips"], audio=[clips])
    assert (batch["input_ids"] == processor.token_ids["audio"]).sum() == 20
    with torch.no_grad():
        assert loaded.encoders["audio"](**inputs).shape == (2, 10, 32)  # projected to the LLM width
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_a_resampler_keeps_its_own_count_with_trim_padding():
    torch.manual_seed(0)
    model, processor = assembled_with_processor(
        mmcore.build_encoder("whisper", preset="tiny"), init_projector_type="resampler"
    )
    queries = model.encoders["audio"].projector.config.num_queries
    batch = processor(["<audio> <audio> two clips"], audio=[[tone(0.05, 16000), tone(0.15, 16000)]])
    assert (batch["input_ids"] == processor.token_ids["audio"]).sum() == 2 * queries
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)
