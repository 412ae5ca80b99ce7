"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) to mmcore and back, sharing every weight.

OneVision is LLaVA-NeXT's tiling with two differences for images, plus video. In mmcore it is two
encoders over the same tower, projector and newline vector (`MultimodalModel` saves shared parts
once and shares them again at load, ``config.shared_modules``):

=====================================  ======================================================
LLaVA-OneVision                        mmcore
=====================================  ======================================================
``model.vision_tower``, projector,     both encoders' module and projector (one of each), as
feature layer and strategy             LLaVA's (`mmcore.convert.llava`)
``image_grid_pinpoints``               ``image``: ``anyres_flatten`` and ``anyres_pack``
``vision_aspect_ratio``                ``anyres_pack``'s ``max_patches`` (``anyres_max_9`` -> 9):
                                       unpad, then downscale a large grid
``batch_num_images``                   routed to ``image``: an image of a multi-image sample is
                                       its base tile alone, as transformers does
``model.image_newline``                ``anyres_pack``'s and ``video_pool``'s ``image_newline``
``pixel_values_videos``, its pooling   ``video``: ``video_frames``, the tower, ``video_pool``
(``apply_pooling``: 2x2 bilinear)      (stride 2, bilinear, one newline per video)
``image_token_index`` /                ``modality_token_ids`` ``image`` / ``video``
``video_token_index``
the processor                          the checkpoint's image processor (`AnyResTokenCount`)
                                       and video processor (`VideoTokenCount`)
=====================================  ======================================================
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)

from mmcore.builtin.anyres import AnyResPack, parse_vision_aspect_ratio
from mmcore.builtin.video import VideoFrames, VideoPool
from mmcore.convert import llava, llava_next
from mmcore.convert.families import NoTransformersCounterpartError
from mmcore.errors import ConfigError
from mmcore.modeling.encoder import ModalEncoderModule
from mmcore.modeling.multimodal import MultimodalModel

MODEL_TYPE = "llava_onevision"
MODALITY = llava.MODALITY
VIDEO_MODALITY = "video"
ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
#: OneVision's video pooling (transformers' ``apply_pooling``)
VIDEO_STRIDE, VIDEO_MODE = 2, "bilinear"


# -- in: LLaVA-OneVision -> mmcore ---------------------------------------------------------------------------
def from_hf(
    hf_model: LlavaOnevisionForConditionalGeneration,
    *,
    image_processor: Any = None,
    source: str | None = None,
    modality: str = MODALITY,
    video_modality: str = VIDEO_MODALITY,
) -> MultimodalModel:
    """The `MultimodalModel` that computes what ``hf_model`` computes for images and videos, holding
    its own modules (tower, projector Linears, ``image_newline``, decoder and head; no weight copied):
    encoders ``modality`` (anyres tiling) and ``video_modality`` (pooled frames) over one tower.
    ``image_processor`` is the checkpoint's (see `processor_from_hf`); ``source`` is recorded."""
    config = hf_model.config
    vision = config.vision_config
    hidden = config.text_config.hidden_size
    image = llava_next.anyres_encoder(
        hf_model, source, max_patches=parse_vision_aspect_ratio(config.vision_aspect_ratio),
        additional_args=("image_sizes", "batch_num_images"),
    )  # fmt: skip
    pool = VideoPool(
        vision.image_size, vision.patch_size, VIDEO_STRIDE, VIDEO_MODE, newline=True, hidden_size=hidden
    )
    pool.image_newline = hf_model.model.image_newline
    video = ModalEncoderModule(
        image.module,  # the same tower and projector: shared, saved once
        image.projector,
        VideoFrames(),
        copy.deepcopy(image.postprocess_module_callback),
        pool,
        additional_args=["num_frames"],
        input_names={"pixel_values_videos": "pixel_values"},
        output_width=image._output_width,
        source=copy.deepcopy(image.source),
    )
    mllm = MultimodalModel(
        encoders={modality: image, video_modality: video},
        language_model=llava.language_model(hf_model, MODEL_TYPE),
    )
    mllm.set_modality_token_ids(
        {modality: config.image_token_index, video_modality: config.video_token_index}
    )
    return mllm


