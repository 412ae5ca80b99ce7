"""``mmcore train``: train a model directory or an assembly file on LLaVA-style JSONL, one process or many.

The loop is `mmcore.training.train`: a stage preset (align, finetune, full, lora), AdamW with its
own learning rate for the projectors, a progress bar and loss lines, resumable checkpoints, and a
final save to ``OUTPUT/model`` (with the processor). Under ``torchrun`` every process runs this same
command; the model is sharded with FSDP2 (see docs/training.md).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from mmcore.errors import ConfigError, DataError

# The options that are not `TrainConfig` fields (those come from its field metadata, see `_signature`).
_ARGUMENTS = {
    "target": (
        Path,
        typer.Argument(
            ..., metavar="ASSEMBLY|MODEL_DIR", help="A TOML assembly file or a model directory (mmcore assemble -o)."
        ),
    ),
    "data": (Path, typer.Option(..., "--data", help="JSONL of LLaVA-style conversations with image/audio paths.")),
}
_COMMAND_OPTIONS = {
    "train_on": (
        str,
        typer.Option("assistant", "--train-on", help="assistant (answers only) | all (every text token)."),
    ),
    "media": (
        Optional[list[str]],  # noqa: UP045 (typer reads this spelling on every version)
        typer.Option(
            None, "--media", help="JSONL key=modality, e.g. image=vision (default) or audio=speech; repeatable."
        ),
    ),
    "check_data": (
        bool,
        typer.Option(False, "--check-data", help="Only check the data (and the output dir); exit 0 when clean."),
    ),
    "overwrite": (
        bool,
        typer.Option(
            False, "--overwrite", help="Start afresh: remove an older run's checkpoints and model from OUTPUT first."
        ),
    ),
    "trust_remote_code": (
        bool,
        typer.Option(
            False, "--trust-remote-code", help="Let MODEL_DIR import the code its files name (see docs/security.md)."
        ),
    ),
}


def _signature() -> inspect.Signature:
    """``train_command``'s parameters, as typer reads them: the arguments, every `TrainConfig` field
    that has a command-line form (`mmcore.training.config.cli_options`), then the command's own options."""
    from mmcore.training.config import cli_options

    def parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    params = [parameter(name, kind, info) for name, (kind, info) in _ARGUMENTS.items()]
    for opt in cli_options():
        info = typer.Option(opt.default, *opt.flags, help=opt.help, **opt.click)
        params.append(parameter(opt.name, opt.type, info))
    params += [parameter(name, kind, info) for name, (kind, info) in _COMMAND_OPTIONS.items()]
    return inspect.Signature(params, return_annotation=None)


def train_command(**values: Any) -> None:
    """Train a multimodal model on JSONL conversations.

    One JSONL line: {"id": "1", "image": "img/1.png", "conversations": [{"from": "human", "value":
    "<image>\\nWhat is it?"}, {"from": "gpt", "value": "a red circle"}]} ("audio": "clip.wav" and
    <audio> likewise; paths relative to the JSONL file).

    Examples:

      mmcore train model.toml --data train.jsonl --stage align --lr 1e-3 --steps 2000 -o runs/align

      mmcore train runs/align/model --data chat.jsonl --stage lora --lr 2e-4 --projector-lr 2e-5 -o runs/lora

      torchrun --standalone --nproc_per_node 8 -m mmcore train model.toml --data train.jsonl --stage finetune
    """
    _train(**values)


train_command.__signature__ = _signature()  # type: ignore[attr-defined]


