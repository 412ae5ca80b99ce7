"""``mmcore convert`` (a transformers VLM -> an mmcore model directory) and ``mmcore export`` (an mmcore
model directory -> a plain transformers directory for ``vllm serve`` and friends).

Both write atomically: into a staging folder beside the target, renamed into place when complete.
``convert --dry-run`` builds the model on the meta device (configs read, no weights) and prints what
it would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mmcore.cli.output import console, human_count, library_progress_bars, print_json, print_table
from mmcore.errors import ConfigError


def convert(
    source: str = typer.Argument(..., metavar="SRC", help="A transformers VLM: a local directory or a hub id."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="mmcore model directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Build on the meta device (no weights read) and print what would be written."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the source's own code (auto_map); off by default."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Convert a transformers VLM (LLaVA, LLaVA-NeXT) into an mmcore model directory.

    Examples:

      mmcore convert llava-hf/llava-1.5-7b-hf --dry-run

      mmcore convert ./llava-dir -o out/llava-mmcore
    """
    from mmcore.convert import convert_pretrained

    target = None
    if not dry_run:
        if output is None:
            raise ConfigError("--output: missing; say which model directory to write (-o DIR), or use --dry-run")
        target = _check_target(output, overwrite)
    with library_progress_bars():
        converted = convert_pretrained(
            source, device="meta" if dry_run else None, trust_remote_code=trust_remote_code
        )
        if target is not None:
            _write(converted, target)
    report = _report(source, converted, target)
    if as_json:
        print_json(report)
        return
    title = "Would build (meta device, no weights read)" if dry_run else f"Converted {source} -> {target}"
    rows = [[p["part"], p["type"], f"{p['params']:,}", human_count(p["params"])] for p in report["parts"]]
    rows.append(["total", None, f"{report['total_params']:,}", human_count(report["total_params"])])
    print_table(title, ["part", "type", "parameters", ""], rows)
    console().print(f"family: {report['family']}; modality token ids: {report['modality_token_ids']}")
    for note in report["notes"]:
        console().print(f"note: {note}")
    if target is not None:
        console().print(f"next: mmcore test-run {target}")


def export(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="An mmcore model directory (with its processor)."),
    output: Path = typer.Option(..., "--output", "-o", help="transformers directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow callbacks recorded by import path and tokenizer code."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Export an mmcore model directory as a plain transformers one (LlavaForConditionalGeneration, or LlavaNextForConditionalGeneration for anyres).

    The output loads with AutoModelForImageTextToText / AutoProcessor and no mmcore, and serves with
    `vllm serve OUT`.
    """
    from mmcore.convert.export import export_model

    if not model_dir.is_dir():
        raise ConfigError(f"MODEL_DIR {str(model_dir)!r} is not a directory; expected an mmcore model directory")
    target = _check_target(output, overwrite)
    with library_progress_bars():
        report = export_model(model_dir, target, trust_remote_code=trust_remote_code)
    if as_json:
        print_json(report)
        return
    console().print(f"Exported {model_dir} -> {target} ({', '.join(report['architectures'])})")
    console().print(f"files: {', '.join(report['files'])}")
    console().print(f"next: vllm serve {target}")


def _check_target(output: Path, overwrite: bool) -> Path:
    target = output.expanduser().absolute()
    if target.exists() and not overwrite:
        raise ConfigError(
            f"--output {str(target)!r} already exists; pass --overwrite to replace it, or choose another directory"
        )
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--output {str(target)!r} exists and is not a directory")
    return target


def _write(converted: Any, target: Path) -> None:
    """Model and processor (tokenizer, chat template) into ``target``, atomically."""
    from mmcore.files import staged_directory

    with staged_directory(target) as staging:
        converted.model.save_pretrained(staging)
        if converted.processor is not None:
            converted.processor.save_pretrained(staging)


def _report(source: str, converted: Any, target: Path | None) -> dict[str, Any]:
    model = converted.model
    parts = []
    seen: dict[int, str] = {}
    for name, module in model.parts().items():
        if id(module) in seen:  # an encoder sharing another's part (OneVision's video encoder): counted once
            parts.append({"part": name, "type": f"shared with {seen[id(module)]}", "params": 0})
            continue
        seen[id(module)] = name
        if name.endswith(".projector"):
            kind = module.config.projector_type
        elif name.endswith(".module"):
            encoder = model.encoders[name.rpartition(".")[0]]
            kind = (encoder.source or {}).get("encoder") or type(module).__name__
        else:
            kind = type(module).__name__
        parts.append({"part": name, "type": kind, "params": sum(p.numel() for p in module.parameters())})
    callbacks = {
        name: {slot: repr(cb) for slot, cb in encoder.callbacks().items() if cb is not None}
        for name, encoder in model.encoders.items()
    }
    return {
        "source": source,
        "output": str(target) if target is not None else None,
        "family": converted.family,
        "parts": parts,
        "total_params": sum(p["params"] for p in parts),
        "modality_token_ids": model.modality_token_ids,
        "callbacks": callbacks,
        "processor": converted.processor is not None,
        "notes": list(converted.notes),
    }


def register(app: typer.Typer) -> None:
    """Add ``convert`` and ``export`` to ``app``."""
    app.command("convert")(convert)
    app.command("export")(export)
