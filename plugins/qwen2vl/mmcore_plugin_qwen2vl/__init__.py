"""mmcore plugin: the Qwen2-VL and Qwen2.5-VL native-resolution vision towers (transformers).

Imported on every `mmcore` command, so it registers metadata only and imports no torch or
transformers: the factories (`mmcore_plugin_qwen2vl.factory`) and the patch-merger projectors
(`mmcore_plugin_qwen2vl.modules`) are loaded when something is built.
"""

from mmcore import hookimpl
from mmcore.registry import EncoderSpec, ProjectorSpec
from mmcore_plugin_qwen2vl.presets import DEFAULT_CHECKPOINTS, PRESET_NAMES

MMCORE_PLUGIN_API = 1  # the plugin-API version this plugin is written for

#: encoder name -> (display name, what the tower does, its factory class, its merger's class and norm).
#: Each tower registers an encoder and its patch merger the projector ``<name>_merger``.
_TOWERS = {
    "qwen2_vl": (
        "Qwen2-VL",
        "native resolution, images and videos as one flat patch sequence",
        "Qwen2VLFactory",
        "Qwen2VLMergerProjection",
        "LayerNorm",
    ),
    "qwen2_5_vl": (
        "Qwen2.5-VL",
        "windowed attention, native resolution, images and videos",
        "Qwen25VLFactory",
        "Qwen25VLMergerProjection",
        "RMSNorm",
    ),
}


@hookimpl
def register_encoders(register):
    for name, (display, what, factory, _, _) in _TOWERS.items():
        register(
            EncoderSpec(
                name=name,
                modality="vision",
                summary=f"{display} vision tower (transformers); {what}, tokens per item t*h*w/4; "
                "its patch merger is the projector",
                factory=f"mmcore_plugin_qwen2vl.factory:{factory}",
                default_checkpoint=DEFAULT_CHECKPOINTS[name],
                presets=PRESET_NAMES[name],
                tags=("transformers", "vision", "video", "native-resolution"),
            )
        )


@hookimpl
def register_projectors(register):
    for name, (display, _, _, merger, norm) in _TOWERS.items():
        register(
            ProjectorSpec(
                name=f"{name}_merger",
                summary=f"{display}'s patch merger: {norm}, each 2x2 patches concatenated, Linear-GELU-Linear "
                "(4 patches -> 1 token)",
                factory=f"mmcore_plugin_qwen2vl.modules:{merger}.from_projector_config",
            )
        )
