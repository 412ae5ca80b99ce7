"""Qwen2-Audio's audio path as two built-in callbacks: tokens in proportion to each clip's length.

Qwen2-Audio's tower (transformers' ``Qwen2AudioEncoder``: Whisper's encoder with a stride-2 average
pooling) reads a padded 30 s log-mel window per clip. Its processor also gives
``feature_attention_mask`` ``(clips, frames)``, which says which frames are real. Then:

- `Qwen2AudioPaddingMask` (``preprocess``) turns ``feature_attention_mask`` into the tower's
  attention mask: padded positions after the convolutions are masked as keys, as
  ``Qwen2AudioModel`` does;
- the tower and the projector (a ``linear`` one, Qwen2-Audio's ``multi_modal_projector``) run;
- `Qwen2AudioTrim` (``postprocess_projector``) keeps each clip's own tokens, the count transformers'
  ``Qwen2AudioEncoder._get_feat_extract_output_lengths`` gives (a 3 s clip: 75 tokens), so the result
  is one ``(tokens_i, width)`` tensor per clip.

The encoder routes ``feature_attention_mask`` to the callbacks only:
``ModalEncoderModule(tower, ..., additional_args=["feature_attention_mask"])`` (`qwen2_audio_encoder`
does all of it). `Qwen2AudioTokenCount` is the count per clip for a processor.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from mmcore.builtin.callbacks import Callback
from mmcore.errors import EncoderInputError


def qwen2_audio_output_lengths(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(after the convolutions, after the pooling)`` lengths for clips of ``frames`` mel frames, as
    transformers' ``Qwen2AudioEncoder._get_feat_extract_output_lengths`` computes them."""
    after_conv = (frames - 1) // 2 + 1
    return after_conv, (after_conv - 2) // 2 + 1


def _frames(inputs: dict, where: str) -> torch.Tensor:
    mask = inputs.get("feature_attention_mask")
    if mask is None:
        raise EncoderInputError(
            f"{where}: needs feature_attention_mask (the processor's, one row of frames per clip) routed to the "
            "encoder: ModalEncoderModule(..., additional_args=['feature_attention_mask'])"
        )
    return torch.as_tensor(mask).sum(-1)


class Qwen2AudioPaddingMask(Callback):
    """``feature_attention_mask`` -> the tower's additive attention mask ``(clips, 1, S, S)`` over its
    ``S`` positions after the convolutions: keys past each clip's length are masked."""

    name = "qwen2_audio_padding_mask"
    slot = "preprocess"

    def __call__(self, inputs: dict) -> dict:
        features = inputs["input_features"]
        lengths, _ = qwen2_audio_output_lengths(_frames(inputs, self.name).to(features.device))
        positions = (features.shape[-1] - 2) // 2 + 1
        padded = torch.arange(positions, device=features.device)[None, :] >= lengths[:, None]  # (clips, S)
        dtype = features.dtype if features.is_floating_point() else torch.float32
        mask = torch.zeros(padded.shape, dtype=dtype, device=features.device)
        mask = mask.masked_fill(padded, torch.finfo(dtype).min)
        return {**inputs, "attention_mask": mask[:, None, None, :].expand(-1, 1, positions, -1)}


class Qwen2AudioTrim(Callback):
    """Each clip's own tokens: ``output[0]`` ``(clips, window_tokens, width)`` -> one
    ``(tokens_i, width)`` tensor per clip (``tokens_i`` from `qwen2_audio_output_lengths`)."""

    name = "qwen2_audio_trim"
    slot = "postprocess_projector"

    def __call__(self, inputs: dict, output: Any) -> BaseModelOutput:
        features = output[0]
        _, keep = qwen2_audio_output_lengths(_frames(inputs, self.name))
        return BaseModelOutput(last_hidden_state=[f[: int(n)] for f, n in zip(features, keep.tolist())])

    def token_count(self) -> Qwen2AudioTokenCount:
        """The processor's count for this trim."""
        return Qwen2AudioTokenCount()


class Qwen2AudioTokenCount:
    """Tokens per clip for a processor whose output holds ``feature_attention_mask`` (Qwen2-Audio's:
    the clip's real frames), as `Qwen2AudioTrim` keeps them. A built-in counter: a saved processor
    records it by name and rebuilds it."""

    def params(self) -> dict[str, Any]:
        return {}

    def __call__(self, items: Any, processed: dict) -> list[int]:
        _, keep = qwen2_audio_output_lengths(_frames(processed, "qwen2-audio token count"))
        return [int(n) for n in keep.tolist()]



def qwen2_audio_encoder(tower: torch.nn.Module, projector: Any = None):
    """A `ModalEncoderModule` for transformers' ``Qwen2AudioEncoder`` ``tower`` with Qwen2-Audio's
    masking and per-clip lengths (``projector``: default the model's ``init_projector_type``)."""
    from mmcore.modeling.encoder import ModalEncoderModule

    return ModalEncoderModule(
        tower,
        projector,
        Qwen2AudioPaddingMask(),
        None,
        Qwen2AudioTrim(),
        input_names=["input_features"],
        additional_args=["feature_attention_mask"],
    )
