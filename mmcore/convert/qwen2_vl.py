"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) to mmcore and back, sharing every weight; Qwen2.5-VL
(`mmcore.convert.qwen2_5_vl`) is the same with its own classes.

==========================================  =====================================================
Qwen2-VL                                    mmcore
==========================================  =====================================================
``model.visual`` (patch embedding, rotary   ``encoders["image"].module``, a ``qwen2vl:qwen2_vl``
positions, blocks)                          plugin encoder (`Qwen2VLVisionTower`: the same modules)
``model.visual.merger``                     its projector, ``qwen2vl:qwen2_vl_merger`` (the same
                                            ``ln_q`` and ``mlp``)
the same tower and merger for videos        ``encoders["video"]`` (the ``video`` option), holding
                                            the image encoder's modules (tied, saved once)
``get_rope_index`` / ``rope_deltas``        the ``mrope`` preprocess_llm callback
``model.language_model`` + ``lm_head``      `Qwen2VLTextForCausalLM` (the same modules)
``image_token_id`` / ``video_token_id``     ``modality_token_ids["image"]`` / ``["video"]``
==========================================  =====================================================

Needs the ``mmcore-plugin-qwen2vl`` plugin (its encoders). The checkpoint's ``Qwen2VLProcessor`` output
(``input_ids``, ``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``,
``mm_token_type_ids``) goes into the mmcore model as it is; `processor_from_hf` is the mmcore
processor that makes the same ``input_ids`` (the checkpoint's ``<|image_pad|>`` / ``<|video_pad|>``
as the placeholders) and `hf_processor_for` the ``Qwen2VLProcessor`` an export writes.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from mmcore.builtin.mrope import MRope, Qwen2VLTextForCausalLM
from mmcore.convert import llava
from mmcore.convert.families import NoTransformersCounterpartError
from mmcore.errors import ConfigError
from mmcore.factory import encoder_from_recipe, get_factory
from mmcore.modeling.encoder import ModalEncoderModule
from mmcore.modeling.multimodal import MultimodalModel

MODEL_TYPE = "qwen2_vl"
ARCHITECTURE = "Qwen2VLForConditionalGeneration"
IMAGE, VIDEO = "image", "video"


class Family:
    """What differs between Qwen2-VL and Qwen2.5-VL; `QWEN2_VL` here, ``QWEN2_5_VL`` in `qwen2_5_vl`."""

    def __init__(
        self, model_type: str, hf_class: type, config_class: type, text_lm_class: type, encoder: str
    ):
        self.model_type, self.hf_class, self.config_class = model_type, hf_class, config_class
        self.text_lm_class, self.encoder = text_lm_class, encoder

    @property
    def architecture(self) -> str:
        return self.hf_class.__name__


QWEN2_VL = Family(
    MODEL_TYPE, Qwen2VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLTextForCausalLM, "qwen2vl:qwen2_vl"
)


def from_hf(
    hf_model: Any, *, image_processor: Any = None, source: str | None = None, family: Family = QWEN2_VL
) -> MultimodalModel:
    """The `MultimodalModel` that computes what ``hf_model`` computes, holding its own modules: an
    ``image`` and a ``video`` encoder sharing its tower and merger, its language model and the
    ``mrope`` callback. ``image_processor`` (the checkpoint's) sets the recipe's pixel budget."""
    from mmcore_plugin_qwen2vl.modules import TOWER_PARTS

    config = hf_model.config
    factory = get_factory(family.encoder)
    recipe = _recipe(factory, config, image_processor, source)
    visual = hf_model.model.visual
    image = encoder_from_recipe(factory, recipe, device="meta")
    for part in TOWER_PARTS:
        setattr(image.module, part, getattr(visual, part))
    image.projector = factory.merger_projector(recipe, config.text_config.hidden_size, visual.merger)
    video = encoder_from_recipe(factory, {**recipe, "video": True}, device="meta")
    video.module, video.projector = image.module, image.projector  # one tower for both, as transformers'
    vision = config.vision_config
    mllm = MultimodalModel(
        encoders={IMAGE: image, VIDEO: video},
        language_model=llava.language_model(hf_model, family.model_type, family.text_lm_class),
        preprocess_llm_callback=MRope(
            config.image_token_id, config.video_token_id, family=family.model_type,
            spatial_merge_size=vision.spatial_merge_size, tokens_per_second=getattr(vision, "tokens_per_second", None),
        ),
    )  # fmt: skip
    mllm.set_modality_token_ids({IMAGE: config.image_token_id, VIDEO: config.video_token_id})
    return mllm


