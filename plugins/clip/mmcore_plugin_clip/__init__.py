"""mmcore plugin: CLIP vision towers (transformers ``CLIPVisionModel``), LLaVA-style by default.

Registers the encoder ``clip``. This module imports no torch or transformers: it registers
metadata only; `mmcore_plugin_clip.factory` is imported when an encoder is built.

>>> import mmcore
>>> enc = mmcore.build_encoder("clip", preset="tiny")                     # doctest: +SKIP
>>> enc = mmcore.build_encoder("clip", "openai/clip-vit-large-patch14-336")  # doctest: +SKIP
"""

from __future__ import annotations

from mmcore import hookimpl
from mmcore.registry import EncoderSpec
from mmcore_plugin_clip.presets import PRESET_NAMES

__version__ = "0.1.0"

MMCORE_PLUGIN_API = 1


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="clip",
            modality="vision",
            summary="CLIP vision tower (transformers); penultimate layer, CLS dropped (LLaVA)",
            factory="mmcore_plugin_clip.factory:ClipFactory",
            default_checkpoint="openai/clip-vit-large-patch14",
            presets=PRESET_NAMES,
            tags=("transformers", "image", "llava"),
        )
    )
