"""``mmcore assemble``: build a model from flags or a TOML assembly file and write a model directory, or count
it on the meta device (``--dry-run``).

The directory holds what `MultimodalModel.from_pretrained` and ``mmcore test-run`` load: config.json
(every part's recipe), safetensors weights, the tokenizer with the modality tokens, the processor
(when `mmcore.processing` is installed) and ``mmcore_assembly.json`` (the spec it came from). It is
written into a temporary directory beside the target and renamed into place: never half-written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from mmcore.cli.output import (
    console,
    human_bytes,
    human_count,
    library_progress_bars,
    print_json,
    print_table,
)
from mmcore.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from mmcore.cli.spec import AssemblySpec

ASSEMBLY_FILE = "mmcore_assembly.json"
DTYPES = ("auto", "fp32", "bf16", "fp16")


def spec_from_cli(
    spec_file: Optional[Path],
    *,
    llm: Optional[str] = None,
    tokenizer: Optional[str] = None,
    encoders: Optional[list[str]] = None,
    projectors: Optional[list[str]] = None,
    assignments: Optional[list[str]] = None,
    wrap: Optional[bool] = None,
    random_init: Optional[bool] = None,
) -> AssemblySpec:
    """The spec from a TOML file (optional) with the command-line flags applied on top."""
    from mmcore.cli.spec import (
        merge_tables,
        parse_encoder_flag,
        parse_set_flag,
        read_spec_file,
        spec_from_dict,
    )

    raw: dict[str, Any] = read_spec_file(spec_file) if spec_file is not None else {}
    origin = spec_file.name if spec_file is not None else "command line"
    flags: dict[str, Any] = {}
    if llm is not None:
        flags.setdefault("llm", {})["source"] = llm
    if tokenizer is not None:
        flags.setdefault("llm", {})["tokenizer"] = tokenizer
    if encoders:
        from mmcore.plugins import get_registry

        qualified = frozenset(s.qualified_name for s in get_registry().list_encoders())
        for value in encoders:
            name, table = parse_encoder_flag(value, qualified)
            # --encoder says which encoder and from where: it replaces those keys of a file's entry.
            entry = raw.get("encoders", {}).get(name)
            if isinstance(entry, dict):
                for key in ("encoder", "checkpoint", "preset"):
                    entry.pop(key, None)
            flags.setdefault("encoders", {}).setdefault(name, {}).update(table)
    for value in projectors or ():
        name, sep, projector = value.rpartition("=")
        if sep and (not name or not projector):
            raise ConfigError(
                f"--projector {value!r}: expected TYPE (all encoders) or NAME=TYPE (one encoder)"
            )
        if sep:
            flags.setdefault("encoders", {}).setdefault(name, {})["projector"] = projector
        else:
            flags.setdefault("model", {})["projector"] = projector
    if wrap is not None:
        flags.setdefault("model", {})["wrap"] = wrap
    if random_init:
        flags.setdefault("model", {})["random_init"] = True
    merged = merge_tables(raw, flags)
    for assignment in assignments or ():
        parse_set_flag(merged, assignment)
    return spec_from_dict(merged, origin)


def _repeatable(names: tuple[str, ...], metavar: str, help: str) -> Any:
    """A string option that may be given many times: a list of its values, None when never given."""
    return typer.Option(None, *names, metavar=metavar, help=help)


def assemble(
    spec_file: Optional[Path] = typer.Argument(
        None, metavar="[ASSEMBLY]", help="TOML assembly file (flags apply on top)."
    ),
    llm: Optional[str] = typer.Option(
        None, "--llm", help="LLM: a preset (mmcore list-llms), a hub id or a local directory."
    ),
    tokenizer: Optional[str] = typer.Option(
        None,
        "--tokenizer",
        help="Tokenizer hub id or directory ('tiny': the offline test tokenizer). Default: the LLM's.",
    ),
    encoder: Optional[list[str]] = _repeatable(
        ("--encoder", "-e"),
        "NAME=ENCODER[:SOURCE]",
        "Add an encoder: NAME=ENCODER[:CHECKPOINT | :preset=PRESET], "
        "e.g. vision=clip:openai/clip-vit-large-patch14. Repeatable.",
    ),
    projector: Optional[list[str]] = _repeatable(
        ("--projector", "-p"),
        "[NAME=]TYPE",
        "Projector type for every encoder (TYPE) or one (NAME=TYPE). Default mlp2x_gelu.",
    ),
    assignments: Optional[list[str]] = _repeatable(
        ("--set", "-s"),
        "KEY=VALUE",
        "Set any assembly key, e.g. encoders.vision.options.feature_layer=-1, "
        "encoders.vision.projector_options.num_queries=64. Repeatable.",
    ),
    wrap: Optional[bool] = typer.Option(
        None, "--wrap/--no-wrap", help="Add <name_start>/<name_end> tokens around each item."
    ),
    random_init: bool = typer.Option(
        False,
        "--random-init",
        help="Random weights everywhere: presets as they are, checkpoints' configs only "
        "(no weight download).",
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Model directory to write (must not exist unless --overwrite)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Build on the meta device and report parameters and memory; write nothing."
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Weights dtype to save: auto (as built), fp32, bf16, fp16."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Assemble encoders + projectors + an LLM into a model directory (or count it with --dry-run).

    Examples:

      mmcore assemble --llm tiny -e vision=clip:preset=tiny -e audio=whisper:preset=tiny -o out/tiny

      mmcore assemble --llm Qwen/Qwen2-0.5B -e vision=siglip:google/siglip-base-patch16-224 -p resampler -o sq

      mmcore assemble --llm llama3-8b --encoder vision=clip:preset=vit-l-14-336 --dry-run

      mmcore assemble model.toml --set model.wrap=true -o out/model
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    spec = spec_from_cli(
        spec_file, llm=llm, tokenizer=tokenizer, encoders=encoder, projectors=projector,
        assignments=assignments, wrap=wrap, random_init=random_init,
    )  # fmt: skip
    if dry_run:
        _dry_run(spec, as_json)
        return
    if output is None:
        raise ConfigError("--output: missing; say which model directory to write (-o DIR), or use --dry-run")
    target = output.expanduser().absolute()
    _check_target(target, overwrite)
    with library_progress_bars(), _progress(len(spec.encoders) + 4, quiet=as_json) as step:
        from mmcore.cli.build import build_from_spec

        built = build_from_spec(spec, step=step)
        if dtype != "auto":
            built.model.to(_torch_dtype(dtype))
        step(f"saving {target}")
        _check_target(target, overwrite)
        write_model_dir(built, spec, target)
    from mmcore.cli.dryrun import count_report

    report = count_report(built.model, placeholder_tokens=0)
    report = {
        "output": str(target),
        "random_weights": built.random_weights,
        "files": sorted(p.name for p in target.iterdir()),
        "spec": spec.to_dict(),
        "parts": report["parts"],
        "total_params": report["total_params"],
        "modality_token_ids": built.model.modality_token_ids,
        "preprocess_llm_callback": built.llm_callback,
        "notes": built.notes,
    }
    if as_json:
        print_json(report)
        return
    _print_parts(report["parts"], report["total_params"], title=f"Assembled {target}")
    for note in built.notes + (
        ["all weights are random (presets / --random-init)"] if built.random_weights else []
    ):
        console().print(f"note: {note}")
    console().print(f"next: mmcore test-run {output}")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise ConfigError(
            f"--output {str(target)!r} already exists; pass --overwrite to replace it, "
            "or choose another directory"
        )
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--output {str(target)!r} exists and is not a directory")


def write_model_dir(built: Any, spec: AssemblySpec, target: Path) -> None:
    """Write model, tokenizer, processor and the spec into ``target`` atomically (temp dir + rename)."""
    from mmcore import __version__
    from mmcore.files import staged_directory

    # --overwrite: the new directory replaces the old one whole (keep=None)
    with staged_directory(target) as staging:
        built.model.save_pretrained(staging)
        built.tokenizer.save_pretrained(staging)
        if built.processor is not None:
            built.processor.save_pretrained(staging)
        record = {
            "mmcore_version": __version__,
            "random_weights": built.random_weights,
            "spec": spec.to_dict(),
        }
        (staging / ASSEMBLY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


class _progress:
    """A rich progress bar on stderr over the assembly stages; ``step(description)`` advances it."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet = total, quiet

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        err = console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err, disable=self.quiet or not err.is_terminal, transient=False,
        )  # fmt: skip
        self.progress.__enter__()
        self.task = self.progress.add_task("assembling", total=self.total)
        self.started = False
        return self.step

    def step(self, description: str) -> None:
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=description)

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.progress.update(self.task, completed=self.total, description="done")
        self.progress.__exit__(*exc)


