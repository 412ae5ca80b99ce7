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

#: projector name -> (one-line summary, a pattern of further names it answers to, or None)
_PROJECTORS = {
    "linear": ("one Linear layer", None),
    "mlp": ("Linear, activation, Linear", None),
    "mlpNx_act": (
        "LLaVA grammar mlp<N>x_<act>: N Linear layers with activation <act>, e.g. mlp2x_gelu",
        r"mlp(\d+)x_(\w+)",
    ),
    "resampler": ("learnable queries cross-attend over the encoder tokens; fixed output length", None),
}

#: callback name -> (the slot it fits, its factory "module:attr" under mmcore.builtin, one-line summary)
_CALLBACKS = {
    "select_feature_layer": (
        "postprocess_module",
        "callbacks:SelectFeatureLayer",
        "use a chosen hidden layer of the encoder (LLaVA: -2), optionally dropping prefix tokens",
    ),
    "drop_prefix_tokens": (
        "postprocess_module",
        "callbacks:DropPrefixTokens",
        "drop the first N tokens of the encoder output (CLS or register tokens)",
    ),
    "anyres_flatten": (
        "preprocess",
        "anyres:AnyResFlatten",
        "LLaVA-NeXT anyres: the padded (images, tiles, 3, H, W) pixel_values become the real tiles",
    ),
    "anyres_pack": (
        "postprocess_projector",
        "anyres:AnyResPack",
        "LLaVA-NeXT anyres: base tile + the unpadded tile grid with a learnable image_newline per row "
        "(max_patches: OneVision's anyres_max downscaling)",
    ),
    "video_frames": (
        "preprocess",
        "video:VideoFrames",
        "video: (videos, frames, 3, H, W) pixel_values become the real frames of every video",
    ),
    "video_pool": (
        "postprocess_projector",
        "video:VideoPool",
        "video (LLaVA-Video / OneVision): each frame's patch grid pooled 2x2, frames concatenated",
    ),
    "qwen2_audio_padding_mask": (
        "preprocess",
        "qwen2_audio:Qwen2AudioPaddingMask",
        "Qwen2-Audio: feature_attention_mask -> the tower's attention mask over real frames",
    ),
    "qwen2_audio_trim": (
        "postprocess_projector",
        "qwen2_audio:Qwen2AudioTrim",
        "Qwen2-Audio: each clip keeps the tokens its own length covers (pooled)",
    ),
    "mrope": (
        "preprocess_llm",
        "mrope:MRope",
        "Qwen2-VL / Qwen2.5-VL: 3-D rotary positions from input_ids and the image/video grids "
        "(prefill and decode)",
    ),
}


@hookimpl
def register_projectors(register):
    for name, (summary, pattern) in _PROJECTORS.items():
        register(ProjectorSpec(name=name, summary=summary, factory=_PROJECTOR, pattern=pattern))


@hookimpl
def register_callbacks(register):
    for name, (slot, factory, summary) in _CALLBACKS.items():
        register(CallbackSpec(name=name, slots=(slot,), summary=summary, factory=f"mmcore.builtin.{factory}"))
