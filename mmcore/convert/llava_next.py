"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) to mmcore and back, sharing every weight.

LLaVA-NeXT is LLaVA plus any-resolution tiling; in mmcore that is LLaVA's encoder (the ``clip`` or
``siglip`` plugin encoder with LLaVA's feature selection, an ``mlp2x_<act>`` projector) with the
built-in anyres callbacks around it (`mmcore.builtin.anyres`):

=====================================  ======================================================
LLaVA-NeXT                             mmcore
=====================================  ======================================================
``model.vision_tower``, projector,     as for LLaVA (`mmcore.convert.llava`)
feature layer and strategy
``image_grid_pinpoints``               ``anyres_flatten`` (preprocess) and ``anyres_pack``
                                       (postprocess_projector) parameters
``model.image_newline``                ``anyres_pack``'s ``image_newline`` (the same parameter)
``image_sizes``                        routed to the encoder for the callbacks (``additional_args``)
the image processor                    the checkpoint's ``LlavaNextImageProcessor`` with
                                       `~mmcore.builtin.anyres.AnyResTokenCount` as the count
=====================================  ======================================================
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

from mmcore.builtin.anyres import AnyResFlatten, AnyResPack
from mmcore.convert import llava
from mmcore.convert.families import NoTransformersCounterpartError
from mmcore.errors import ConfigError
from mmcore.modeling.encoder import ModalEncoderModule
from mmcore.modeling.multimodal import MultimodalModel

MODEL_TYPE = "llava_next"
MODALITY = llava.MODALITY
ARCHITECTURE = "LlavaNextForConditionalGeneration"


# -- in: LLaVA-NeXT -> mmcore -------------------------------------------------------------------------------
def from_hf(
    hf_model: LlavaNextForConditionalGeneration,
    *,
    image_processor: Any = None,
    source: str | None = None,
    modality: str = MODALITY,
) -> MultimodalModel:
    """The `MultimodalModel` that computes what ``hf_model`` computes, holding its own modules (tower,
    projector Linears, ``image_newline``, decoder and head; no weight copied). ``image_processor`` is
    the checkpoint's (it goes to the processor, see `processor_from_hf`); ``source`` is recorded for
    reference."""
    encoder = anyres_encoder(hf_model, source)
    mllm = MultimodalModel(
        encoders={modality: encoder}, language_model=llava.language_model(hf_model, MODEL_TYPE)
    )
    mllm.set_modality_token_ids({modality: hf_model.config.image_token_index})
    return mllm


def anyres_encoder(
    hf_model: Any,
    source: str | None,
    *,
    max_patches: int | None = None,
    additional_args: tuple[str, ...] = ("image_sizes",),
) -> ModalEncoderModule:
    """LLaVA's encoder of ``hf_model``'s tower and projector (`mmcore.convert.llava.vision_encoder`)
    between the anyres callbacks of its grid resolutions, which hold its ``image_newline``;
    ``max_patches``: OneVision's downscaling; ``additional_args``: the inputs routed to the callbacks."""
    config = hf_model.config
    # The plugin's recipe rebuilds the tower (its own preprocessing at the tile size); the tiling is
    # the checkpoint's image processor's, kept by the processor.
    encoder = llava.vision_encoder(hf_model, None, source)
    vision = config.vision_config
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    encoder.preprocess_callback = AnyResFlatten(pinpoints, vision.image_size)
    hidden = config.text_config.hidden_size
    pack = AnyResPack(pinpoints, vision.image_size, vision.patch_size, hidden, max_patches=max_patches)
    pack.image_newline = hf_model.model.image_newline  # the checkpoint's own parameter
    encoder.postprocess_projector_callback = pack
    encoder.additional_args = additional_args
    for name in additional_args:
        encoder.input_map.setdefault(name, name)
    return encoder


def processor_from_hf(
    mllm: MultimodalModel, tokenizer: Any, chat_template: str | None = None, image_processor: Any = None
) -> Any:
    """The `MultimodalProcessor` of a converted model: the checkpoint's tokenizer and
    ``LlavaNextImageProcessor`` (tiles and ``image_sizes``), counting each image's tokens with
    `AnyResTokenCount`."""
    from mmcore.processing import MultimodalProcessor

    llava.check_placeholder_tokens(mllm, tokenizer, chat_template)
    if image_processor is None:
        raise ConfigError("llava_next: the checkpoint has no image processor; expected its LlavaNextImageProcessor")
    ((modality, encoder),) = mllm.encoders.items()
    count = encoder.postprocess_projector_callback.token_count()  # AnyResTokenCount of the same grid
    return MultimodalProcessor({modality: image_processor}, tokenizer, mllm, {modality: count})


