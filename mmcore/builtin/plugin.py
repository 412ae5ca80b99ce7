"""The built-in projectors and callbacks, registered as an ordinary plugin named ``builtin``.

This makes the registry the one place that lists what exists. Like every plugin, it registers
metadata only: the factories (in `mmcore.modeling.projector` and `mmcore.builtin.callbacks`) are
imported when something is built.

Projector factories are `MultimodalProjector`, built from a
``MultimodalProjectorConfig(projector_type=<the requested name>, ...)``.
"""

from __future__ import annotations

from mmcore.hookspecs import PLUGIN_API_VERSION, hookimpl
from mmcore.registry import CallbackSpec, ProjectorSpec

MMCORE_PLUGIN_API = PLUGIN_API_VERSION

_PROJECTOR = "mmcore.modeling.projector:MultimodalProjector"


@hookimpl
def register_projectors(register):
    register(ProjectorSpec(name="linear", summary="one Linear layer", factory=_PROJECTOR))
    register(ProjectorSpec(name="mlp", summary="Linear, activation, Linear", factory=_PROJECTOR))
    register(
        ProjectorSpec(
            name="mlpNx_act",
            summary="LLaVA grammar mlp<N>x_<act>: N Linear layers with activation <act>, e.g. mlp2x_gelu",
            factory=_PROJECTOR,
            pattern=r"mlp(\d+)x_(\w+)",
        )
    )
    register(
        ProjectorSpec(
            name="resampler",
            summary="learnable queries cross-attend over the encoder tokens; fixed output length",
            factory=_PROJECTOR,
        )
    )


@hookimpl
def register_callbacks(register):
    register(
        CallbackSpec(
            name="select_feature_layer",
            slots=("postprocess_module",),
            summary="use a chosen hidden layer of the encoder (LLaVA: -2), optionally dropping prefix tokens",
            factory="mmcore.builtin.callbacks:SelectFeatureLayer",
        )
    )
    register(
        CallbackSpec(
            name="drop_prefix_tokens",
            slots=("postprocess_module",),
            summary="drop the first N tokens of the encoder output (CLS or register tokens)",
            factory="mmcore.builtin.callbacks:DropPrefixTokens",
        )
    )
    register(
        CallbackSpec(
            name="anyres_flatten",
            slots=("preprocess",),
            summary="LLaVA-NeXT anyres: the padded (images, tiles, 3, H, W) pixel_values become the real tiles",
            factory="mmcore.builtin.anyres:AnyResFlatten",
        )
    )
    register(
        CallbackSpec(
            name="anyres_pack",
            slots=("postprocess_projector",),
            summary="LLaVA-NeXT anyres: base tile + the unpadded tile grid with a learnable image_newline per row "
            "(max_patches: OneVision's anyres_max downscaling)",
            factory="mmcore.builtin.anyres:AnyResPack",
        )
    )
    register(
        CallbackSpec(
            name="video_frames",
            slots=("preprocess",),
            summary="video: (videos, frames, 3, H, W) pixel_values become the real frames of every video",
            factory="mmcore.builtin.video:VideoFrames",
        )
    )
    register(
        CallbackSpec(
            name="video_pool",
            slots=("postprocess_projector",),
            summary="video (LLaVA-Video / OneVision): each frame's patch grid pooled 2x2, frames concatenated",
            factory="mmcore.builtin.video:VideoPool",
        )
    )
    register(
        CallbackSpec(
            name="qwen2_audio_padding_mask",
            slots=("preprocess",),
            summary="Qwen2-Audio: feature_attention_mask -> the tower's attention mask over real frames",
            factory="mmcore.builtin.qwen2_audio:Qwen2AudioPaddingMask",
        )
    )
    register(
        CallbackSpec(
            name="qwen2_audio_trim",
            slots=("postprocess_projector",),
            summary="Qwen2-Audio: each clip keeps the tokens its own length covers (pooled)",
            factory="mmcore.builtin.qwen2_audio:Qwen2AudioTrim",
        )
    )
    register(
        CallbackSpec(
            name="mrope",
            slots=("preprocess_llm",),
            summary="Qwen2-VL / Qwen2.5-VL: 3-D rotary positions from input_ids and the image/video grids (prefill and decode)",
            factory="mmcore.builtin.mrope:MRope",
        )
    )
