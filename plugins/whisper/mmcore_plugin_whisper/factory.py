"""The Whisper encoder factory: transformers' ``WhisperEncoder`` and a torchaudio log-mel processor.

Window: Whisper reads fixed windows, 100 log-mel frames per second and one output position per 20 ms
(1500 for the released 30 s). The ``max_seconds`` option cuts the encoder's position table to a
shorter window (5 s: 250 positions) and the processor pads or trims every clip to it.

Tokens per clip (``trim_padding``, on for new models): the whole padded window goes through the
encoder, as Whisper itself does, and then each clip keeps only the positions its own samples cover,
as Qwen2-Audio does: ``(frames - 1) // 2 + 1`` for the ``frames`` log-mel frames of its samples (the
processor's ``feature_attention_mask``), so a 3 s clip costs 150 tokens, not 1500. The cut is the
registered ``whisper:trim_padding`` callback (`mmcore_plugin_whisper.callbacks`). Off (and for
recipes saved before the option existed), every clip costs the whole window's positions.

Weights (``checkpoint``): a hub id or a local directory holding a Whisper checkpoint, of the whole
model (``WhisperForConditionalGeneration`` / ``WhisperModel``: only the encoder's weights are kept)
or of the encoder alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchaudio
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmcore.errors import ConfigError
from mmcore.factory import EncoderFactory, load_checkpoint_part
from mmcore_plugin_whisper.callbacks import TrimPadding, positions_of_frames
from mmcore_plugin_whisper.presets import PRESETS

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
FRAMES_PER_POSITION = 2  # the second convolution has stride 2
SECONDS_PER_POSITION = FRAMES_PER_POSITION * HOP_LENGTH / SAMPLING_RATE  # 0.02

#: WhisperConfig fields the encoder reads; the recipe records these (the decoder's are irrelevant).
ENCODER_FIELDS = (
    "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
    "max_source_positions", "activation_function", "scale_embedding", "dropout", "attention_dropout",
    "activation_dropout", "encoder_layerdrop", "init_std",
)  # fmt: skip


class WhisperAudioEncoder(WhisperEncoder):
    """transformers' `WhisperEncoder`, loadable from a whole-model Whisper checkpoint: the weights
    under ``model.encoder.`` (or ``encoder.``) are its own, the decoder's are skipped quietly."""

    _keys_to_ignore_on_load_unexpected = [
        r"^(model\.)?decoder\.",
        r"^proj_out\.",
        r"^projector\.",
        r"^classifier\.",
    ]

    def forward(self, input_features, attention_mask=None, feature_attention_mask=None, **kwargs):
        """`WhisperEncoder.forward`; ``feature_attention_mask`` is accepted for the ``trim_padding``
        callback, which reads it after the projector. The encoder does not: the whole window, its
        padding too, is encoded as Whisper does."""
        return super().forward(input_features, attention_mask=attention_mask, **kwargs)


