"""LLaVA (``LlavaForConditionalGeneration``) to mmcore and back, sharing every weight.

LLaVA is one vision tower, an MLP projector and a causal LM; in mmcore that is one plugin encoder
(``clip`` or ``siglip``, picked by ``vision_config.model_type``) whose default callback is LLaVA's
feature selection, an ``mlp2x_<act>`` projector and the LLM:

=====================================  ======================================================
LLaVA                                  mmcore
=====================================  ======================================================
``model.vision_tower``                 ``encoders["image"].module`` (recorded as a plugin recipe)
``vision_feature_layer``               the encoder's ``feature_layer`` option
``vision_feature_select_strategy``     ``"default"``: CLIP's ``drop_cls=True``; ``"full"``: keep all
``model.multi_modal_projector``        ``mlp2x_<projector_hidden_act>`` (``linear_1`` -> ``projection.0``,
                                       ``linear_2`` -> ``projection.2``)
``model.language_model`` + ``lm_head``  the causal LM (its base model and head, the same modules)
``image_token_index``                  ``modality_token_ids["image"]`` (the tokenizer's ``<image>``)
=====================================  ======================================================

The modality is named ``image`` so that mmcore's placeholder token, ``<image>``, is the
checkpoint's own image token: `MultimodalProcessor` then works on the checkpoint's tokenizer as it is.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionModel,
)

from mmcore.callbacks import DropPrefixTokens, SelectFeatureLayer
from mmcore.convert.families import NoTransformersCounterpartError, UnknownFamilyError
from mmcore.errors import ConfigError, SerializationError, TokenIdError
from mmcore.factory import encoder_from_recipe, get_factory
from mmcore.modeling.encoder import ModalEncoderModule
from mmcore.modeling.multimodal import MultimodalModel
from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig, parse_projector_type

MODEL_TYPE = "llava"
MODALITY = "image"
ARCHITECTURE = "LlavaForConditionalGeneration"

#: vision_config.model_type -> (mmcore encoder plugin, transformers vision tower class)
VISION_TOWERS: dict[str, tuple[str, type[nn.Module]]] = {
    "clip_vision_model": ("clip", CLIPVisionModel),
    "siglip_vision_model": ("siglip", SiglipVisionModel),
}


# -- in: LLaVA -> mmcore ------------------------------------------------------------------------------------
def from_hf(
    hf_model: LlavaForConditionalGeneration,
    *,
    image_processor: Any = None,
    source: str | None = None,
    modality: str = MODALITY,
) -> MultimodalModel:
    """The `MultimodalModel` that computes what ``hf_model`` computes, built from its own modules (no
    weight is copied). ``image_processor`` (the checkpoint's) goes into the encoder's recipe, so the
    saved directory rebuilds it; default: the tower family's own preprocessing. ``source`` (a hub id
    or directory) is recorded in the recipe for reference only."""
    encoder = vision_encoder(hf_model, image_processor, source)
    mllm = MultimodalModel(encoders={modality: encoder}, language_model=language_model(hf_model))
    mllm.set_modality_token_ids({modality: hf_model.config.image_token_index})
    return mllm


def vision_encoder(hf_model: Any, image_processor: Any, source: str | None) -> ModalEncoderModule:
    """The plugin encoder of a LLaVA-family model's vision half, holding its tower and projector: the
    plugin's recipe (the tower's config, ``image_processor`` or the family's default preprocessing,
    LLaVA's feature selection as the plugin's options) built around a shell on the meta device whose
    module and projector are then the checkpoint's own."""
    config = hf_model.config
    plugin = _vision_plugin(config)
    factory = get_factory(plugin)
    recipe = _recipe(factory, config, image_processor, _encoder_options(plugin, config), source)
    encoder = encoder_from_recipe(factory, recipe, device="meta")
    encoder.module = hf_model.model.vision_tower
    encoder.projector = _projector(hf_model.model.multi_modal_projector, config)
    return encoder


def _vision_plugin(config: LlavaConfig) -> str:
    model_type = config.vision_config.model_type
    if model_type not in VISION_TOWERS:
        raise UnknownFamilyError(
            f"llava: vision tower model_type {model_type!r} has no mmcore encoder plugin; "
            f"known: {', '.join(VISION_TOWERS)}"
        )
    return VISION_TOWERS[model_type][0]