def _dry_run(spec: AssemblySpec, as_json: bool) -> None:
    from mmcore.cli.build import build_from_spec
    from mmcore.cli.dryrun import count_report

    built = build_from_spec(spec, meta=True)
    tokens = len(spec.encoders) * (3 if spec.model.wrap else 1)
    report = {"spec": spec.to_dict(), **count_report(built.model, placeholder_tokens=tokens)}
    report["preprocess_llm_callback"] = built.llm_callback
    report["notes"] = built.notes + report["notes"]
    if as_json:
        print_json(report)
        return
    _print_parts(report["parts"], report["total_params"], title="Parameters (meta device, nothing allocated)")
    print_table(
        "Training stages (memory: bf16 weights + 14 B per trainable parameter; activations not included)",
        ["stage", "trains", "params", "trainable", "memory"],
        [
            [
                s["stage"],
                s["trains"],
                human_count(s["params"]),
                human_count(s["trainable"]),
                human_bytes(s["memory_bytes"]),
            ]
            for s in report["stages"]
        ],
    )
    console().print(f"bf16 weights: {human_bytes(report['bf16_bytes'])}")
    for note in report["notes"]:
        console().print(f"note: {note}")


def _print_parts(parts: list[dict[str, Any]], total: int, title: str) -> None:
    rows = [[p["part"], f"{p['params']:,}", human_count(p["params"]), p.get("type")] for p in parts]
    rows.append(["total", f"{total:,}", human_count(total), None])
    print_table(title, ["part", "parameters", "", "projector"], rows)


def register(app: typer.Typer) -> None:
    """Add ``assemble`` to ``app``."""
    app.command("assemble")(assemble)
