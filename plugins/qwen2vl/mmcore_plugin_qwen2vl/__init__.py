"""mmcore plugin: the Qwen2-VL and Qwen2.5-VL native-resolution vision towers (transformers).

Imported on every `mmcore` command, so it registers metadata only and imports no torch or
transformers: the factories (`mmcore_plugin_qwen2vl.factory`) and the patch-merger projectors
(`mmcore_plugin_qwen2vl.modules`) are loaded when something is built.
"""

from mmcore import hookimpl
from mmcore.registry import EncoderSpec, ProjectorSpec
from mmcore_plugin_qwen2vl.presets import DEFAULT_CHECKPOINTS, PRESET_NAMES

MMCORE_PLUGIN_API = 1  # the plugin-API version this plugin is written for


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="qwen2_vl",
            modality="vision",
            summary=(
                "Qwen2-VL vision tower (transformers); native resolution, images and videos as one flat "
                "patch sequence, tokens per item t*h*w/4; its patch merger is the projector"
            ),
            factory="mmcore_plugin_qwen2vl.factory:Qwen2VLFactory",
            default_checkpoint=DEFAULT_CHECKPOINTS["qwen2_vl"],
            presets=PRESET_NAMES["qwen2_vl"],
            tags=("transformers", "vision", "video", "native-resolution"),
        )
    )
    register(
        EncoderSpec(
            name="qwen2_5_vl",
            modality="vision",
            summary=(
                "Qwen2.5-VL vision tower (transformers); windowed attention, native resolution, images and "
                "videos, tokens per item t*h*w/4; its patch merger is the projector"
            ),
            factory="mmcore_plugin_qwen2vl.factory:Qwen25VLFactory",
            default_checkpoint=DEFAULT_CHECKPOINTS["qwen2_5_vl"],
            presets=PRESET_NAMES["qwen2_5_vl"],
            tags=("transformers", "vision", "video", "native-resolution"),
        )
    )


@hookimpl
def register_projectors(register):
    register(
        ProjectorSpec(
            name="qwen2_vl_merger",
            summary="Qwen2-VL's patch merger: LayerNorm, each 2x2 patches concatenated, Linear-GELU-Linear (4 patches -> 1 token)",
            factory="mmcore_plugin_qwen2vl.modules:Qwen2VLMergerProjection.from_projector_config",
        )
    )
    register(
        ProjectorSpec(
            name="qwen2_5_vl_merger",
            summary="Qwen2.5-VL's patch merger: RMSNorm, each 2x2 patches concatenated, Linear-GELU-Linear (4 patches -> 1 token)",
            factory="mmcore_plugin_qwen2vl.modules:Qwen25VLMergerProjection.from_projector_config",
        )
    )