def _encoder_options(plugin: str, config: LlavaConfig) -> dict[str, Any]:
    layer = config.vision_feature_layer
    layer = list(layer) if isinstance(layer, (list, tuple)) else layer
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ConfigError(f"llava: vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    if plugin == "clip":
        return {"feature_layer": layer, "drop_cls": strategy == "default"}
    if strategy == "default":
        raise ConfigError(
            "llava: a SigLIP tower with vision_feature_select_strategy='default' drops its first patch token "
            "(SigLIP has no CLS token); the siglip encoder cannot express that: expected 'full'"
        )
    return {"feature_layer": layer, "keep_head": bool(getattr(config.vision_config, "vision_use_head", True))}


def _recipe(factory: Any, config: LlavaConfig, image_processor: Any, options: dict, source: str | None) -> dict:
    """The plugin's recipe for LLaVA's vision half, made by the plugin itself from a vision-only
    checkpoint directory (config and image processor, no weights) written for it."""
    with tempfile.TemporaryDirectory(prefix="mmcore-llava-vision-") as tmp:
        config.vision_config.save_pretrained(tmp)
        if image_processor is None:
            image_processor = factory.default_processor(factory.image_size(config.vision_config))
        image_processor.save_pretrained(tmp)
        recipe = factory.make_recipe(checkpoint=tmp, **options)
    recipe["checkpoint"] = source
    return recipe


def _projector(hf_projector: nn.Module, config: LlavaConfig) -> MultimodalProjector:
    act = config.projector_hidden_act
    projector_config = MultimodalProjectorConfig(
        projector_type=f"mlp2x_{act}",
        activation=act,
        in_features=hf_projector.linear_1.in_features,
        out_features=hf_projector.linear_2.out_features,
        bias=config.multimodal_projector_bias,
    )
    with torch.device("meta"):  # its Linear layers are LLaVA's own
        projector = MultimodalProjector(projector_config)
    projector.projection[0] = hf_projector.linear_1
    projector.projection[2] = hf_projector.linear_2
    return projector


def language_model(
    hf_model: Any, what: str = MODEL_TYPE, lm_class: type[nn.Module] | None = None
) -> nn.Module:
    """A causal-LM shell of a transformers VLM's text config (``lm_class``, default: the class
    ``AutoModelForCausalLM`` picks) holding the VLM's base language model (``model.language_model``)
    and ``lm_head`` (shared, not copied), with a copy of its generation config. ``what`` (the family)
    names it in errors: `UnknownFamilyError` when the base model is not the shell's."""
    text_config = hf_model.config.text_config
    with torch.device("meta"):
        llm = lm_class(text_config) if lm_class is not None else AutoModelForCausalLM.from_config(text_config)
    base = hf_model.model.language_model
    prefix = llm.base_model_prefix
    if type(getattr(llm, prefix, None)) is not type(base):
        raise UnknownFamilyError(
            f"{what}: its language model ({type(base).__name__}) is not the base model of "
            f"{type(llm).__name__}, so it cannot become an mmcore language model"
        )
    setattr(llm, prefix, base)
    llm.set_output_embeddings(hf_model.lm_head)
    check_no_meta(llm, f"{what} language model")
    if getattr(hf_model, "generation_config", None) is not None:
        llm.generation_config = copy.deepcopy(hf_model.generation_config)
    return llm


def processor_from_hf(
    mllm: MultimodalModel, tokenizer: Any, chat_template: str | None = None, image_processor: Any = None
) -> Any:
    """The `MultimodalProcessor` of a converted model: the checkpoint's tokenizer (its ``<image>`` is the
    model's image token) and the plugin's image processor from the recipe (``image_processor``, the
    checkpoint's, is in the recipe already). The chat template goes onto the tokenizer when it has
    none. `TokenIdError` when the tokenizer's ``<image>`` is not the model's image token."""
    from mmcore.processing import MultimodalProcessor

    check_placeholder_tokens(mllm, tokenizer, chat_template)
    return MultimodalProcessor.from_model(mllm, tokenizer)


def check_placeholder_tokens(
    mllm: MultimodalModel, tokenizer: Any, chat_template: str | None, tokens: Mapping[str, str | None] | None = None
) -> None:
    """`TokenIdError` unless each of ``tokens`` (modality -> its placeholder token in the tokenizer;
    default ``<name>`` for every encoder of ``mllm``) is the tokenizer's token of the model's placeholder
    id for that modality; puts the chat template onto the tokenizer when it has none. Every family's
    conversion into mmcore checks its checkpoint's tokenizer with it."""
    vocab = tokenizer.get_vocab()
    for name, token in ({name: f"<{name}>" for name in mllm.encoders} if tokens is None else tokens).items():
        token_id = mllm.config.modality_token_ids[name]
        if token is None:
            raise TokenIdError(
                f"the model's {name} token id {token_id} is not a token of this tokenizer; expected the "
                "checkpoint's own tokenizer"
            )
        if vocab.get(token) != token_id:
            raise TokenIdError(
                f"the tokenizer's {token} is id {vocab.get(token)}, but the model's {name} token is id {token_id}; "
                "expected the checkpoint's own tokenizer"
            )
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template


# -- out: mmcore -> LLaVA -----------------------------------------------------------------------------------
def to_hf(mllm: MultimodalModel) -> LlavaForConditionalGeneration:
    """The ``LlavaForConditionalGeneration`` holding ``mllm``'s own modules (no weight copied), when
    ``mllm`` is one CLIP/SigLIP tower + a 2-layer MLP projector + LLaVA's feature selection + a
    causal LM whose base model LLaVA can hold; `NoTransformersCounterpartError` naming the part
    otherwise."""
    if len(mllm.encoders) != 1:
        raise NoTransformersCounterpartError(
            f"{len(mllm.encoders)} encoders ({', '.join(mllm.encoders)}): LlavaForConditionalGeneration holds "
            "exactly one vision tower"
        )
    ((name, encoder),) = mllm.encoders.items()
    parts = llava_parts(mllm, name, encoder)
    config = LlavaConfig(
        **parts.config_fields(), image_seq_length=_image_seq_length(parts.tower, parts.strategy)
    )
    return build_export(LlavaForConditionalGeneration, config, parts, mllm)


class LlavaParts(NamedTuple):
    """What every LLaVA-family ``to_hf`` takes from an mmcore model: one encoder's tower, its feature
    selection (layer, strategy) and 2-layer MLP projector (activation, bias, Linears), the language
    model with its base model, and the image token id."""

    tower: nn.Module
    layer: Any
    strategy: str
    act: str
    bias: bool
    linear_1: nn.Linear
    linear_2: nn.Linear
    llm: nn.Module
    base: nn.Module
    token_id: int

    def config_fields(self) -> dict[str, Any]:
        """The fields every LLaVA-family config takes from these parts."""
        return dict(
            vision_config=self.tower.config.to_dict(),
            image_token_index=self.token_id,
            projector_hidden_act=self.act,
            vision_feature_layer=self.layer,
            vision_feature_select_strategy=self.strategy,
            multimodal_projector_bias=self.bias,
            **text_fields(self.llm),
        )


def llava_parts(
    mllm: MultimodalModel, name: str, encoder: ModalEncoderModule, *, other_slots: bool = True
) -> LlavaParts:
    """The `LlavaParts` of ``mllm``'s encoder ``name``; `NoTransformersCounterpartError` naming the first
    part LLaVA has no counterpart for (``other_slots``: see `_feature_selection`)."""
    tower = _tower(name, encoder)
    layer, strategy = _feature_selection(name, encoder, tower, other_slots=other_slots)
    act, bias, linear_1, linear_2 = _projector_parts(name, encoder.projector)
    llm, base = _llm_parts(mllm)
    token_id = _image_token_id(mllm, name, llm)
    return LlavaParts(tower, layer, strategy, act, bias, linear_1, linear_2, llm, base, token_id)


def build_export(
    hf_class: type[nn.Module], config: Any, parts: LlavaParts, mllm: Any, *, image_newline: Any = None
) -> nn.Module:
    """``hf_class(config)`` built on the meta device as a shell whose tower, projector Linears and (when
    given) ``image_newline`` are ``parts``' (``mllm``'s own modules), finished by `finish_export`."""
    with torch.device("meta"):  # a shell: every module is replaced by mllm's own
        hf = hf_class(config)
    hf.model.vision_tower = parts.tower
    hf.model.multi_modal_projector.linear_1 = parts.linear_1
    hf.model.multi_modal_projector.linear_2 = parts.linear_2
    if image_newline is not None:
        hf.model.image_newline = image_newline
    return finish_export(hf, mllm, parts.base, parts.llm, hf_class.__name__)


def _tower(name: str, encoder: ModalEncoderModule) -> nn.Module:
    module = encoder.module
    classes = tuple(cls for _, cls in VISION_TOWERS.values())
    if type(module) not in classes:
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: its module {kind} has no LLaVA counterpart; LlavaForConditionalGeneration holds "
            f"a transformers {' or '.join(c.__name__ for c in classes)}"
        )
    if getattr(module, "peft_config", None):
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: its tower carries LoRA adapters; merge them first (mmcore.training.merge_lora)"
        )
    return module