def _recipe(factory: Any, config: Any, image_processor: Any, source: str | None) -> dict[str, Any]:
    """The plugin's recipe, made by the plugin itself from a directory holding the checkpoint's config
    and image processor (no weights)."""
    with tempfile.TemporaryDirectory(prefix="mmcore-qwen2vl-vision-") as tmp:
        config.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        recipe = factory.make_recipe(checkpoint=tmp)
    recipe["checkpoint"] = source
    return recipe


def processor_from_hf(
    mllm: MultimodalModel, tokenizer: Any, chat_template: str | None = None, image_processor: Any = None
) -> Any:
    """The `MultimodalProcessor` of a converted model: the checkpoint's tokenizer, whose image and video
    pad tokens (``<|image_pad|>``, ``<|video_pad|>``) are the model's placeholders, and the plugin's image
    and video processors from the recipes (the checkpoint's pixel budget). Its ``input_ids`` are those
    ``Qwen2VLProcessor`` makes; the chat template goes onto the tokenizer when it has none."""
    from mmcore.processing import MultimodalProcessor

    tokens = {m: tokenizer.convert_ids_to_tokens(token_id) for m, token_id in mllm.config.modality_token_ids.items()}
    llava.check_placeholder_tokens(mllm, tokenizer, chat_template, tokens)
    return MultimodalProcessor.from_model(mllm, tokenizer, predefined_tokens=tokens)


# -- out: mmcore -> Qwen2-VL --------------------------------------------------------------------------------
def tower_encoders(mllm: MultimodalModel) -> set[str]:
    """The qwen2vl plugin's tower encoders among ``mllm``'s (``qwen2vl:qwen2_vl`` / ``qwen2vl:qwen2_5_vl``)."""
    names = {(e.source or {}).get("encoder") for e in mllm.encoders.values()}
    return names & {"qwen2vl:qwen2_vl", "qwen2vl:qwen2_5_vl"}


def claims(mllm: MultimodalModel) -> bool:
    """Whether ``mllm`` has a Qwen2-VL tower (`to_hf` says what else does not fit)."""
    return "qwen2vl:qwen2_vl" in tower_encoders(mllm)


def to_hf(mllm: MultimodalModel, family: Family = QWEN2_VL) -> Any:
    """The ``Qwen2VLForConditionalGeneration`` holding ``mllm``'s modules, when ``mllm`` is the plugin's
    tower with its merger projector (an image encoder, and optionally a video one sharing them), the
    ``mrope`` callback and a Qwen2-VL text model; `NoTransformersCounterpartError` naming the part otherwise."""
    from mmcore_plugin_qwen2vl.modules import TOWER_PARTS

    image, video = _encoders(mllm, family)
    tower, projector = image.module, image.projector
    callback = mllm.preprocess_llm_callback
    if not isinstance(callback, MRope) or callback.family != family.model_type:
        raise NoTransformersCounterpartError(
            f"the language model's positions: {family.architecture} computes 3-D rotary positions (the mrope "
            f"callback, family {family.model_type!r}), this model has {callback!r}"
        )
    llm, base = llava._llm_parts(mllm)
    if not isinstance(llm, family.text_lm_class):
        raise NoTransformersCounterpartError(
            f"language model {type(llm).__name__}: {family.architecture} holds a {family.text_lm_class.__name__}"
        )
    if mllm.config.modality_wrap_token_ids:
        raise NoTransformersCounterpartError(
            f"start/end tokens around each item (wrap) have no {family.architecture} counterpart"
        )
    ids = mllm.config.modality_token_ids
    image_id = ids[_name(mllm, image)]
    video_id = ids[_name(mllm, video)] if video is not None else callback.video_token_id
    if (callback.image_token_id, callback.video_token_id) != (image_id, video_id):
        raise ConfigError(
            f"mrope's token ids {callback.image_token_id, callback.video_token_id} are not the model's {image_id, video_id}"
        )
    config = family.config_class(
        vision_config=tower.config.to_dict(), image_token_id=image_id,
        **({"video_token_id": video_id} if video_id is not None else {}), **llava.text_fields(llm),
    )  # fmt: skip
    with torch.device("meta"):
        hf = family.hf_class(config)
    visual = hf.model.visual
    for part in TOWER_PARTS:
        setattr(visual, part, getattr(tower, part))
    visual.merger.ln_q, visual.merger.mlp = projector.projection.ln_q, projector.projection.mlp
    return llava.finish_export(hf, mllm, base, llm, family.architecture)


