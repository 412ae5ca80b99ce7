"""Training stages (Prismatic/LLaVA style) and optimizer parameter groups.

A stage chooses what trains in a `MultimodalModel`. `STAGES` is the one table of them (name ->
`Stage`: what trains, and why one would pick it); ``mmcore train --stage``, ``mmcore test-run
--train`` and ``mmcore assemble --dry-run`` all read it:

========== ====================================================================================
``align``    the projectors only (encoders and the LLM frozen) -- LLaVA's pre-training stage
``lora``     LoRA adapters on the LLM (and, with ``lora_on_encoders=True``, on the encoders),
             plus the projectors trained in full; every base weight frozen
``finetune`` the projectors and the whole LLM (encoders frozen) -- LLaVA's instruction tuning
``full``     everything, encoders included
========== ====================================================================================

>>> report = apply_stage(model, "align")          # doctest: +SKIP
>>> console.print(report)                          # a rich table: part, trainable, total, %
>>> optimizer = torch.optim.AdamW(param_groups(model, lr=2e-5, projector_lr=1e-3))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmcore.errors import ConfigError

if TYPE_CHECKING:  # the table of stages is read by CLI help, which imports no torch
    from torch import nn



@dataclass(frozen=True)
class Stage:
    """One training stage: its ``name``, what ``trains`` (a few words, as tables show it), a
    ``description`` (a sentence), and whether it adds LoRA adapters (``lora``)."""

    name: str
    trains: str
    description: str
    lora: bool = False

    def what_trains(self, lora_r: int | None = None) -> str:
        """`trains`, with the LoRA rank when given: ``projectors + LoRA r=16 on the LLM's linears``."""
        if lora_r is None or not self.lora:
            return self.trains
        return self.trains.replace("LoRA", f"LoRA r={lora_r}", 1)


#: The stages, from the least to the most that trains: name -> `Stage`.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "align", "projectors", "the projectors only (encoders and the LLM frozen): LLaVA's pre-training stage"
        ),
        Stage(
            "lora",
            "projectors + LoRA on the LLM's linears",
            "LoRA adapters on the LLM (optionally on the encoders too) and the projectors in full; every base "
            "weight frozen",
            lora=True,
        ),
        Stage(
            "finetune",
            "projectors + LLM",
            "the projectors and the whole LLM (encoders frozen): LLaVA's instruction tuning",
        ),
        Stage("full", "everything", "every parameter, encoders included"),
    )
}


