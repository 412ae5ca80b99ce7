"""The Qwen2-VL / Qwen2.5-VL vision towers split where mmcore splits an encoder: the tower (patch
embedding, rotary positions, blocks) and the patch merger, which is the projector.

Notation: ``P`` patches of all items together (one flat sequence, no padding), ``P_i`` of item ``i``
(``t * h * w`` of its grid), ``U = spatial_merge_size ** 2`` patches per merged token (4), ``D`` the
tower's width, ``W`` the language model's.

- `Qwen2VLVisionTower` / `Qwen25VLVisionTower`: transformers' own tower classes with their forward,
  whose ``merger`` is replaced by `MergeUnits` (no weights): the blocks' output comes back as
  ``(P / U, U * D)`` rows in item order (for Qwen2.5-VL, transformers' window order is undone there,
  on whole 2x2 units, exactly as its merger's output is reordered). The forward returns one
  ``(P_i, D)`` tensor per item.
- `Qwen2VLMergerProjection` / `Qwen25VLMergerProjection`: transformers' ``PatchMerger`` /
  ``Qwen2_5_VLPatchMerger`` (same weights and names), taking those per-item tensors and giving one
  ``(P_i / U, W)`` tensor per item (the merge's per-item form); registered as the projector types
  ``qwen2_vl_merger`` / ``qwen2_5_vl_merger``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPatchMerger,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger, Qwen2VisionTransformerPretrainedModel

from mmcore.errors import ConfigError, EncoderInputError

MERGE_SIZE = 2  # every released Qwen2-VL / Qwen2.5-VL tower merges 2x2 patches
#: the tower's children that move between transformers' tower and the plugin's (the merger is the projector's)
TOWER_PARTS = ("patch_embed", "rotary_pos_emb", "blocks")
#: what a whole-model checkpoint holds besides the tower: skipped quietly when the tower loads
OTHER_WEIGHTS = [r"language_model\.", r"^lm_head\."]


class MergeUnits(nn.Module):
    """Stands in for the tower's merger: ``(P, D)`` -> ``(P / U, U * D)``, each row one 2x2 unit (the
    rows transformers' Qwen2.5-VL forward puts back in item order after its window attention)."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.reshape(-1, self.unit * hidden_states.shape[-1])


def _split_items(
    tower: nn.Module, forward: Any, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, kwargs: dict
) -> BaseModelOutput:
    """transformers' tower ``forward`` on the flat patches, its output split into one ``(P_i, D)`` per item."""
    if image_grid_thw is None or image_grid_thw.dim() != 2 or image_grid_thw.shape[-1] != 3:
        raise EncoderInputError(
            f"{type(tower).__name__}: needs the grid of each item, (items, 3) as (t, h, w) patches, got "
            f"{None if image_grid_thw is None else tuple(image_grid_thw.shape)}"
        )
    sizes = image_grid_thw.prod(-1).tolist()  # P_i; one host read, as transformers' own split
    if sum(sizes) != pixel_values.shape[0]:
        raise EncoderInputError(
            f"{type(tower).__name__}: the grids cover {sum(sizes)} patches but pixel_values has {pixel_values.shape[0]} rows"
        )
    if pixel_values.is_meta:  # a dry run: the grid's bookkeeping on the host, the compute on meta
        kwargs = {**_host_indices(tower, image_grid_thw), **kwargs}
    out = forward(pixel_values.type(tower.dtype), grid_thw=image_grid_thw, **kwargs)
    patches = out.pooler_output.reshape(-1, out.last_hidden_state.shape[-1])  # (P, D) in item order
    return BaseModelOutput(last_hidden_state=list(patches.split(sizes)), hidden_states=out.hidden_states)