def _encoders(mllm: MultimodalModel, family: Family) -> tuple[ModalEncoderModule, ModalEncoderModule | None]:
    """(image encoder, video encoder or None): the plugin's tower and merger, the video one sharing them."""
    from mmcore_plugin_qwen2vl.modules import MergerProjection

    factory = get_factory(family.encoder)
    images, videos = [], []
    for name, encoder in mllm.encoders.items():
        source = encoder.source or {}
        projection = getattr(encoder.projector, "projection", None)
        if (
            source.get("encoder") != factory.name
            or type(encoder.module) is not factory.tower_class
            or not isinstance(projection, MergerProjection)
        ):
            raise NoTransformersCounterpartError(
                f"encoder {name!r}: {family.architecture} holds one {factory.name} tower with its patch merger as the "
                f"projector, not {type(encoder.module).__name__} with {type(projection).__name__}"
            )
        if any(encoder.callbacks().values()):
            raise NoTransformersCounterpartError(
                f"encoder {name!r}: its callbacks have no {family.architecture} counterpart"
            )
        (videos if source["recipe"].get("video") else images).append(encoder)
    if len(images) != 1 or len(videos) > 1:
        raise NoTransformersCounterpartError(
            f"{len(images)} image and {len(videos)} video encoders: {family.architecture} holds one tower, for "
            "images and (the same) for videos"
        )
    image, video = images[0], (videos[0] if videos else None)
    if video is not None and (
        video.module is not image.module or video.projector.projection is not image.projector.projection
    ):
        raise NoTransformersCounterpartError(
            f"the image and video encoders have their own towers; {family.architecture} has one for both"
        )
    return image, video


def _name(mllm: MultimodalModel, encoder: ModalEncoderModule) -> str:
    return next(name for name, e in mllm.encoders.items() if e is encoder)


def hf_processor_for(hf_model: Any, processor: Any) -> Any:
    """transformers' ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` for an exported model: the mmcore
    processor's tokenizer (with its chat template), image and video processors."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    config = hf_model.config
    by_id = {token_id: m for m, token_id in processor.token_ids.items()}
    image = by_id.get(config.image_token_id)
    if image is None:
        raise NoTransformersCounterpartError(
            f"the processor has no placeholder for the image token id {config.image_token_id}"
        )
    video = by_id.get(config.video_token_id)
    tokenizer = processor.tokenizer
    cls = Qwen2_5_VLProcessor if config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if video is not None:  # transformers' own class (the plugin's Qwen2.5-VL one adds second_per_grid_ts)
        video_processor = Qwen2VLVideoProcessor.from_dict(processor.encoder_processors[video].to_dict())
    else:  # an image-only model: the video processor of the same patches
        image_processor = processor.encoder_processors[image]
        video_processor = Qwen2VLVideoProcessor(
            patch_size=image_processor.patch_size, temporal_patch_size=image_processor.temporal_patch_size,
            merge_size=image_processor.merge_size, size=dict(image_processor.size),
        )  # fmt: skip
    return cls(
        image_processor=processor.encoder_processors[image], tokenizer=tokenizer, video_processor=video_processor,
        chat_template=getattr(tokenizer, "chat_template", None),
    )  # fmt: skip