@dataclass(frozen=True)
class StageReport:
    """What trains after a stage: one row per part, ``(part, trainable, total)`` parameter counts.

    Renders as a rich table (``console.print(report)``); `as_dict` gives the data.
    """

    stage: str
    rows: tuple[tuple[str, int, int], ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def trainable(self) -> int:
        return sum(row[1] for row in self.rows)

    @property
    def total(self) -> int:
        return sum(row[2] for row in self.rows)

    def as_dict(self) -> dict[str, Any]:
        """``{"stage": ..., "parts": {part: {"trainable": n, "total": n}}, "trainable": n, "total": n}``."""
        return {
            "stage": self.stage,
            "parts": {part: {"trainable": t, "total": n} for part, t, n in self.rows},
            "trainable": self.trainable,
            "total": self.total,
        }

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(
            title=f"stage {self.stage!r}: trainable parameters", caption="; ".join(self.notes) or None
        )
        table.add_column("part")
        table.add_column("trainable", justify="right")
        table.add_column("total", justify="right")
        table.add_column("%", justify="right")
        for part, trainable, total in (*self.rows, ("all", self.trainable, self.total)):
            share = f"{100 * trainable / total:.1f}" if total else "-"
            table.add_row(part, f"{trainable:,}", f"{total:,}", share)
        return table

    def __str__(self) -> str:
        lines = [f"stage {self.stage}: {self.trainable:,} of {self.total:,} parameters train"]
        lines += [f"  {part:<24} {t:>12,} / {n:,}" for part, t, n in self.rows]
        return "\n".join(lines)


def stage_report(model: nn.Module, stage: str = "current", notes: Sequence[str] = ()) -> StageReport:
    """The trainable-parameter table of ``model`` as it stands."""
    rows = tuple((part, t, n) for part, (t, n) in model.trainable_parameters().items())
    return StageReport(stage, rows, tuple(notes))


def apply_stage(
    model: nn.Module,
    stage: str,
    *,
    lora_r: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    lora_target_modules: str | list[str] = "all-linear",
    lora_on_encoders: bool = False,
    train_new_token_rows: bool | Sequence[int] | None = None,
) -> StageReport:
    """Set what trains in ``model`` (a `MultimodalModel`) for ``stage`` and return the table.

    Only ``requires_grad`` changes (plus, for ``lora``, the LLM gets wrapped by PEFT and, with
    ``lora_on_encoders``, LoRA layers are injected into the encoders). ``lora_alpha`` defaults to
    ``2 * lora_r``. Applying ``lora`` to a model that already has adapters reuses them.

    ``train_new_token_rows``: also train the rows of the input and output embeddings of the tokens
    mmcore added (``True``: `mmcore.training.token_rows.new_token_ids`) or of the ids given, and only
    those rows: every other row stays bit-identical through optimizer steps, weight decay included,
    in mmcore's loop and in HF ``Trainer`` alike (OmniLMM's ``tune_mm_mlp_adapter``; see
    `mmcore.training.token_rows.train_token_rows`).
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; expected one of {', '.join(STAGES)}")
    if getattr(model, "_mmcore_token_rows", None) is not None:  # an earlier stage's new-token rows end here
        from mmcore.training.token_rows import stop_token_rows

        stop_token_rows(model)
    projectors = {f"{name}.projector": True for name in model.encoders}
    notes: list[str] = []
    if stage == "align":
        model.set_trainable({"*": False, **projectors})
    elif stage == "finetune":
        model.set_trainable({"*": False, **projectors, "language_model": True})
    elif stage == "full":
        model.set_trainable({"*": True})
    else:
        from mmcore.training.lora import add_lora

        model.set_trainable({"*": False})
        options = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_target_modules)
        add_lora(model, encoders=lora_on_encoders, **options)
        model.set_trainable(projectors)
        notes.append(
            f"LoRA r={lora_r} on the language model" + (" and the encoders" if lora_on_encoders else "")
        )
    if train_new_token_rows is not None and train_new_token_rows is not False:
        from mmcore.training.token_rows import train_token_rows

        ids = None if train_new_token_rows is True else train_new_token_rows
        rows = train_token_rows(model, ids).rows
        notes.append(f"embeddings: only the rows of {len(rows)} new token(s) train ({rows})")
    return stage_report(model, stage, notes)


def _is_projector(name: str) -> bool:
    return name.startswith("encoders.") and ".projector." in name


def _decays(name: str, param: nn.Parameter) -> bool:
    # As HF Trainer does: no weight decay on biases and norm weights (1-D tensors).
    return param.dim() >= 2 and not name.endswith(".bias")


def param_groups(
    model: nn.Module,
    lr: float,
    projector_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups over the trainable parameters: projectors at ``projector_lr``
    (default ``lr``), everything else at ``lr``; weight decay only on matrices (not biases, norms, nor
    the embeddings of `train_token_rows`).

    Each group carries a ``"name"`` key (``projector``, ``projector_no_decay``, ``rest``,
    ``rest_no_decay``); empty groups are left out.
    """
    from mmcore.training.token_rows import has_token_rows

    projector_lr = lr if projector_lr is None else projector_lr
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "projector" if _is_projector(name) else "rest"
        # a weight that trains only at some rows (new tokens) never decays: decay would move the others
        decay = weight_decay > 0 and _decays(name, param) and not has_token_rows(param)
        key = kind if decay else f"{kind}_no_decay"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": projector_lr if kind == "projector" else lr,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    if not groups:
        raise ConfigError("no trainable parameters: apply a stage (align, finetune, full, lora) first")
    order = ("projector", "projector_no_decay", "rest", "rest_no_decay")
    return [groups[k] for k in order if k in groups]
