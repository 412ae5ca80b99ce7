"""Add modality placeholder (and optional start/end) tokens, and any extra special tokens, to a
tokenizer and the LLM's embeddings.

New embedding rows, input and output, start at the mean of the existing rows, as OmniLMM's
``initialize_vision_tokenizer`` does, so a fresh token sits where the model's vocabulary does.
OmniLMM's extra tokens (``<box>``, ``</box>``, ``<ref>``, ``</ref>``, ``<quad>``, ``</quad>``) go in
through ``extra_tokens=``:

>>> added = add_modality_tokens(tokenizer, model, wrap=True,
...                             extra_tokens=["<box>", "</box>", "<ref>", "</ref>", "<quad>", "</quad>"])  # doctest: +SKIP
>>> added["vision"], added.extra["<box>"], added.new_ids                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tokenizers import AddedToken

from mmcore.errors import TokenIdError


def placeholder_token(modality: str) -> str:
    return f"<{modality}>"


def wrap_tokens(modality: str) -> tuple[str, str]:
    return f"<{modality}_start>", f"<{modality}_end>"


class ModalityTokens(dict):
    """What `add_modality_tokens` returns: a dict ``{modality: placeholder_id}`` (as before), plus

    - ``wrap``: ``{modality: (start_id, end_id)}`` (empty without ``wrap=True``);
    - ``extra``: ``{token: id}`` of the ``extra_tokens`` given;
    - ``new_ids``: the sorted ids whose embedding rows this call created and initialised (tokens the
      tokenizer did not have before) -- the rows a "train only the new tokens" stage trains
      (`mmcore.training.apply_stage(model, stage, train_new_token_rows=added.new_ids)`; with
      ``train_new_token_rows=True`` the stage reads the same ids from the model's config);
    - ``all_ids``: every id this call is about (placeholders, wrap and extra tokens), new or not.
    """

    wrap: dict[str, tuple[int, int]]
    extra: dict[str, int]
    new_ids: list[int]

    def __init__(
        self,
        ids: Mapping[str, int],
        wrap: Mapping[str, tuple[int, int]],
        extra: Mapping[str, int],
        new_ids: Sequence[int],
    ):
        super().__init__(ids)
        self.wrap = dict(wrap)
        self.extra = dict(extra)
        self.new_ids = sorted(int(i) for i in new_ids)

    @property
    def all_ids(self) -> list[int]:
        ids = set(self.values()) | set(self.extra.values())
        for pair in self.wrap.values():
            ids.update(pair)
        return sorted(ids)


def add_modality_tokens(
    tokenizer: Any,
    model: Any,
    modalities: Sequence[str] | None = None,
    *,
    wrap: bool = False,
    tokens: Mapping[str, str] | None = None,
    extra_tokens: Sequence[str] = (),
) -> ModalityTokens:
    """Add ``<modality>`` tokens (and ``<modality_start>``/``<modality_end>`` with ``wrap=True``).

    Args:
        tokenizer: the language model's tokenizer; the tokens are added as special tokens (never split).
        model: a `MultimodalModel` (told the ids through ``set_modality_token_ids``) or a bare
            transformers LM (only its embeddings grow).
        modalities: default: the model's encoders.
        wrap: also add start/end tokens around each item's run.
        tokens: modality -> placeholder string, overriding ``<modality>`` (Cornstarch's
            ``predefined_tokens``, e.g. ``{"vision": "<image>"}`` when a data set already writes
            ``<image>``). A token the tokenizer already has keeps its id and its embedding row.
        extra_tokens: more special tokens to add beside them (OmniLMM's ``<box>``, ``<ref>``,
            ``<quad>`` and their closers); recorded in the model's ``config.extra_token_ids``
            (``{token: id}``) so they survive a save and a training stage finds them.

    Resizes the language model's embeddings when the new ids do not fit, initialises every new
    row (input and output embeddings) to the mean of the rows before it, keeps tied embeddings tied,
    and tells the model the ids.

    Returns:
        `ModalityTokens`: ``{modality: placeholder_id}``, with ``.wrap``, ``.extra`` and ``.new_ids``
        (the ids whose rows were created here: what to train when only new token rows train).
    """
    modalities = list(modalities if modalities is not None else model.encoders)
    if not modalities:
        raise TokenIdError("no modalities to add tokens for")
    chosen = dict(tokens or {})
    unknown = sorted(set(chosen) - set(modalities))
    if unknown:
        raise TokenIdError(f"placeholder tokens given for {unknown}, but the modalities are {modalities}")
    names = {m: str(chosen.get(m) or placeholder_token(m)) for m in modalities}
    if len(set(names.values())) != len(names):
        raise TokenIdError(f"each modality needs its own placeholder token, got {names}")
    wraps = {m: wrap_tokens(m) for m in modalities} if wrap else {}
    extra = [str(t) for t in extra_tokens]
    clash = sorted(set(extra) & (set(names.values()) | {t for pair in wraps.values() for t in pair}))
    if clash:
        raise TokenIdError(f"extra tokens {clash} are already modality placeholder or wrap tokens")
    all_tokens = list(dict.fromkeys([*names.values(), *(t for pair in wraps.values() for t in pair), *extra]))
    vocab_before = set(tokenizer.get_vocab())
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in all_tokens], special_tokens=True
    )
    new_ids = sorted(tokenizer.convert_tokens_to_ids(t) for t in all_tokens if t not in vocab_before)
    llm = model.get_base_language_model() if hasattr(model, "get_base_language_model") else model
    if new_ids:
        _grow_embeddings(llm, new_ids, len(tokenizer))
    ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in names.items()}
    wrap_ids = {m: tuple(tokenizer.convert_tokens_to_ids(t) for t in pair) for m, pair in wraps.items()}
    extra_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in extra}
    if hasattr(model, "set_modality_token_ids"):
        model.set_modality_token_ids(ids, wrap_token_ids=wrap_ids or None)
    config = getattr(model, "config", None)
    if extra_ids and config is not None:
        recorded = dict(getattr(config, "extra_token_ids", None) or {})
        config.extra_token_ids = {**recorded, **extra_ids}
    return ModalityTokens(ids, wrap_ids, extra_ids, new_ids)


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