def _feature_selection(
    name: str, encoder: ModalEncoderModule, tower: nn.Module, *, other_slots: bool = True
) -> tuple[Any, str]:
    """(vision_feature_layer, vision_feature_select_strategy) equal to the encoder's callbacks;
    ``other_slots``: the preprocess and postprocess_projector slots must be empty (LLaVA's case)."""
    for slot, callback in (("preprocess", encoder.preprocess_callback), ("postprocess_projector", encoder.postprocess_projector_callback)):
        if callback is not None and other_slots:
            raise NoTransformersCounterpartError(
                f"encoder {name!r}: its {slot} callback {callback!r} has no LLaVA counterpart"
            )
    callback = encoder.postprocess_module_callback
    if isinstance(callback, SelectFeatureLayer):
        layer, drop = callback.layer, callback.drop_prefix_tokens
    elif callback is None or isinstance(callback, DropPrefixTokens):
        if isinstance(tower, SiglipVisionModel):
            raise NoTransformersCounterpartError(
                f"encoder {name!r}: SigLIP's last_hidden_state (after its post-layernorm) has no LLaVA "
                "counterpart; LLaVA takes a hidden state (feature_layer)"
            )
        layer, drop = -1, (callback.num_tokens if callback is not None else 0)  # CLIP: the last hidden state
    else:
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: its postprocess_module callback {callback!r} has no LLaVA counterpart "
            "(LLaVA selects a hidden state and optionally drops the first token)"
        )
    if drop not in (0, 1):
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: dropping {drop} leading tokens has no LLaVA counterpart (it drops 0 or 1)"
        )
    return layer, "default" if drop == 1 else "full"


