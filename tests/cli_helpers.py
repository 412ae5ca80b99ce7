"""What the ``tests/test_cli_*.py`` files share: a fake plugin registered in-process (listings and error
paths never import its factories), the one-line-error check, and the mark for tests that need the real
``clip`` and ``whisper`` plugins (skipped where those are not installed). The ``cli`` fixture that runs
the app with the fake plugin is in ``conftest.py``."""

from __future__ import annotations

import plugin_marks
import typer

from mmcore import hookimpl
from mmcore.registry import CallbackSpec, EncoderSpec, ProjectorSpec

needs_plugins = plugin_marks.needs_plugins("clip", "whisper")


class FakePlugin:
    """Registers metadata only (factories are never imported by listings) and one command."""

    @hookimpl
    def register_encoders(self, register):
        register(
            EncoderSpec(
                name="toyvision",
                modality="vision",
                summary="toy vision",
                factory="toy_mod:Factory",
                default_checkpoint="org/toy-ckpt",
                presets=("tiny", "big"),
            )
        )
        register(
            EncoderSpec(name="toyaudio", modality="audio", summary="toy audio", factory="toy_mod:Factory")
        )

    @hookimpl
    def register_projectors(self, register):
        register(ProjectorSpec(name="toyproj", summary="toy projector", factory="toy_mod:proj"))

    @hookimpl
    def register_callbacks(self, register):
        register(
            CallbackSpec(
                name="toypool", slots=("postprocess_projector",), summary="toy pool", factory="toy_mod:cb"
            )
        )

    @hookimpl
    def register_commands(self, app):
        @app.command("toy-hello")
        def toy_hello() -> None:
            """Say hello from the fake plugin."""
            typer.echo("hello from toy")


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
