"""Packing: several samples in one row of the batch, each attending only to itself.

A packed batch has no ``attention_mask``; its ``position_ids`` restart at 0 at every sample, and
transformers reads them as sample boundaries: `transformers.masking_utils` (``find_packed_sequence_indices``)
turns them into a block-diagonal causal mask for SDPA, eager and flex attention, and flash-attention
takes the boundaries as varlen ``cu_seq_lens`` (given in the batch too, so that rows > 1 work there:
flash-attention infers boundaries from positions only for a single row). The label of each sample's
first token is -100, as in a row alone, where nothing predicts it; so the loss, and the count of
label tokens that normalises it (``num_items_in_batch``), take every real token exactly once. The
padding that fills a row up is one more block of its own (positions from 0, labels -100).

Rows are laid out with transformers' `DataCollatorWithFlattening` (one row each) and filled
first-fit decreasing (`plan_rows`). `MultimodalCollator(processor, pack_to=N)` packs this way.

A packed batch also carries ``use_cache=False``: a language model that makes a cache in training
(``config.use_cache``, as under `transformers.Trainer`) would otherwise skip the packed-sequence
detection, which transformers only does without a cache.

Notation: R rows, W tokens per row (the longest row, padded up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmcore.errors import ConfigError

IGNORE = -100


def plan_rows(
    lengths: Sequence[int], capacity: int, *, keep_order: bool = False, even: bool = False
) -> list[list[int]]:
    """Sample indices per row, each row's lengths summing to at most ``capacity``.

    First-fit decreasing (the longest sample first, into the first row it fits); with
    ``keep_order``, next-fit in the given order (rows are runs of consecutive samples). A sample
    longer than ``capacity`` gets a row of its own. Each row lists its samples in index order.
    ``even``: as many rows as at ``capacity``, filled as evenly as first-fit decreasing can at the
    smallest capacity that still needs no more rows (rows are padded to the longest: less padding).
    """
    if capacity < 1:
        raise ConfigError(f"pack_to must be >= 1, got {capacity}")
    if even and not keep_order:
        rows = plan_rows(lengths, capacity)
        low = max([-(-sum(lengths) // len(rows))] + [n for n in lengths if n <= capacity] + [1])
        high = capacity  # fits in len(rows) rows; find the smallest that still does
        while low < high:
            middle = (low + high) // 2
            if len(plan_rows(lengths, middle)) <= len(rows):
                high = middle
            else:
                low = middle + 1
        return plan_rows(lengths, high)
    rows: list[list[int]] = []
    room: list[int] = []
    if keep_order:
        for index, length in enumerate(lengths):
            if rows and length <= room[-1]:
                rows[-1].append(index)
                room[-1] -= length
            else:
                rows.append([index])
                room.append(capacity - length)
        return rows
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        row = next((r for r, free in enumerate(room) if length <= free), None)
        if row is None:
            rows.append([index])
            room.append(capacity - length)
        else:
            rows[row].append(index)
            room[row] -= length
    return [sorted(row) for row in rows]


def pack(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    rows: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """``(ids, labels)`` per sample, and the samples of each row (`plan_rows`) -> a packed batch:
    ``input_ids``, ``labels``, ``position_ids`` (R, W), flash-attention's ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` over the R x W tokens, and ``use_cache=False``."""
    from transformers import DataCollatorWithFlattening
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE, return_tensors="pt")
    laid = [
        flatten([{"input_ids": list(samples[i][0]), "labels": list(samples[i][1])} for i in row]) for row in rows
    ]  # one (1, tokens of the row) row each
    width = max(row["input_ids"].shape[1] for row in laid)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids, labels, positions = [], [], []
    for row in laid:
        pad = width - row["input_ids"].shape[1]
        ids.append(torch.cat([row["input_ids"][0], torch.full((pad,), pad_token_id, dtype=torch.long)]))
        labels.append(torch.cat([row["labels"][0], torch.full((pad,), IGNORE, dtype=torch.long)]))
        positions.append(torch.cat([row["position_ids"][0], torch.arange(pad, dtype=torch.long)]))
    batch: dict[str, Any] = {
        "input_ids": torch.stack(ids),  # (R, W)
        "labels": torch.stack(labels),  # (R, W)
        "position_ids": torch.stack(positions),  # (R, W), from 0 at every sample and at the padding
    }
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    batch.update(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))
    batch["use_cache"] = False
    return batch


def reorder_items(
    inputs: dict[str, dict[str, Any]], order: dict[str, list[int]]
) -> dict[str, dict[str, Any]] | None:
    """Processed items (modality -> the processor's output, one row per item) in a new item order;
    None when some output does not hold one row per item (it cannot be reordered). A flat patch
    sequence with its grids (Qwen2-VL's ``pixel_values`` beside ``image_grid_thw``: ``t * h * w`` rows
    per item) moves item by item too."""
    out: dict[str, dict[str, Any]] = {}
    for modality, processed in inputs.items():
        indices = order[modality]
        patches = _patches_per_item(processed, len(indices))  # rows of each item in a flat patch sequence
        moved: dict[str, Any] = {}
        for key, value in processed.items():
            flat = patches is not None and isinstance(value, torch.Tensor) and value.dim() > 0
            if flat and value.shape[0] == sum(patches):
                pieces = value.split(patches)
                moved[key] = torch.cat([pieces[i] for i in indices])
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == len(indices):
                moved[key] = value[torch.tensor(indices, dtype=torch.long)]
            elif isinstance(value, (list, tuple)) and len(value) == len(indices):
                moved[key] = type(value)(value[i] for i in indices)
            else:
                return None
        out[modality] = moved
    return out


def _patches_per_item(processed: dict[str, Any], items: int) -> list[int] | None:
    """Rows per item of a flat patch sequence: the product of each item's ``*_grid_thw`` row (None
    without such grids)."""
    grids = [v for k, v in processed.items() if k.endswith("_grid_thw") and isinstance(v, torch.Tensor)]
    if len(grids) != 1 or grids[0].dim() != 2 or grids[0].shape[0] != items:
        return None
    patches = grids[0].prod(-1).tolist()
    return patches if sum(patches) != items else None  # one patch each: the per-item rule already fits