def _projector_parts(name: str, projector: Any) -> tuple[str, bool, nn.Linear, nn.Linear]:
    config = getattr(projector, "config", None)
    projector_type = getattr(config, "projector_type", None)
    kind = depth = None
    if isinstance(projector, MultimodalProjector) and projector_type != "custom":
        kind, depth, act = parse_projector_type(projector_type, config.activation)
    if kind != "mlp" or depth != 2:
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: its projector ({projector_type or type(projector).__name__}) has no LLaVA "
            "counterpart; LLaVA's projector is a 2-layer MLP (mlp2x_<act>)"
        )
    linear_1, linear_2 = projector.projection[0], projector.projection[2]
    return act, bool(config.bias), linear_1, linear_2


def _llm_parts(mllm: MultimodalModel) -> tuple[nn.Module, nn.Module]:
    llm = mllm.language_model
    if llm is not mllm.get_base_language_model():
        raise NoTransformersCounterpartError(
            "the language model is PEFT-wrapped; merge the adapters first (mmcore.training.merge_lora)"
        )
    base = getattr(llm, llm.base_model_prefix, None)
    head = llm.get_output_embeddings()
    if base is None or base is llm or not isinstance(head, nn.Linear) or head.bias is not None:
        raise NoTransformersCounterpartError(
            f"language model {type(llm).__name__}: LLaVA holds a base model plus a bias-free linear lm_head, "
            "which this model is not"
        )
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    if tied and not isinstance(getattr(base, "embed_tokens", None), nn.Embedding):
        raise NoTransformersCounterpartError(
            f"language model {type(llm).__name__}: tied embeddings outside an 'embed_tokens' module have no "
            "LLaVA counterpart (LLaVA ties lm_head to model.language_model.embed_tokens)"
        )
    return llm, base


def _image_token_id(mllm: MultimodalModel, name: str, llm: nn.Module) -> int:
    if mllm.config.modality_wrap_token_ids:
        raise NoTransformersCounterpartError(
            "start/end tokens around each item (wrap) have no LLaVA counterpart"
        )
    token_id = mllm.config.modality_token_ids.get(name)
    if token_id is None:
        raise TokenIdError(f"encoder {name!r} has no placeholder token id; call set_modality_token_ids first")
    rows = llm.get_input_embeddings().num_embeddings
    if token_id >= rows:
        raise NoTransformersCounterpartError(
            f"the image token id {token_id} is outside the language model's {rows} embedding rows; LLaVA embeds "
            "it as a token (resize the embeddings to the tokenizer first)"
        )
    return int(token_id)