def _host_indices(tower: nn.Module, grid: torch.Tensor) -> dict[str, Any]:
    """The index tensors transformers' tower derives from the grid, computed on the host (for meta
    inputs: a grid's values cannot be read there); the rotary positions then move to meta."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grid = grid.cpu()
    with torch.device("cpu"):  # a dry run builds inside torch.device("meta")
        out = {"position_ids": get_vision_position_ids(grid, tower.spatial_merge_size).to("meta")}
        if hasattr(tower, "window_size"):  # Qwen2.5-VL's windows
            out["window_index"], out["cu_window_seqlens"] = get_vision_window_index(
                grid,
                spatial_merge_size=tower.spatial_merge_size,
                window_size=tower.window_size,
                patch_size=tower.patch_size,
            )
    return out


class _WithoutMerger:
    """What a tower of transformers' without its merger is (the merger is the encoder's projector): its
    merger replaced by `MergeUnits`, and ``forward`` giving a list of ``(P_i, D)``, one per item
    (`_split_items`). First base of `Qwen2VLVisionTower` and `Qwen25VLVisionTower`."""

    def __init__(self, config: Qwen2VLVisionConfig | Qwen2_5_VLVisionConfig) -> None:
        super().__init__(config)
        self.merger = MergeUnits(config.spatial_merge_size**2)

    def forward(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs: Any
    ) -> BaseModelOutput:
        return _split_items(self, super().forward, pixel_values, image_grid_thw, kwargs)


class Qwen2VLVisionTower(_WithoutMerger, Qwen2VisionTransformerPretrainedModel):
    """transformers' Qwen2-VL tower without its merger: ``pixel_values`` ``(P, C * 2 * 14 * 14)`` and
    ``image_grid_thw`` ``(items, 3)`` -> ``last_hidden_state``: a list of ``(P_i, D)`` per item."""


class Qwen25VLVisionTower(_WithoutMerger, Qwen2_5_VisionTransformerPretrainedModel):
    """transformers' Qwen2.5-VL tower without its merger (window attention inside, item order out):
    ``pixel_values`` ``(P, C * 2 * 14 * 14)`` and ``image_grid_thw`` -> a list of ``(P_i, D)``."""


class Qwen2VLCheckpointTower(Qwen2VisionTransformerPretrainedModel):
    """transformers' Qwen2-VL tower as it loads from a whole-model checkpoint (merger included)."""

    _keys_to_ignore_on_load_unexpected = OTHER_WEIGHTS


class Qwen25VLCheckpointTower(Qwen2_5_VisionTransformerPretrainedModel):
    """transformers' Qwen2.5-VL tower as it loads from a whole-model checkpoint (merger included)."""

    _keys_to_ignore_on_load_unexpected = OTHER_WEIGHTS


class MergerProjection:
    """Per-item features in, per-item tokens out; the merge of all items is one call of the merger."""

    unit = MERGE_SIZE**2

    @classmethod
    def from_projector_config(cls, config: Any) -> nn.Module:
        """The registered projector's factory: ``in_features`` (the tower's width) -> ``out_features``."""
        if config.in_features is None or config.out_features is None:
            raise ConfigError(f"{cls.__name__}: needs in_features (the tower's width) and out_features")
        return cls(dim=config.out_features, context_dim=config.in_features, spatial_merge_size=MERGE_SIZE)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """``U`` patches become one token: an item of ``t * h * w`` patches gives ``t * h * w / 4``."""
        return int(num_input_tokens) // self.unit

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(features, torch.Tensor):
            return super().forward(features)  # (P, D) -> (P / U, W), as transformers' merger
        sizes = [f.shape[0] // self.unit for f in features]
        merged = super().forward(torch.cat(list(features)))  # (P / U, W)
        return list(merged.split(sizes))


class Qwen2VLMergerProjection(MergerProjection, PatchMerger):
    """transformers' Qwen2-VL ``PatchMerger`` (LayerNorm, 2x2 concatenated, Linear-GELU-Linear) on
    per-item features."""


class Qwen25VLMergerProjection(MergerProjection, Qwen2_5_VLPatchMerger):
    """transformers' ``Qwen2_5_VLPatchMerger`` (RMSNorm, 2x2 concatenated, Linear-GELU-Linear) on
    per-item features."""