def processor_from_hf(
    mllm: MultimodalModel,
    tokenizer: Any,
    chat_template: str | None = None,
    image_processor: Any = None,
    video_processor: Any = None,
) -> Any:
    """The `MultimodalProcessor` of a converted model: the checkpoint's tokenizer, its
    ``LlavaOnevisionImageProcessor`` (counted by `AnyResTokenCount` with ``max_patches``) and, when it
    has one, its ``LlavaOnevisionVideoProcessor`` (counted by `VideoTokenCount`)."""
    from mmcore.processing import MultimodalProcessor

    if image_processor is None:
        raise ConfigError(
            "llava_onevision: the checkpoint has no image processor; expected its LlavaOnevisionImageProcessor"
        )
    image_name, video_name = _modalities(mllm)
    names = [image_name] + ([video_name] if video_processor is not None else [])
    llava.check_placeholder_tokens(mllm, tokenizer, chat_template, {name: f"<{name}>" for name in names})
    processors = {image_name: image_processor}
    counts = {image_name: mllm.encoders[image_name].postprocess_projector_callback.token_count()}
    if video_processor is not None:
        processors[video_name] = video_processor
        counts[video_name] = mllm.encoders[video_name].postprocess_projector_callback.token_count()
    return MultimodalProcessor(processors, tokenizer, mllm, counts)


def _modalities(mllm: MultimodalModel) -> tuple[str, str | None]:
    """(the anyres encoder's name, the video encoder's name or None); `NoTransformersCounterpartError`
    for any other set of encoders."""
    image = [n for n, e in mllm.encoders.items() if isinstance(e.postprocess_projector_callback, AnyResPack)]
    video = [n for n, e in mllm.encoders.items() if isinstance(e.postprocess_projector_callback, VideoPool)]
    if len(image) != 1 or len(video) > 1 or len(image) + len(video) != len(mllm.encoders):
        raise NoTransformersCounterpartError(
            f"encoders {', '.join(mllm.encoders)}: LlavaOnevisionForConditionalGeneration holds one anyres image "
            "encoder (anyres_pack) and at most one video encoder (video_pool) over the same tower"
        )
    return image[0], (video[0] if video else None)


# -- out: mmcore -> LLaVA-OneVision --------------------------------------------------------------------------
def claims(mllm: MultimodalModel) -> bool:
    """Whether ``mllm`` has OneVision's shape: a video pool, or tiling downscaled to ``max_patches``."""
    packs = [e.postprocess_projector_callback for e in mllm.encoders.values()]
    return any(isinstance(p, VideoPool) or (isinstance(p, AnyResPack) and p.max_patches is not None) for p in packs)


def to_hf(mllm: MultimodalModel) -> LlavaOnevisionForConditionalGeneration:
    """The ``LlavaOnevisionForConditionalGeneration`` holding ``mllm``'s own modules, when ``mllm`` is
    OneVision's shape (an anyres encoder with ``max_patches``, and optionally a pooled video encoder
    over the same tower, projector and newline); `NoTransformersCounterpartError` naming the part
    otherwise."""
    image_name, video_name = _modalities(mllm)
    encoder = mllm.encoders[image_name]
    parts = llava.llava_parts(mllm, image_name, encoder, other_slots=False)
    pack = llava_next.anyres_pack(image_name, encoder, parts.tower, "OneVision")
    if pack.max_patches is None:
        raise NoTransformersCounterpartError(
            f"encoder {image_name!r}: OneVision downscales a large grid (anyres_pack max_patches); this one has no "
            "max_patches"
        )
    video_token_id = None
    if video_name is not None:
        _check_video(mllm, video_name, encoder, (parts.layer, parts.strategy))
        video_token_id = mllm.config.modality_token_ids.get(video_name)
    config = LlavaOnevisionConfig(
        **parts.config_fields(),
        **({"video_token_index": int(video_token_id)} if video_token_id is not None else {}),
        image_grid_pinpoints=[list(p) for p in pack.grid_pinpoints],
        vision_aspect_ratio=f"anyres_max_{pack.max_patches}",
    )
    return llava.build_export(
        LlavaOnevisionForConditionalGeneration, config, parts, mllm, image_newline=pack.image_newline
    )