def _image_seq_length(tower: nn.Module, strategy: str) -> int:
    config = tower.config
    patches = (config.image_size // config.patch_size) ** 2
    return patches + _prefix_tokens(tower) - (1 if strategy == "default" else 0)


def _prefix_tokens(tower: nn.Module) -> int:
    return 1 if isinstance(tower, CLIPVisionModel) else 0  # CLIP's CLS token; SigLIP has none


def llava_processor(llava: LlavaForConditionalGeneration, tokenizer: Any, image_processor: Any) -> LlavaProcessor:
    """transformers' ``LlavaProcessor`` for an exported model: the tokenizer (with its chat template)
    and image processor it was trained with, and LLaVA's token count per image."""
    return LlavaProcessor(**processor_fields(llava, tokenizer, image_processor))


def processor_fields(hf_model: Any, tokenizer: Any, image_processor: Any) -> dict[str, Any]:
    """The arguments every LLaVA-family processor takes for an exported model ``hf_model``: the
    tokenizer (with its chat template), the image processor and what its token count per image needs."""
    config = hf_model.config
    return dict(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token=special_token(tokenizer, config.image_token_index),
        num_additional_image_tokens=_prefix_tokens(hf_model.model.vision_tower),
    )


def special_token(tokenizer: Any, token_id: int, kind: str = "image") -> str:
    """The token of ``token_id`` in ``tokenizer``, for an exported processor; `TokenIdError` unless it
    tokenizes as itself (a special token of the tokenizer)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    ids = None if token is None else tokenizer.encode(token, add_special_tokens=False)
    if ids != [token_id]:
        raise TokenIdError(
            f"the {kind} token {token!r} (id {token_id}) does not tokenize as itself ({ids}); expected a special "
            "token of the tokenizer"
        )
    return token


def text_fields(llm: nn.Module) -> dict[str, Any]:
    """The fields a transformers VLM config takes from the language model it is exported with."""
    return {
        "text_config": llm.config.to_dict(),
        "tie_word_embeddings": bool(getattr(llm.config, "tie_word_embeddings", False)),
    }


def finish_export(hf: nn.Module, mllm: Any, base: nn.Module, llm: nn.Module, what: str) -> nn.Module:
    """The last steps of every family's ``to_hf``: the transformers shell ``hf`` (built on the meta
    device, its towers and projector already replaced) gets ``mllm``'s base language model and head,
    must have no part left on the meta device (`ConfigError` naming ``what`` otherwise), and takes
    ``mllm``'s generation config and train/eval mode."""
    hf.model.language_model = base
    hf.lm_head = llm.get_output_embeddings()
    check_no_meta(hf, what)
    if getattr(mllm, "generation_config", None) is not None:
        hf.generation_config = copy.deepcopy(mllm.generation_config)
    hf.train(mllm.training)
    return hf


def check_no_meta(module: nn.Module, what: str) -> None:
    """`ConfigError` when some, but not all, of ``module``'s tensors are still on the meta device (a
    shell part the source did not replace); a model built wholly on the meta device passes."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left and not all(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise ConfigError(f"{what}: parts {left[:5]} were not replaced by the source's modules")


hf_processor = llava_processor


def image_processor_of(processor: Any, modality: str) -> Any:
    """The transformers image processor behind the processor of ``modality`` (a plugin's processor
    wraps one as ``.image_processor``)."""
    from transformers.image_processing_utils import BaseImageProcessor

    item_processor = processor.encoder_processors[modality]
    image_processor = getattr(item_processor, "image_processor", item_processor)
    if not isinstance(image_processor, BaseImageProcessor):
        raise SerializationError(
            f"encoder {modality!r}: its processor ({type(item_processor).__name__}) is not a transformers image "
            "processor, which the exported directory needs"
        )
    return image_processor


def hf_processor_for(hf_model: Any, processor: Any, build: Any = llava_processor) -> Any:
    """The family interface (`mmcore.convert.export`): transformers' processor for an exported model,
    from the mmcore processor's tokenizer and its one encoder's image processor (``build``: the
    family's ``hf_processor``; LLaVA-NeXT passes its own)."""
    (modality,) = processor.encoder_processors
    return build(hf_model, processor.tokenizer, image_processor_of(processor, modality))
