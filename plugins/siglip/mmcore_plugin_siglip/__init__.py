"""mmcore plugin: SigLIP vision towers (transformers ``SiglipVisionModel``), LLaVA-OneVision-style.

Registers the encoder ``siglip``. This module imports no torch or transformers: it registers
metadata only; `mmcore_plugin_siglip.factory` is imported when an encoder is built.

>>> import mmcore
>>> enc = mmcore.build_encoder("siglip", preset="tiny")                          # doctest: +SKIP
>>> enc = mmcore.build_encoder("siglip", "google/siglip-so400m-patch14-384")     # doctest: +SKIP
"""

from __future__ import annotations

from mmcore import hookimpl
from mmcore.registry import EncoderSpec
from mmcore_plugin_siglip.presets import PRESET_NAMES

__version__ = "0.1.0"

MMCORE_PLUGIN_API = 1


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="siglip",
            modality="vision",
            summary="SigLIP vision tower (transformers); last layer, pooling head left out (LLaVA-OneVision)",
            factory="mmcore_plugin_siglip.factory:SiglipFactory",
            default_checkpoint="google/siglip-so400m-patch14-384",
            presets=PRESET_NAMES,
            tags=("transformers", "image", "llava"),
        )
    )
