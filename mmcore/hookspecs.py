"""The plugin contract: the hooks an mmcore plugin may implement. Each hook's docstring is its documentation.

A plugin is a module named by an entry point in the group ``mmcore``::

    # pyproject.toml of mmcore-plugin-whisper
    [project.entry-points.mmcore]
    whisper = "mmcore_plugin_whisper"

    # mmcore_plugin_whisper/__init__.py  -- imports no torch/transformers/timm
    from mmcore import hookimpl
    from mmcore.registry import EncoderSpec

    MMCORE_PLUGIN_API = 1   # optional: the plugin-API version written for (an int, or (min, max))

    @hookimpl
    def register_encoders(register):
        register(EncoderSpec(name="whisper", modality="audio", summary="Whisper audio encoder",
                             factory="mmcore_plugin_whisper.factory:build"))

Hooks are called with keyword arguments; an implementation names only the arguments it uses. A hook
that is not listed here (a misspelling) sets the plugin aside, as does any exception a hook raises.
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

#: Version of this contract. A plugin declaring ``MMCORE_PLUGIN_API`` that excludes it is set aside.
PLUGIN_API_VERSION = 1

hookspec = HookspecMarker("mmcore")
hookimpl = HookimplMarker("mmcore")


@hookspec
def register_encoders(register):
    """Register modality encoders: call ``register(EncoderSpec(...))`` once per encoder.

    ``register`` also accepts the fields as keywords: ``register(name="clip", modality="vision", ...)``.
    Only metadata is registered; the ``factory`` (``"module.path:attr"``) is imported when something
    is built, so this hook must not import torch, transformers or timm.
    """


@hookspec
def register_projectors(register):
    """Register projector types: call ``register(ProjectorSpec(...))`` once per projector.

    A projector maps an encoder's features into the language model's embedding width. Its ``factory``
    (``"module.path:attr"``) is imported lazily. ``ProjectorSpec.pattern`` (a regular expression)
    lets one entry accept a family of names, as the built-in ``mlp<N>x_<act>`` does.
    """


@hookspec
def register_callbacks(register):
    """Register encoder callbacks: call ``register(CallbackSpec(...))`` once per callback.

    ``CallbackSpec.slots`` names the slots it fits (``preprocess``, ``postprocess_module``,
    ``postprocess_projector``); its ``factory`` takes the callback's parameters and returns the callable.
    """


@hookspec
def register_commands(app):
    """Add commands to the mmcore command line: ``app`` is the root ``typer.Typer``.

    Use ``@app.command()`` or ``app.add_typer(...)``. Import heavy modules inside the command
    functions, never here: this hook runs on every CLI start.
    """