def _check_video(mllm: MultimodalModel, name: str, image: ModalEncoderModule, selection: tuple) -> None:
    """The video encoder must be OneVision's: the image encoder's tower, projector and newline, its
    feature selection, `VideoFrames` and a 2x2 bilinear `VideoPool` with the newline."""
    video = mllm.encoders[name]
    pack, pool = image.postprocess_projector_callback, video.postprocess_projector_callback
    if video.module is not image.module or video.projector is not image.projector:
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: OneVision runs videos through the image encoder's own tower and projector; this "
            "video encoder has its own"
        )
    if not isinstance(video.preprocess_callback, VideoFrames):
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: its preprocess callback must be video_frames"
        )
    if (pool.stride, pool.mode, pool.newline) != (
        VIDEO_STRIDE,
        VIDEO_MODE,
        True,
    ) or pool.image_newline is not pack.image_newline:
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: OneVision pools video frames 2x2 bilinear and closes each video with the image "
            f"newline; got {pool!r}"
        )
    if llava._feature_selection(name, video, video.module, other_slots=False) != selection:
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: OneVision selects video features as it selects image features"
        )


def hf_processor(hf_model: LlavaOnevisionForConditionalGeneration, tokenizer: Any, image_processor: Any,
                 video_processor: Any = None) -> LlavaOnevisionProcessor:  # fmt: skip
    """transformers' ``LlavaOnevisionProcessor`` for an exported model (``image_processor``: the
    ``LlavaOnevisionImageProcessor`` the model was trained with; ``video_processor``: its video one,
    default: a ``LlavaOnevisionVideoProcessor`` at the tower's size)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor

    config = hf_model.config
    if not isinstance(image_processor, LlavaOnevisionImageProcessor):
        raise NoTransformersCounterpartError(
            f"the processor's image processor is {type(image_processor).__name__}; LLaVA-OneVision's is a "
            "LlavaOnevisionImageProcessor (tiles and image_sizes)"
        )
    if video_processor is None:
        side = config.vision_config.image_size
        video_processor = LlavaOnevisionVideoProcessor(
            size={"height": side, "width": side},
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
        )
    kinds = (("image", config.image_token_index), ("video", config.video_token_index))
    tokens = {kind: llava.special_token(tokenizer, token_id, kind) for kind, token_id in kinds}
    side = config.vision_config.image_size // config.vision_config.patch_size
    prefix = llava._prefix_tokens(hf_model.model.vision_tower)
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        # transformers' processor subtracts one for the 'default' strategy: the tower's CLS is counted in
        num_image_tokens=side * side + (prefix if config.vision_feature_select_strategy == "default" else 0),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token=tokens["image"],
        video_token=tokens["video"],
        vision_aspect_ratio=config.vision_aspect_ratio,
    )


def hf_processor_for(
    hf_model: LlavaOnevisionForConditionalGeneration, processor: Any
) -> LlavaOnevisionProcessor:
    """`hf_processor` from an mmcore `MultimodalProcessor`: the image and (when present) video
    processors of the modalities whose placeholders are the config's image and video tokens."""
    config = hf_model.config
    by_id = {token_id: m for m, token_id in processor.token_ids.items()}
    image, video = by_id.get(config.image_token_index), by_id.get(config.video_token_index)
    if image is None:
        raise NoTransformersCounterpartError(
            f"the processor has no placeholder for the image token id {config.image_token_index}; OneVision needs one"
        )
    return hf_processor(
        hf_model,
        processor.tokenizer,
        processor.encoder_processors[image],
        processor.encoder_processors.get(video) if video else None,
    )