def cut_window(encoder: WhisperEncoder, positions: int) -> None:
    """Keep the first ``positions`` rows of the encoder's position table (its window)."""
    table = encoder.embed_positions
    if positions == table.num_embeddings:
        return
    cut = nn.Embedding(positions, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        cut.weight.copy_(table.weight[:positions])
    cut.requires_grad_(False)
    encoder.embed_positions = cut
    encoder.max_source_positions = encoder.config.max_source_positions = positions


class WhisperAudioProcessor:
    """Waveforms -> ``{"input_features": (items, num_mel_bins, 2 * positions)}``, Whisper's log-mel
    spectrogram computed with torchaudio, batched, on the device the waveforms are on (or ``device``).
    With ``return_mask`` also ``"feature_attention_mask": (items, 2 * positions)``, int32, 1 for each
    frame the clip's own samples cover (``ceil(samples / 160)`` of them), as ``WhisperFeatureExtractor``'s
    ``attention_mask`` (Qwen2-Audio's processor names it so).

    Items (a list; a single clip is accepted too): 1-D waveforms at 16 kHz (arrays, lists or tensors),
    floats in [-1, 1]; ``(waveform, sample_rate)`` pairs
    (resampled to 16 kHz with ``torchaudio.functional.resample``), or ``(channels, samples)`` arrays
    (averaged to mono). Each clip is padded with zeros or trimmed to the window, as
    ``WhisperFeatureExtractor`` does (it matches it within 1e-4).
    """

    def __init__(
        self,
        num_mel_bins: int,
        positions: int,
        device: str | torch.device | None = None,
        return_mask: bool = False,
    ):
        self.num_mel_bins = num_mel_bins
        self.positions = positions
        self.num_samples = positions * FRAMES_PER_POSITION * HOP_LENGTH
        self.device = device
        self.return_mask = return_mask
        self._mel: dict[torch.device, nn.Module] = {}

    def __repr__(self) -> str:
        seconds = self.num_samples / SAMPLING_RATE
        return (
            f"WhisperAudioProcessor(num_mel_bins={self.num_mel_bins}, window={seconds:g} s, "
            f"device={self.device}, return_mask={self.return_mask})"
        )

    def waveform(self, item: Any, index: int, sampling_rate: int) -> torch.Tensor:
        """One item as a mono float32 waveform at 16 kHz."""
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ConfigError(
                    f"whisper processor: item {index}: expected (waveform, sample_rate), "
                    f"got {len(item)} values"
                )
            item, sampling_rate = item
        wave = torch.as_tensor(item)
        if not wave.is_floating_point():
            raise ConfigError(
                f"whisper processor: item {index}: expected a float waveform in [-1, 1], "
                f"got dtype {wave.dtype} "
                "(integer PCM: divide by 32768 first)"
            )
        wave = wave.to(torch.float32)
        if wave.dim() == 2:
            wave = wave.mean(dim=0)
        if wave.dim() != 1 or wave.numel() == 0:
            raise ConfigError(
                f"whisper processor: item {index}: expected a non-empty (samples,) or "
                "(channels, samples) waveform, "
                f"got shape {tuple(wave.shape)}"
            )
        if isinstance(sampling_rate, float) and sampling_rate.is_integer():
            sampling_rate = int(sampling_rate)
        if not isinstance(sampling_rate, int) or isinstance(sampling_rate, bool) or sampling_rate <= 0:
            raise ConfigError(
                f"whisper processor: item {index}: sample rate must be a positive int, got {sampling_rate!r}"
            )
        if sampling_rate != SAMPLING_RATE:
            wave = torchaudio.functional.resample(wave, sampling_rate, SAMPLING_RATE)
        return wave

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(items, samples) -> (items, num_mel_bins, samples // 160): Whisper's normalised log-mel."""
        device = waveforms.device
        if device not in self._mel:
            self._mel[device] = torchaudio.transforms.MelSpectrogram(
                sample_rate=SAMPLING_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=self.num_mel_bins,
                power=2.0, norm="slaney", mel_scale="slaney", center=True, pad_mode="reflect",
            ).to(device)  # fmt: skip
        mel = self._mel[device](waveforms)[..., :-1]  # Whisper drops the last STFT frame
        log_spec = mel.clamp(min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_spec + 4.0) / 4.0

    def __call__(
        self,
        items: Sequence[Any],
        sampling_rate: int = SAMPLING_RATE,
        device: str | torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        one_pair = isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], (int, float))
        if getattr(items, "ndim", None) == 1 or one_pair:  # one clip, not a list of them
            items = [items]
        waves = [self.waveform(item, i, sampling_rate) for i, item in enumerate(items)]
        if not waves:
            raise ConfigError("whisper processor: no audio clips given")
        device = device or self.device or waves[0].device
        batch = torch.zeros(len(waves), self.num_samples, device=device)
        for i, wave in enumerate(waves):
            wave = wave[: self.num_samples]
            batch[i, : wave.numel()] = wave.to(device)
        out = {"input_features": self.log_mel(batch)}
        if self.return_mask:
            # frames whose STFT centre (every 160th sample) falls on the clip's samples, as the
            # feature extractor's attention_mask[:, ::hop_length]
            frames = torch.tensor(
                [-(-min(wave.numel(), self.num_samples) // HOP_LENGTH) for wave in waves], device=device
            )
            window = torch.arange(self.num_samples // HOP_LENGTH, device=device)
            out["feature_attention_mask"] = (window < frames[:, None]).to(torch.int32)  # (items, frames)
        return out


def _window_positions(max_seconds: Any, full_positions: int) -> int:
    if max_seconds is None:
        return full_positions
    full_seconds = full_positions * SECONDS_PER_POSITION
    if (
        isinstance(max_seconds, bool)
        or not isinstance(max_seconds, (int, float))
        or not 0 < max_seconds <= full_seconds
    ):
        raise ConfigError(
            f"whisper: max_seconds must be a number in (0, {full_seconds:g}] for this model, "
            f"got {max_seconds!r}"
        )
    positions = max_seconds / SECONDS_PER_POSITION
    if not math.isclose(positions, round(positions), abs_tol=1e-6):
        raise ConfigError(
            f"whisper: max_seconds must be a multiple of {SECONDS_PER_POSITION:g} s "
            f"(one encoder position), got {max_seconds!r}"
        )
    return round(positions)


def trims_padding(recipe: Mapping[str, Any]) -> bool:
    """Whether clips keep only their own positions. A recipe saved before the option existed has no
    ``trim_padding`` key and keeps its behaviour: the whole window per clip."""
    return bool(recipe.get("trim_padding", False))


class WhisperFactory(EncoderFactory):
    """Factory of the ``whisper`` encoder. Recipe: ``config`` (the WhisperConfig encoder fields, with
    ``max_source_positions`` already cut to the window), ``max_seconds`` (the window) and
    ``trim_padding`` (each clip's own positions; absent in recipes saved before it: off)."""

    preset_table = PRESETS
    options = {
        "max_seconds": None,  # window in seconds (multiple of 0.02); None: the model's own (30 s)
        "trim_padding": True,  # each clip keeps the positions its own samples cover (Qwen2-Audio)
    }

    data_key = "audio"  # a training record's "audio" paths are this encoder's items (read by load_item)

    # -- recipe --------------------------------------------------------------------------------------

    def make_recipe(
        self, checkpoint: str | None = None, preset: str | None = None, **options: Any
    ) -> dict[str, Any]:
        opts = self.check_options(options)
        if preset is not None:
            config = WhisperConfig(**PRESETS[self.check_preset(preset)]["config"])
        else:
            try:
                config_dict, _ = WhisperConfig.get_config_dict(checkpoint)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"whisper: cannot read a Whisper config from {checkpoint!r}: {exc}"
                ) from exc
            if config_dict.get("model_type") != "whisper":
                raise ConfigError(
                    f"whisper: {checkpoint!r} holds a {config_dict.get('model_type')!r} model, "
                    "expected a Whisper checkpoint (model_type 'whisper')"
                )
            config = WhisperConfig.from_dict(config_dict)
        fields = {field: getattr(config, field) for field in ENCODER_FIELDS}
        fields["max_source_positions"] = positions = _window_positions(
            opts["max_seconds"], config.max_source_positions
        )
        return {
            "config": fields,
            "max_seconds": round(positions * SECONDS_PER_POSITION, 6),
            "trim_padding": opts["trim_padding"],
        }

    # -- module --------------------------------------------------------------------------------------
    def build_module(self, recipe: Mapping[str, Any], checkpoint: str | None = None) -> WhisperEncoder:
        """The encoder, weights from ``checkpoint`` or random; its position table cut to the window.
        Inside ``with torch.device("meta")`` nothing is allocated."""
        positions = recipe["config"]["max_source_positions"]
        if checkpoint is None:
            return WhisperAudioEncoder._from_config(WhisperConfig(**recipe["config"]))
        encoder = load_checkpoint_part(
            WhisperAudioEncoder, checkpoint, prefix="encoder", family="whisper", part="encoder"
        )
        cut_window(encoder, positions)
        return encoder

    def output_width(self, recipe: Mapping[str, Any]) -> int:
        return recipe["config"]["d_model"]

    def input_names(self, recipe: Mapping[str, Any]) -> list[str]:
        return ["input_features", "feature_attention_mask"] if trims_padding(recipe) else ["input_features"]

    def default_callbacks(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        return {"postprocess_projector": TrimPadding()} if trims_padding(recipe) else {}

    # -- data ----------------------------------------------------------------------------------------
    def processor(self, recipe: Mapping[str, Any]) -> WhisperAudioProcessor:
        return WhisperAudioProcessor(
            recipe["config"]["num_mel_bins"],
            recipe["config"]["max_source_positions"],
            return_mask=trims_padding(recipe),
        )

    def num_tokens(self, recipe: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[int]:
        """Encoder positions per clip: with ``trim_padding`` and the processor's
        ``feature_attention_mask``, those the clip's own frames cover (``positions_of_frames``);
        otherwise the whole window's (half its log-mel frames)."""
        features = inputs["input_features"]
        if getattr(features, "dim", lambda: 0)() != 3:
            raise ConfigError(
                "whisper: input_features must be (items, mel bins, frames), "
                f"got {getattr(features, 'shape', features)!r}"
            )
        mask = inputs.get("feature_attention_mask")
        if trims_padding(recipe) and mask is not None:
            if tuple(mask.shape) != (features.shape[0], features.shape[-1]):
                raise ConfigError(
                    f"whisper: feature_attention_mask must be (items, frames) = "
                    f"{(features.shape[0], features.shape[-1])}, got {tuple(mask.shape)}"
                )
            return [int(n) for n in positions_of_frames(mask.sum(-1)).tolist()]
        return [positions_of_frames(features.shape[-1])] * features.shape[0]

    def dummy_inputs(self, recipe: Mapping[str, Any], batch_size: int = 1) -> dict[str, Any]:
        config = recipe["config"]
        frames = config["max_source_positions"] * FRAMES_PER_POSITION
        inputs = {"input_features": torch.randn(batch_size, config["num_mel_bins"], frames)}
        if trims_padding(recipe):
            # clips that fill the window (a test run's worst case); on the host even in a meta-device
            # dry run, so that the token count can still be read
            inputs["feature_attention_mask"] = torch.ones(batch_size, frames, dtype=torch.int32, device="cpu")
        return inputs

    def dummy_items(self, recipe: Mapping[str, Any], n: int = 1) -> list[Any]:
        """Sine tones: at 16 kHz shorter than the window, and as ``(waveform, 8000)`` longer than it."""
        window = recipe["config"]["max_source_positions"] * FRAMES_PER_POSITION * HOP_LENGTH / SAMPLING_RATE
        items: list[Any] = []
        for i in range(n):
            rate = SAMPLING_RATE if i % 2 == 0 else 8000
            seconds = window * (0.5 if i % 2 == 0 else 1.5)
            t = torch.arange(int(seconds * rate)) / rate
            wave = 0.5 * torch.sin(2 * math.pi * (220.0 * (i + 1)) * t)
            items.append(wave if rate == SAMPLING_RATE else (wave, rate))
        return items
