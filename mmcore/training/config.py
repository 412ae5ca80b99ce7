"""`TrainConfig`: everything `mmcore.training.train` needs besides the model and the data.

Each field that ``mmcore train`` exposes carries its command-line form in the field's metadata
(`option`: the flag names, the help line, click's checks such as ``min``), so the dataclass is the
one place a training option is written: `mmcore.cli.train` builds its options from `cli_options`.
This module imports no torch (``mmcore train --help`` reads it).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcore.errors import ConfigError
from mmcore.training.stages import STAGES

CHECKPOINTS = "checkpoints"  # <output_dir>/checkpoints/step-NNNNNNN
FINAL = "model"  # <output_dir>/model: the final model
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")

_CLI = "mmcore.cli"


def option(
    *flags: str,
    help: str,
    type: Any = None,
    default: Any = dataclasses.MISSING,
    to_config: Callable[[Any], Any] | None = None,
    **click: Any,
) -> dict[str, Any]:
    """Field metadata for a command-line option: ``flags`` (``"--batch-size", "-b"``), its ``help``
    line, and where the command line differs from the field: its value ``type`` and ``default``, and
    ``to_config`` (the command-line value -> the field's). ``click`` goes to ``typer.Option``
    (``min=1``)."""
    return {_CLI: {"flags": flags, "help": help, "type": type, "default": default, "to_config": to_config,
                   "click": click}}  # fmt: skip


@dataclass(frozen=True)
class CliOption:
    """One command-line option of a `TrainConfig` field (see `cli_options`)."""

    name: str  # the field's name
    flags: tuple[str, ...]
    help: str
    type: Any
    default: Any
    to_config: Callable[[Any], Any]
    click: dict[str, Any]


@dataclass
class TrainConfig:
    """Everything `train` needs besides the model and data. ``max_steps`` wins over ``epochs``.

    ``batch_size`` is per process; the global batch is ``batch_size * world_size * grad_accum``.
    ``mixed_precision``: ``auto`` (bf16 on CUDA, none on CPU), ``bf16``, ``fp16`` or ``no``. Each
    field's help line is in its metadata (`option`), and ``mmcore train --help`` shows it.
    """

    output_dir: str = field(
        metadata=option(
            "--output", "-o", help="Checkpoints and the final model go here.", type=Path,
            default=Path("mmcore-train"), to_config=str,
        )
    )  # fmt: skip
    stage: str = field(default="finetune", metadata=option("--stage", help=" | ".join(STAGES) + "."))
    max_steps: int | None = field(
        default=None, metadata=option("--steps", help="Optimizer steps (default: --epochs).", min=1)
    )
    epochs: float = field(
        default=1.0, metadata=option("--epochs", help="Passes over the data, when --steps is not given.", min=0.0)
    )
    batch_size: int = field(
        default=4, metadata=option("--batch-size", "-b", help="Samples per process per micro-batch.", min=1)
    )
    grad_accum: int = field(
        default=1, metadata=option("--grad-accum", help="Micro-batches per optimizer step.", min=1)
    )
    lr: float = field(default=2e-5, metadata=option("--lr", help="Learning rate (everything but the projectors)."))
    projector_lr: float | None = field(
        default=None, metadata=option("--projector-lr", help="Projectors' learning rate (default: --lr).")
    )
    weight_decay: float = field(
        default=0.0, metadata=option("--weight-decay", help="AdamW weight decay (matrices only).")
    )
    warmup_ratio: float = field(
        default=0.03, metadata=option("--warmup-ratio", help="Share of the steps spent warming up.")
    )
    scheduler: str = field(default="cosine", metadata=option("--scheduler", help=" | ".join(SCHEDULERS) + "."))
    max_grad_norm: float | None = field(
        default=1.0,
        metadata=option(
            "--max-grad-norm", help="Gradient clipping (0: off).", type=float, default=1.0,
            to_config=lambda value: value or None,
        ),
    )  # fmt: skip
    log_every: int = field(
        default=10, metadata=option("--log-every", help="Print the mean loss every N steps.", min=1)
    )
    save_every: int = field(
        default=0, metadata=option("--save-every", help="Checkpoint every N steps (0: only the final save).", min=0)
    )
    keep_checkpoints: int = field(
        default=2, metadata=option("--keep-checkpoints", help="Checkpoints kept (0: all).", min=0)
    )
    resume: bool = field(
        default=True,
        metadata=option("--resume/--no-resume", help="Resume from the latest checkpoint in OUTPUT."),
    )
    seed: int = field(
        default=0,
        metadata=option("--seed", help="Seeds the data order, dropout and a spec's random-weight parts."),
    )
    lora_r: int = field(default=8, metadata=option("--lora-r", help="LoRA rank (stage lora).", min=1))
    lora_alpha: int | None = field(
        default=None, metadata=option("--lora-alpha", help="LoRA alpha (default: 2 x rank).")
    )
    lora_dropout: float = field(default=0.0, metadata=option("--lora-dropout", help="LoRA dropout (stage lora)."))
    lora_on_encoders: bool = field(
        default=False, metadata=option("--lora-encoders", help="Stage lora: adapters on the encoders too.")
    )
    train_new_token_rows: bool = field(
        default=False,
        metadata=option(
            "--train-new-token-rows",
            help="Also train the embedding rows (input and output) of the tokens mmcore added (modality "
            "placeholders, start/end tokens); every other row stays bit-identical.",
        ),
    )
    group_by_modality: bool = field(
        default=True,
        metadata=option(
            "--group-by-modality/--no-group-by-modality",
            help="Batches of one modality group each (images only, text only, ...). --no-group-by-modality "
            "mixes them: packed rows pad less; under FSDP2 the ranks then agree on the encoders at each step.",
        ),
    )
    pack_to: int | None = field(
        default=None,
        metadata=option(
            "--pack-to",
            help="Pack each micro-batch's samples into rows of at most N tokens (position ids restart per "
            "sample, attention stays within it; the loss counts the same tokens). With a larger "
            "--batch-length, each micro-batch is that many tokens in rows of N.",
            min=1,
        ),
    )
    batch_length: int | None = field(
        default=None,
        metadata=option(
            "--batch-length",
            help="Micro-batches by a token budget instead of --batch-size: samples whose lengths sum to at "
            "most N tokens (JSONL data: the text as tokenized, each item as many tokens as its modality's "
            "first item in the data).",
            min=1,
        ),
    )
    mixed_precision: str = field(
        default="auto", metadata=option("--mixed-precision", help=" | ".join(MIXED_PRECISIONS) + ".")
    )
    activation_checkpointing: bool = field(
        default=False, metadata=option("--activation-checkpointing", help="Recompute activations.")
    )
    num_workers: int = field(
        default=0, metadata=option("--workers", help="DataLoader worker processes.", min=0)
    )
    device: str | None = field(
        default=None, metadata=option("--device", help="cpu or cuda (default: cuda when available).")
    )
    progress: bool = field(
        default=True, metadata=option("--progress/--no-progress", help="Show a progress bar.")
    )
    save_final: bool = True
    skip_nonfinite: bool = field(
        default=False,
        metadata=option(
            "--skip-nonfinite",
            help="Skip (and count) steps whose loss or gradients are NaN/inf instead of stopping.",
        ),
    )

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("pack_to", "batch_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``<output_dir>/checkpoints`` (one with its
    ``trainer_state.json``: a killed write leaves none), or None."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def cli_options() -> list[CliOption]:
    """The command-line options of `TrainConfig`, in field order: its fields with `option` metadata."""
    hints = typing.get_type_hints(TrainConfig)
    options = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata.get(_CLI)
        if meta is None:
            continue
        default = meta["default"] if meta["default"] is not dataclasses.MISSING else f.default
        options.append(
            CliOption(
                name=f.name, flags=tuple(meta["flags"]), help=meta["help"],
                type=meta["type"] or _optional(hints[f.name]), default=default,
                to_config=meta["to_config"] or (lambda value: value), click=dict(meta["click"]),
            )
        )  # fmt: skip
    return options


def config_from_cli(values: dict[str, Any], **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from the command line's values (field name -> value, as `cli_options` names
    them), each through its ``to_config``; ``overrides`` are set as given."""
    fields = {o.name: o.to_config(values[o.name]) for o in cli_options() if o.name in values}
    return TrainConfig(**{**fields, **overrides})


def _optional(hint: Any) -> Any:
    """``int | None`` -> ``typing.Optional[int]``, the spelling every typer version reads."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return typing.Optional[next(a for a in args if a is not type(None))]  # noqa: UP045
    return hint