# -- out: mmcore -> LLaVA-NeXT ------------------------------------------------------------------------------
def claims(mllm: MultimodalModel) -> bool:
    """Whether ``mllm`` has LLaVA-NeXT's shape: one encoder with the anyres pack."""
    return len(mllm.encoders) == 1 and isinstance(
        next(iter(mllm.encoders.values())).postprocess_projector_callback, AnyResPack
    )


def to_hf(mllm: MultimodalModel) -> LlavaNextForConditionalGeneration:
    """The ``LlavaNextForConditionalGeneration`` holding ``mllm``'s own modules, when ``mllm`` is LLaVA's
    shape (see `mmcore.convert.llava.to_hf`) with the anyres callbacks; `NoTransformersCounterpartError`
    naming the part otherwise."""
    if len(mllm.encoders) != 1:
        raise NoTransformersCounterpartError(
            f"{len(mllm.encoders)} encoders ({', '.join(mllm.encoders)}): LlavaNextForConditionalGeneration holds "
            "exactly one vision tower"
        )
    ((name, encoder),) = mllm.encoders.items()
    parts = llava.llava_parts(mllm, name, encoder, other_slots=False)
    pack = anyres_pack(name, encoder, parts.tower, "LLaVA-NeXT")
    config = LlavaNextConfig(
        **parts.config_fields(), image_grid_pinpoints=[list(p) for p in pack.grid_pinpoints]
    )
    return llava.build_export(
        LlavaNextForConditionalGeneration, config, parts, mllm, image_newline=pack.image_newline
    )


def anyres_pack(name: str, encoder: ModalEncoderModule, tower: Any, family: str) -> AnyResPack:
    """The encoder's `AnyResPack` when its anyres callbacks tile as ``family`` (LLaVA-NeXT, OneVision)
    does: at the tower's input size, with one grid list and ``image_newline``;
    `NoTransformersCounterpartError` naming what differs otherwise."""
    flatten, pack = encoder.preprocess_callback, encoder.postprocess_projector_callback
    if not isinstance(flatten, AnyResFlatten) or not isinstance(pack, AnyResPack):
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: {family}'s tiling needs anyres_flatten (preprocess) and anyres_pack "
            f"(postprocess_projector), got {flatten!r} and {pack!r}"
        )
    vision = tower.config
    if (pack.image_size, pack.patch_size, flatten.image_size) != (vision.image_size, vision.patch_size, vision.image_size):
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: the anyres tile ({pack.image_size} px, patch {pack.patch_size}) is not the tower's "
            f"({vision.image_size} px, patch {vision.patch_size}); {family} tiles at the tower's input size"
        )
    if not pack.newline or flatten.grid_pinpoints != pack.grid_pinpoints:
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: {family} always adds image_newline and tiles with one grid list"
        )
    return pack


def hf_processor(hf_model: LlavaNextForConditionalGeneration, tokenizer: Any, image_processor: Any) -> LlavaNextProcessor:
    """transformers' ``LlavaNextProcessor`` for an exported model (``image_processor``: the
    ``LlavaNextImageProcessor`` the model was trained with)."""
    from transformers import LlavaNextImageProcessor

    if not isinstance(image_processor, LlavaNextImageProcessor):
        raise NoTransformersCounterpartError(
            f"the processor's image processor is {type(image_processor).__name__}; LLaVA-NeXT's is a "
            "LlavaNextImageProcessor (tiles and image_sizes)"
        )
    return LlavaNextProcessor(**llava.processor_fields(hf_model, tokenizer, image_processor))


def hf_processor_for(hf_model: LlavaNextForConditionalGeneration, processor: Any) -> LlavaNextProcessor:
    """`hf_processor` from an mmcore `MultimodalProcessor` (its one encoder's image processor)."""
    return llava.hf_processor_for(hf_model, processor, hf_processor)