def _train(
    *,
    target: Path,
    data: Path,
    train_on: str,
    media: Optional[list[str]],  # noqa: UP045
    check_data: bool,
    overwrite: bool,
    trust_remote_code: bool,
    **config_values: Any,
) -> None:
    from mmcore.cli.testrun import check_target
    from mmcore.training.config import config_from_cli
    from mmcore.training.stages import STAGES

    output = Path(config_values["output_dir"])
    stage, resume, seed = config_values["stage"], config_values["resume"], config_values["seed"]
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: expected one of {', '.join(STAGES)}")
    check_target(target, "ASSEMBLY|MODEL_DIR")
    from mmcore.training.data import default_media_keys, registered_loaders

    loaders = registered_loaders()  # image, audio and every installed plugin's data key
    explicit = _explicit_media_keys(media, loaders)  # --media, checked; the model's encoders decide the rest below
    _check_output(output, resume=resume, overwrite=overwrite, dry=check_data)
    _check_data(data, {**default_media_keys(loaders), **explicit}, loaders)
    if check_data:
        typer.echo(f"{data}: ok")
        return

    import torch

    from mmcore.cli.output import console, library_progress_bars
    from mmcore.cli.testrun import load_target
    from mmcore.training import ConversationDataset, MultimodalCollator, train
    from mmcore.training.distributed import close_distributed

    config = config_from_cli(config_values, resume=resume and not overwrite)
    config.check()
    # Seeded before a spec is built, so its random-weight parts are the same in every run with this
    # --seed: a resumed run rebuilds the frozen weights the checkpoint's fingerprint expects.
    torch.manual_seed(seed)
    with library_progress_bars():
        model, tokenizer, processor, _ = load_target(target, torch.float32, trust_remote_code)
    if processor is None:
        from mmcore.processing import MultimodalProcessor

        processor = MultimodalProcessor.from_model(model, tokenizer)
    from mmcore.training.data import media_keys_for

    # each key to the encoder that reads its items (a Qwen2-VL "image" / "video" pair), --media first
    media_keys = {**media_keys_for(model, loaders), **explicit}
    dataset = ConversationDataset(data, media_keys=media_keys, loaders=loaders)
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
    """OUTPUT must be (or become) a writable directory, and never mix two runs nor lose one: a fresh
    run (--no-resume) into a directory holding an older run's checkpoints or model, or a resumed run
    into one holding a finished model and no checkpoint to resume from (it would overwrite that
    model), needs --overwrite, which removes them (and so starts afresh even without --no-resume)."""
    import os

    from mmcore.training.config import CHECKPOINTS, FINAL, latest_checkpoint

    where = f"--output {str(output)!r}"
    if output.is_symlink() and not output.exists():
        raise ConfigError(f"{where}: a symbolic link to {os.readlink(output)!r}, which does not exist")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{where}: expected a directory, got an existing file")
    existing = next((p for p in output.parents if p.exists()), None) if not output.exists() else output
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"{where}: {str(existing)!r} is not a writable directory")
    old = [output / name for name in (CHECKPOINTS, FINAL) if (output / name).exists() or (output / name).is_symlink()]
    if not old:
        return
    if overwrite:
        if not dry and os.environ.get("RANK", "0") == "0":  # under torchrun, one process removes them
            _remove(old, where)
        return
    if not resume:
        raise ConfigError(
            f"{where} holds an older run ({', '.join(p.name for p in old)}); --no-resume would mix "
            "the two runs: pass --overwrite to remove them first, or choose a new -o"
        )
    for path in old:
        if not path.is_dir():
            raise ConfigError(f"{where}: {str(path)!r} is not a directory; remove it, or pass --overwrite")
    if (output / FINAL).is_dir() and latest_checkpoint(output) is None:
        raise ConfigError(
            f"{where} holds a finished model ({FINAL}/) and no checkpoint to resume from; training would "
            "overwrite that model: pass --overwrite to replace it, or choose another -o"
        )


def _remove(paths: list[Path], where: str) -> None:
    """--overwrite: remove an older run's parts; what cannot be removed is one typed line."""
    import shutil

    for path in paths:
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as exc:
            raise ConfigError(
                f"{where}: --overwrite cannot remove {str(path)!r} ({exc.strerror or exc})"
            ) from exc


def _check_data(data: Path, media_keys: dict[str, str] | None, loaders: dict[str, Any] | None = None) -> None:
    """Every problem of the data, one line each on stderr, then `DataError`: before any model loads."""
    from mmcore.training.data import check_data

    problems = check_data(data, media_keys, loaders)
    if problems:
        for problem in problems:
            typer.echo(problem, err=True)
        raise DataError(f"{len(problems)} problem(s) in {data} (listed above); nothing was trained", problems)


def _explicit_media_keys(values: Optional[list[str]], loaders: dict[str, Any]) -> dict[str, str]:  # noqa: UP045
    """--media KEY=MODALITY, checked."""
    keys: dict[str, str] = {}
    for value in values or ():
        key, sep, modality = value.partition("=")
        if not sep or not key or not modality:
            raise ConfigError(f"--media {value!r}: expected KEY=MODALITY, e.g. image=vision")
        if key not in loaders:
            raise ConfigError(
                f"--media {value!r}: the data key must be one of {', '.join(loaders)} (an encoder plugin adds "
                "its own through EncoderFactory.data_key)"
            )
        keys[key] = modality
    return keys


def register(app: typer.Typer) -> None:
    """Add ``train`` to ``app``."""
    app.command("train")(train_command)
