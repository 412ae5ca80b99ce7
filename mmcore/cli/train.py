"""``mmcore train``: train a model directory or a spec on LLaVA-style JSONL, one process or many.

The loop is `mmcore.training.train`: a stage preset (align, finetune, full, lora), AdamW with its
own learning rate for the projectors, a progress bar and loss lines, resumable checkpoints, and a
final save to ``OUTPUT/model`` (with the processor). Under ``torchrun`` every process runs this same
command; the model is sharded with FSDP2 (see docs/training.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmcore.errors import ConfigError, DataError


def train_command(
    target: Path = typer.Argument(
        ..., metavar="SPEC|MODEL_DIR", help="A TOML assembly spec or a model directory (mmcore assemble -o)."
    ),
    data: Path = typer.Option(
        ..., "--data", help="JSONL of LLaVA-style conversations with image/audio paths."
    ),
    stage: str = typer.Option("finetune", "--stage", help="align | finetune | full | lora."),
    output: Path = typer.Option(
        Path("mmcore-train"), "--output", "-o", help="Checkpoints and the final model go here."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: --epochs)."),
    epochs: float = typer.Option(
        1.0, "--epochs", min=0.0, help="Passes over the data, when --steps is not given."
    ),
    batch_size: int = typer.Option(
        4, "--batch-size", "-b", min=1, help="Samples per process per micro-batch."
    ),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(2e-5, "--lr", help="Learning rate (everything but the projectors)."),
    projector_lr: Optional[float] = typer.Option(
        None, "--projector-lr", help="Projectors' learning rate (default: --lr)."
    ),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay (matrices only)."),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help="Share of the steps spent warming up."),
    scheduler: str = typer.Option(
        "cosine", "--scheduler", help="cosine | linear | constant | constant_with_warmup."
    ),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping (0: off)."),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Print the mean loss every N steps."),
    save_every: int = typer.Option(
        0, "--save-every", min=0, help="Checkpoint every N steps (0: only the final save)."
    ),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=0, help="Checkpoints kept (0: all)."),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Resume from the latest checkpoint in OUTPUT."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the data order, dropout and a spec's random-weight parts."),
    lora_r: int = typer.Option(8, "--lora-r", min=1, help="LoRA rank (stage lora)."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: 2 x rank)."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
    lora_encoders: bool = typer.Option(
        False, "--lora-encoders", help="Stage lora: adapters on the encoders too."
    ),
    train_on: str = typer.Option(
        "assistant", "--train-on", help="assistant (answers only) | all (every text token)."
    ),
    media: Optional[list[str]] = typer.Option(
        None, "--media", help="JSONL key=modality, e.g. image=vision (default) or audio=speech; repeatable."
    ),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto | bf16 | fp16 | no."),
    activation_checkpointing: bool = typer.Option(
        False, "--activation-checkpointing", help="Recompute activations."
    ),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes."),
    device: Optional[str] = typer.Option(
        None, "--device", help="cpu or cuda (default: cuda when available)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    check_data: bool = typer.Option(
        False, "--check-data", help="Only check the data (and the output dir); exit 0 when clean."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh: remove an older run's checkpoints and model from OUTPUT first."
    ),
    skip_nonfinite: bool = typer.Option(
        False, "--skip-nonfinite", help="Skip (and count) steps whose loss or gradients are NaN/inf instead of stopping."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Let MODEL_DIR import the code its files name (see docs/security.md)."
    ),
) -> None:
    """Train a multimodal model on JSONL conversations.

    One JSONL line: {"id": "1", "image": "img/1.png", "conversations": [{"from": "human", "value":
    "<image>\\nWhat is it?"}, {"from": "gpt", "value": "a red circle"}]} ("audio": "clip.wav" and
    <audio> likewise; paths relative to the JSONL file).

    Examples:

      mmcore train model.toml --data train.jsonl --stage align --lr 1e-3 --steps 2000 -o runs/align

      mmcore train runs/align/model --data chat.jsonl --stage lora --lr 2e-4 --projector-lr 2e-5 -o runs/lora

      torchrun --standalone --nproc_per_node 8 -m mmcore train model.toml --data train.jsonl --stage finetune
    """
    from mmcore.training.stages import STAGES

    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: expected one of {', '.join(STAGES)}")
    if not target.exists():
        raise ConfigError(f"SPEC|MODEL_DIR {str(target)!r}: no such directory or file")
    if not target.is_dir() and target.suffix != ".toml":
        raise ConfigError(f"SPEC|MODEL_DIR {str(target)!r}: expected a model directory or a .toml spec file")
    media_keys = _media_keys(media)
    _check_output(output, resume=resume, overwrite=overwrite, dry=check_data)
    _check_data(data, media_keys)
    if check_data:
        typer.echo(f"{data}: ok")
        return

    import torch

    from mmcore.cli.output import console, library_progress_bars
    from mmcore.cli.testrun import load_target
    from mmcore.training import ConversationDataset, MultimodalCollator, TrainConfig, train
    from mmcore.training.distributed import close_distributed

    config = TrainConfig(
        output_dir=str(output), stage=stage, max_steps=steps, epochs=epochs, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, projector_lr=projector_lr, weight_decay=weight_decay,
        warmup_ratio=warmup_ratio, scheduler=scheduler, max_grad_norm=max_grad_norm or None,
        log_every=log_every, save_every=save_every, keep_checkpoints=keep_checkpoints, resume=resume and not overwrite,
        seed=seed, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_on_encoders=lora_encoders, mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing, num_workers=workers, device=device, progress=progress,
        skip_nonfinite=skip_nonfinite,
    )  # fmt: skip
    config.check()
    dataset = ConversationDataset(data, media_keys=media_keys)
    # Seeded before a spec is built, so its random-weight parts are the same in every run with this
    # --seed: a resumed run rebuilds the frozen weights the checkpoint's fingerprint expects.
    torch.manual_seed(seed)
    with library_progress_bars():
        model, tokenizer, processor, _ = load_target(target, torch.float32, trust_remote_code)
    if processor is None:
        from mmcore.processing import MultimodalProcessor

        processor = MultimodalProcessor.from_model(model, tokenizer)
    dataset.check_modalities(processor.modalities)
    collator = MultimodalCollator(processor, train_on=train_on)
    try:
        with library_progress_bars():
            result = train(
                model, dataset, collator, config, processor=processor, console=console(stderr=True)
            )
    finally:
        close_distributed()
    if result.model_dir is not None and result.rank == 0:
        typer.echo(str(result.model_dir))


def _check_output(output: Path, *, resume: bool, overwrite: bool, dry: bool) -> None:
    """OUTPUT must be (or become) a writable directory, and never mix two runs: a fresh run
    (--no-resume) into a directory holding an older run's checkpoints or model needs --overwrite,
    which removes them (and so starts afresh even without --no-resume)."""
    import os

    from mmcore.training.loop import CHECKPOINTS, FINAL

    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {str(output)!r}: expected a directory, got an existing file")
    existing = next((p for p in output.parents if p.exists()), None) if not output.exists() else output
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"--output {str(output)!r}: {str(existing)!r} is not a writable directory")
    old = [output / name for name in (CHECKPOINTS, FINAL) if (output / name).exists()]
    if not old or (resume and not overwrite):
        return
    if not overwrite:
        raise ConfigError(
            f"--output {str(output)!r} holds an older run ({', '.join(p.name for p in old)}); --no-resume would mix "
            "the two runs: pass --overwrite to remove them first, or choose a new -o"
        )
    if not dry and os.environ.get("RANK", "0") == "0":  # under torchrun, one process removes them
        import shutil

        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_data(data: Path, media_keys: dict[str, str] | None) -> None:
    """Every problem of the data, one line each on stderr, then `DataError`: before any model loads."""
    from mmcore.training.data import check_data

    problems = check_data(data, media_keys)
    if problems:
        for problem in problems:
            typer.echo(problem, err=True)
        raise DataError(f"{len(problems)} problem(s) in {data} (listed above); nothing was trained", problems)


def _media_keys(values: Optional[list[str]]) -> dict[str, str] | None:
    if not values:
        return None
    from mmcore.training.data import DEFAULT_MEDIA_KEYS, LOADERS

    keys = dict(DEFAULT_MEDIA_KEYS)
    for value in values:
        key, sep, modality = value.partition("=")
        if not sep or not key or not modality:
            raise ConfigError(f"--media {value!r}: expected KEY=MODALITY, e.g. image=vision")
        if key not in LOADERS:
            raise ConfigError(f"--media {value!r}: the data key must be one of {', '.join(LOADERS)}")
        keys[key] = modality
    return keys


def register(app: typer.Typer) -> None:
    """Add ``train`` to ``app``."""
    app.command("train")(train_command)
