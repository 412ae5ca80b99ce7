"""mmcore plugin: EVA02 (and any timm ViT) vision encoders, as OmniLMM uses them.

Imported on every `mmcore` command, so it registers metadata only and imports no torch or timm:
the factory (`mmcore_plugin_eva02.factory:Eva02Factory`) is loaded when an encoder is built.
"""

from mmcore import hookimpl
from mmcore.registry import EncoderSpec
from mmcore_plugin_eva02.presets import DEFAULT_CHECKPOINT, PRESET_NAMES

MMCORE_PLUGIN_API = 1  # the plugin-API version this plugin is written for


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="eva02",
            modality="vision",
            summary="EVA02 ViT from timm (any timm ViT on request): penultimate block, prefix tokens dropped",
            factory="mmcore_plugin_eva02.factory:Eva02Factory",
            default_checkpoint=DEFAULT_CHECKPOINT,
            presets=PRESET_NAMES,
            tags=("timm", "vit", "image"),
        )
    )
