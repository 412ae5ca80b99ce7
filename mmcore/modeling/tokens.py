"""Add modality placeholder (and optional start/end) tokens to a tokenizer and the LLM's embeddings.

New embedding rows, input and output, start at the mean of the existing rows, as OmniLMM's
``initialize_vision_tokenizer`` does, so a fresh token sits where the model's vocabulary does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import AddedToken

from mmcore.errors import TokenIdError


def placeholder_token(modality: str) -> str:
    return f"<{modality}>"


def wrap_tokens(modality: str) -> tuple[str, str]:
    return f"<{modality}_start>", f"<{modality}_end>"


def add_modality_tokens(
    tokenizer: Any,
    model: Any,
    modalities: Sequence[str] | None = None,
    *,
    wrap: bool = False,
) -> dict[str, int]:
    """Add ``<modality>`` tokens (and ``<modality_start>``/``<modality_end>`` with ``wrap=True``).

    Resizes the language model's embeddings when the new ids do not fit, initialises every new
    row (input and output embeddings) to the mean of the rows before it, keeps tied embeddings tied,
    and tells the model the ids (`MultimodalModel.set_modality_token_ids`). Returns
    ``{modality: placeholder_id}``.
    """
    modalities = list(modalities if modalities is not None else model.encoders)
    if not modalities:
        raise TokenIdError("no modalities to add tokens for")
    names = {m: placeholder_token(m) for m in modalities}
    wraps = {m: wrap_tokens(m) for m in modalities} if wrap else {}
    all_tokens = [*names.values(), *(t for pair in wraps.values() for t in pair)]
    vocab_before = set(tokenizer.get_vocab())
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in all_tokens], special_tokens=True
    )
    new_ids = sorted(
        tokenizer.convert_tokens_to_ids(t) for t in all_tokens if t not in vocab_before
    )
    llm = model.get_base_language_model() if hasattr(model, "get_base_language_model") else model
    if new_ids:
        _grow_embeddings(llm, new_ids, len(tokenizer))
    ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in names.items()}
    wrap_ids = {m: tuple(tokenizer.convert_tokens_to_ids(t) for t in pair) for m, pair in wraps.items()}
    if hasattr(model, "set_modality_token_ids"):
        model.set_modality_token_ids(ids, wrap_ids or None)
    return ids


@torch.no_grad()
def _grow_embeddings(llm: Any, new_ids: list[int], tokenizer_size: int) -> None:
    rows = llm.get_input_embeddings().weight.shape[0]
    if max(new_ids) >= rows:
        llm.resize_token_embeddings(max(tokenizer_size, max(new_ids) + 1), mean_resizing=False)
    first_new = min(new_ids)
    index = torch.tensor(new_ids, device=llm.get_input_embeddings().weight.device)
    weights = [llm.get_input_embeddings().weight]
    output = llm.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    for weight in weights:
        mean = weight[:first_new].float().mean(dim=0).to(weight.dtype)
        weight.index_copy_(0, index, mean.expand(len(new_ids), -1).contiguous())
        if output is not None and weight is output.weight and getattr(output, "bias", None) is not None:
            output.bias[index] = output.bias[:first_new].mean()
