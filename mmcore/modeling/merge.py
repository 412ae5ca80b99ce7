"""Replace placeholder tokens in the LLM's input embeddings with modality features.

The merge is vectorized and free of host syncs: each modality's placeholder positions come from
``nonzero_static`` (its size, the number of feature rows, is known on the host), and one
``index_put`` writes all rows of all modalities (in place into a fresh embedding lookup, so only the
feature rows are written). Its backward is an ``index`` gather for the
features and an ``index_put`` of zeros for the text embeddings, and autograd keeps only the integer
positions for it; neither calls ``nonzero`` the way ``masked_scatter``'s backward does.

`expand_placeholders` is the text-side companion: it turns one placeholder per item into the run of
placeholders the item's features fill, optionally wrapped in start/end tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmcore.errors import EncoderInputError, PlaceholderMismatchError, TokenIdError

MERGE_CHECKS = ("auto", "eager", "async", "off")


def flatten_features(features: torch.Tensor | Sequence[torch.Tensor], modality: str) -> torch.Tensor:
    """``(items, tokens, width)`` or a list of ``(tokens_i, width)`` -> ``(total_tokens, width)``."""
    if isinstance(features, torch.Tensor):
        if features.dim() == 3:
            return features.reshape(-1, features.shape[-1])
        if features.dim() == 2:
            return features
        raise PlaceholderMismatchError(
            f"{modality}: expected features of shape (items, tokens, width) or (tokens, width), "
            f"got {tuple(features.shape)}"
        )
    return torch.cat([flatten_features(f, modality) for f in features], dim=0)


def placeholder_masks(input_ids: torch.Tensor, token_ids: Mapping[str, int]) -> dict[str, torch.Tensor]:
    return {modality: input_ids == token_id for modality, token_id in token_ids.items()}


def merge_modality_features(
    inputs_embeds: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    features: Mapping[str, torch.Tensor],
    check: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """Write ``features[m]`` rows, in order, at the positions where ``masks[m]`` is set.

    Args:
        inputs_embeds: ``(batch, seq, width)`` text embeddings.
        masks: modality -> ``(batch, seq)`` bool placeholder mask.
        features: modality -> ``(total_tokens, width)`` (see `flatten_features`); modalities absent
            here are left untouched.
        check: how to verify placeholder and feature counts agree. ``eager`` raises
            `PlaceholderMismatchError` with both numbers (reads the counts on the host); ``async``
            asserts on the device without waiting (no host sync; on CUDA a failure is a device-side
            assert); ``off`` trusts the caller; ``auto`` is ``eager`` on CPU, ``async`` elsewhere.
        inplace: write the rows into ``inputs_embeds`` itself and return it, instead of a copy. Only
            the feature rows are written, not the whole ``(batch, seq, width)`` tensor again. For a
            tensor the caller owns, such as a fresh embedding lookup (what `MultimodalModel` does);
            autograd refuses it on a leaf that requires grad.
    """
    if not features:
        return inputs_embeds
    batch, seq, width = inputs_embeds.shape
    rows, positions = [], []
    counts: list[tuple[str, torch.Tensor, int]] = []
    for modality, feats in features.items():
        if feats.shape[-1] != width:
            raise PlaceholderMismatchError(
                f"{modality}: features have width {feats.shape[-1]} but the language model's embeddings "
                f"have width {width}"
            )
        mask = masks[modality].reshape(-1)
        counts.append((modality, mask.sum(), feats.shape[0]))
        # The number of rows is known on the host (the features' shape), so the positions come from
        # nonzero_static: no device->host sync, unlike nonzero/masked_scatter.
        positions.append(torch.nonzero_static(mask, size=feats.shape[0], fill_value=-1).squeeze(1))
        rows.append(feats.to(inputs_embeds.dtype))
    _check_counts(counts, check, inputs_embeds.device)
    table = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    index = torch.cat(positions) if len(positions) > 1 else positions[0]
    if table.shape[0] == 0:
        return inputs_embeds
    # index_put rather than index_copy: its autograd keeps only the index for backward, where
    # index_copy also keeps the feature rows (a full (rows, width) copy per step).
    if inplace:
        # (batch, position) indices into the 3-d tensor itself: an in-place write through a flat view
        # would make autograd's view-rebase copy the whole gradient once more in the backward.
        return inputs_embeds.index_put_((index // seq, index % seq), table)
    merged = inputs_embeds.reshape(batch * seq, width).index_put((index,), table)
    return merged.view(batch, seq, width)


def check_placeholders_have_inputs(
    masks: Mapping[str, torch.Tensor], features: Mapping[str, torch.Tensor], check: str = "auto"
) -> None:
    """Training guard: every modality whose placeholders appear in ``masks`` must have features in
    this call; otherwise the loss would be learnt from placeholder embeddings. ``check`` as in
    `merge_modality_features` (``eager`` raises `EncoderInputError` naming the modality and count;
    ``async`` asserts on the device, no host sync)."""
    absent = [(modality, mask) for modality, mask in masks.items() if modality not in features]
    if not absent or check == "off":
        return
    device = absent[0][1].device
    if check == "auto":
        check = "eager" if device.type == "cpu" else "async"
    if check == "async":
        for modality, mask in absent:
            torch._assert_async(~mask.any(), f"{modality}: placeholder tokens in input_ids but no {modality} inputs")
        return
    found = torch.stack([mask.sum() for _, mask in absent]).tolist()
    for (modality, _), n_tokens in zip(absent, found):
        if n_tokens:
            raise EncoderInputError(
                f"{modality}: input_ids hold {n_tokens} {modality} placeholder tokens but no {modality} inputs "
                f"came; training on them would learn from placeholder embeddings. Pass the {modality} "
                "inputs, or drop the placeholders from the text"
            )


def _check_counts(counts: list[tuple[str, torch.Tensor, int]], check: str, device: torch.device) -> None:
    if check not in MERGE_CHECKS:
        raise ValueError(f"merge check must be one of {MERGE_CHECKS}, got {check!r}")
    if check == "auto":
        check = "eager" if device.type == "cpu" else "async"
    if check == "off":
        return
    if check == "async":
        for modality, n_tokens, n_features in counts:
            torch._assert_async(
                n_tokens == n_features, f"{modality}: placeholder tokens and features differ in number"
            )
        return
    found = torch.stack([n for _, n, _ in counts]).tolist()
    for (modality, _, n_features), n_tokens in zip(counts, found):
        if n_tokens != n_features:
            raise PlaceholderMismatchError(
                f"{modality}: {n_tokens} placeholder tokens but {n_features} features; each item must expand "
                "to as many placeholders as its encoder+projector yields tokens"
            )


def expand_placeholders(
    input_ids: Sequence[int],
    token_ids: Mapping[str, int],
    num_tokens: Mapping[str, Sequence[int]],
    wrap: Mapping[str, tuple[int, int]] | None = None,
) -> list[int]:
    """Expand each single placeholder in a token list into its run of placeholders.

    Args:
        input_ids: one sample's token ids, one placeholder per item.
        token_ids: modality -> placeholder id.
        num_tokens: modality -> number of tokens of each of that modality's items, in order.
        wrap: modality -> ``(start_id, end_id)`` to put around each run (``<im_start>``/``<im_end>``).

    >>> expand_placeholders([5, 9, 6], {"vision": 9}, {"vision": [3]}, wrap={"vision": (1, 2)})
    [5, 1, 9, 9, 9, 2, 6]
    """
    by_id = {token_id: modality for modality, token_id in token_ids.items()}
    if len(by_id) != len(token_ids):
        raise TokenIdError(f"two modalities share a placeholder id: {dict(token_ids)}")
    wrap = wrap or {}
    seen = {modality: 0 for modality in token_ids}
    out: list[int] = []
    for token in input_ids:
        modality = by_id.get(int(token))
        if modality is None:
            out.append(int(token))
            continue
        counts = num_tokens.get(modality, ())
        if seen[modality] >= len(counts):
            raise PlaceholderMismatchError(
                f"{modality}: more placeholders in the text than items given ({len(counts)})"
            )
        run = [token_ids[modality]] * int(counts[seen[modality]])
        if modality in wrap:
            start, end = wrap[modality]
            run = [start, *run, end]
        out.extend(run)
        seen[modality] += 1
    for modality, counts in num_tokens.items():
        if seen.get(modality, 0) != len(counts):
            raise PlaceholderMismatchError(
                f"{modality}: {len(counts)} items given but {seen.get(modality, 0)} placeholders in the text"
            )
    return out
