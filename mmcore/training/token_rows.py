"""Train only the new token rows of the embeddings: OmniLMM's ``tune_mm_mlp_adapter`` with
``orig_embeds_params``, as hooks on the model, so mmcore's loop and HF ``Trainer`` both honour it.

`train_token_rows` makes the language model's input embedding weight (and the output embedding
weight, when it is not tied to it) trainable, but only at the given rows -- by default the tokens
mmcore added (`new_token_ids`: the modality placeholders, their start/end tokens and the extra
tokens `add_modality_tokens` recorded). Every other row stays bit-identical through any number of
optimizer steps:

- a gradient hook on each weight zeroes the gradient of the old rows, so Adam/AdamW (and SGD) move
  them by exactly nothing (a zero gradient from a fresh optimizer state gives a zero update);
- weight decay does not look at gradients: a process-wide optimizer step hook (``torch.optim``'s
  ``register_optimizer_step_pre_hook`` / ``_post_hook``) keeps a copy of the old rows of such a weight
  before a step of a parameter group that decays it, and writes them back after the step. (mmcore's
  `param_groups` puts these weights among the groups without decay, so its own loop needs no copy.)

Tied weights stay one tensor, so they stay tied. The hooks live on the weights: call
`train_token_rows` again after ``resize_token_embeddings`` (which makes new weights) and before FSDP
sharding is not supported (sharding replaces the weights).

>>> apply_stage(model, "align", train_new_token_rows=True)            # doctest: +SKIP
>>> handle = train_token_rows(model, [32000, 32001]); ...; handle.remove()   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmcore.errors import ConfigError

#: the attribute a weight carries while only some of its rows train: the trainable rows (a CPU tensor)
ROWS_ATTRIBUTE = "_mmcore_trainable_rows"


def new_token_ids(model: nn.Module) -> list[int]:
    """The ids of the tokens mmcore adds to a language model: every modality placeholder, start/end
    (wrap) token, and the extra tokens recorded in ``config.extra_token_ids`` (when there are any)."""
    ids = set(model.modality_token_ids.values())
    for pair in (getattr(model.config, "modality_wrap_token_ids", None) or {}).values():
        ids.update(pair)
    extra = getattr(model.config, "extra_token_ids", None) or ()
    ids.update(extra.values() if isinstance(extra, Mapping) else extra)
    return sorted(int(i) for i in ids)


@dataclass
class TokenRows:
    """What `train_token_rows` set up: the weights, the trainable ``rows``; `remove` undoes it (the
    weights keep their values and ``requires_grad``)."""

    weights: list[nn.Parameter]
    rows: list[int]
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for weight in self.weights:
            if hasattr(weight, ROWS_ATTRIBUTE):
                delattr(weight, ROWS_ATTRIBUTE)
        self.handles = []


def embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    """The language model's input embedding weight, and its output embedding weight when that is
    another tensor (untied)."""
    llm = model.get_base_language_model() if hasattr(model, "get_base_language_model") else model
    weights = [llm.get_input_embeddings().weight]
    output = llm.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    return weights


def train_token_rows(model: nn.Module, token_ids: Iterable[int] | None = None) -> TokenRows:
    """Let only the rows ``token_ids`` (default: `new_token_ids`) of the input and output embeddings
    train; every other row stays bit-identical after optimizer steps, weight decay included. Calling
    it again replaces the rows. Returns a `TokenRows` (``.remove()`` undoes it)."""
    rows = sorted({int(i) for i in (new_token_ids(model) if token_ids is None else token_ids)})
    weights = embedding_weights(model)
    if not rows:
        raise ConfigError("no token rows to train: the model has no modality tokens and no ids were given")
    size = weights[0].shape[0]
    if rows[0] < 0 or rows[-1] >= size:
        raise ConfigError(f"token ids {rows} fall outside the embedding's {size} rows")
    stop_token_rows(model)
    _install_optimizer_hooks()
    result = TokenRows(weights, rows)
    index = torch.tensor(rows, dtype=torch.long)
    for weight in weights:
        weight.requires_grad_(True)
        setattr(weight, ROWS_ATTRIBUTE, index)
        result.handles.append(weight.register_hook(_GradientMask(index, weight.shape[0])))
    model._mmcore_token_rows = result  # one set-up per model: a second call replaces it
    return result


def stop_token_rows(model: nn.Module) -> None:
    """Undo `train_token_rows` on ``model`` (if it was set up); `apply_stage` calls it first."""
    previous = getattr(model, "_mmcore_token_rows", None)
    if previous is not None:
        previous.remove()
        del model._mmcore_token_rows


def has_token_rows(param: torch.Tensor) -> bool:
    """Whether only some rows of ``param`` train (`train_token_rows`)."""
    return getattr(param, ROWS_ATTRIBUTE, None) is not None


class _GradientMask:
    """A tensor hook: the gradient with every row but the trainable ones set to zero."""

    def __init__(self, rows: torch.Tensor, size: int):
        self.rows, self.size, self.masks = rows, size, {}

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        frozen = self.masks.get(grad.device)
        if frozen is None:
            frozen = torch.ones(self.size, 1, dtype=torch.bool, device=grad.device)
            frozen[self.rows.to(grad.device)] = False
            self.masks[grad.device] = frozen
        return grad.masked_fill(frozen, 0)


_installed = False
_saved: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def _install_optimizer_hooks() -> None:
    """Once per process: around every optimizer step, keep and restore the frozen rows of partly
    trainable weights in groups that decay them (nothing happens for other parameters)."""
    global _installed
    if not _installed:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_keep_frozen_rows)
        register_optimizer_step_post_hook(_restore_frozen_rows)
        _installed = True


@torch.no_grad()
def _keep_frozen_rows(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    kept = []
    for group in optimizer.param_groups:
        if not group.get("weight_decay"):
            continue
        for param in group["params"]:
            rows = getattr(param, ROWS_ATTRIBUTE, None)
            if rows is None:
                continue
            frozen = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
            frozen[rows.to(param.device)] = False
            index = frozen.nonzero().squeeze(1)
            kept.append((param, index, param.detach().index_select(0, index)))
    if kept:
        _saved[id(optimizer)] = kept
    else:  # nothing left over from a step that raised
        _saved.pop(id(optimizer), None)


@torch.no_grad()
def _restore_frozen_rows(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for param, index, values in _saved.pop(id(optimizer), ()):
        param.detach().index_copy_(0, index, values)
