"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``) to mmcore and back, sharing every weight.

=========================================  ======================================================
Qwen2-Audio                                mmcore
=========================================  ======================================================
``model.audio_tower`` (``Qwen2AudioEncoder``)  ``encoders["audio"].module`` (a transformers class:
                                           config.json rebuilds it with no plugin)
padding mask from ``feature_attention_mask``  ``qwen2_audio_padding_mask`` (preprocess)
``model.multi_modal_projector.linear``     a ``linear`` projector holding that Linear
per-clip lengths (``audio_output_lengths``)  ``qwen2_audio_trim`` (postprocess_projector)
``model.language_model`` + ``lm_head``     the causal LM (its base model and head, the same modules)
``audio_token_id``                         ``modality_token_ids["audio"]``
=========================================  ======================================================

The processor (`processor_from_hf`) holds the checkpoint's tokenizer and ``WhisperFeatureExtractor`` and
makes ``Qwen2AudioProcessor``'s batch; that processor's output goes into the mmcore model as it is too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2AudioConfig, Qwen2AudioEncoder, Qwen2AudioForConditionalGeneration

from mmcore.builtin.qwen2_audio import Qwen2AudioPaddingMask, Qwen2AudioTrim, qwen2_audio_encoder
from mmcore.convert import llava
from mmcore.convert.families import NoTransformersCounterpartError
from mmcore.errors import ConfigError
from mmcore.modeling.multimodal import MultimodalModel
from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig

MODEL_TYPE = "qwen2_audio"
MODALITY = "audio"
ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
AUDIO_TOKEN = "<|AUDIO|>"  # Qwen2AudioProcessor's placeholder, expanded per clip


def from_hf(
    hf_model: Qwen2AudioForConditionalGeneration, *, image_processor: Any = None, source: str | None = None,
    modality: str = MODALITY,
) -> MultimodalModel:  # fmt: skip
    """The `MultimodalModel` that computes what ``hf_model`` computes, holding its own modules."""
    config = hf_model.config
    linear = hf_model.model.multi_modal_projector.linear
    with torch.device("meta"):
        projector = MultimodalProjector(
            MultimodalProjectorConfig(projector_type="linear", in_features=linear.in_features, out_features=linear.out_features)
        )
    projector.projection = linear
    encoder = qwen2_audio_encoder(hf_model.model.audio_tower, projector)
    mllm = MultimodalModel(
        encoders={modality: encoder}, language_model=llava.language_model(hf_model, MODEL_TYPE)
    )
    mllm.set_modality_token_ids({modality: config.audio_token_id})
    return mllm


def processor_from_hf(
    mllm: MultimodalModel, tokenizer: Any, chat_template: str | None = None, image_processor: Any = None,
    feature_extractor: Any = None,
) -> Any:  # fmt: skip
    """The `MultimodalProcessor` of a converted model: the checkpoint's tokenizer and chat template, its
    ``WhisperFeatureExtractor`` called as ``Qwen2AudioProcessor`` calls it (the whole window,
    ``feature_attention_mask`` for the real frames), ``<|AUDIO|>`` as the placeholder, and each clip's
    tokens counted from its length (`Qwen2AudioTokenCount`). Its batch is the one ``Qwen2AudioProcessor``
    makes."""
    from transformers import WhisperFeatureExtractor

    from mmcore.processing import MultimodalProcessor, ProcessorCall

    if not isinstance(feature_extractor, WhisperFeatureExtractor):
        raise ConfigError(
            "qwen2_audio: expected the checkpoint's WhisperFeatureExtractor (its Qwen2AudioProcessor's), got "
            f"{type(feature_extractor).__name__}"
        )
    ((name, _),) = mllm.encoders.items()
    llava.check_placeholder_tokens(mllm, tokenizer, chat_template, {name: AUDIO_TOKEN})
    call = ProcessorCall(
        feature_extractor,
        {"sampling_rate": feature_extractor.sampling_rate, "padding": "max_length", "return_attention_mask": True},
        rename={"attention_mask": "feature_attention_mask"},
    )
    return MultimodalProcessor(
        {name: call}, tokenizer, mllm, predefined_tokens={name: AUDIO_TOKEN}  # counted by the trim's token_count
    )


def claims(mllm: MultimodalModel) -> bool:
    """Whether ``mllm`` has Qwen2-Audio's shape: one encoder with its per-clip trim."""
    return len(mllm.encoders) == 1 and isinstance(
        next(iter(mllm.encoders.values())).postprocess_projector_callback, Qwen2AudioTrim
    )


def to_hf(mllm: MultimodalModel) -> Qwen2AudioForConditionalGeneration:
    """The ``Qwen2AudioForConditionalGeneration`` holding ``mllm``'s modules, when ``mllm`` is one
    ``Qwen2AudioEncoder`` with Qwen2-Audio's callbacks, a linear projector and a causal LM."""
    if len(mllm.encoders) != 1:
        raise NoTransformersCounterpartError(
            f"{len(mllm.encoders)} encoders ({', '.join(mllm.encoders)}): Qwen2AudioForConditionalGeneration holds one audio tower"
        )
    ((name, encoder),) = mllm.encoders.items()
    tower = encoder.module
    if type(tower) is not Qwen2AudioEncoder:
        raise NoTransformersCounterpartError(f"encoder {name!r}: its module {type(tower).__name__} is not a Qwen2AudioEncoder")
    if not (isinstance(encoder.preprocess_callback, Qwen2AudioPaddingMask) and isinstance(encoder.postprocess_projector_callback, Qwen2AudioTrim) and encoder.postprocess_module_callback is None):
        raise NoTransformersCounterpartError(
            f"encoder {name!r}: Qwen2-Audio's audio path is qwen2_audio_padding_mask + the tower + qwen2_audio_trim"
        )
    projector = encoder.projector
    if getattr(projector.config, "projector_type", None) != "linear" or not projector.config.bias:
        raise NoTransformersCounterpartError(f"encoder {name!r}: Qwen2-Audio's projector is one Linear with a bias")
    llm, base = llava._llm_parts(mllm)
    token_id = llava._image_token_id(mllm, name, llm)
    config = Qwen2AudioConfig(
        audio_config=tower.config.to_dict(), audio_token_id=token_id, **llava.text_fields(llm)
    )
    with torch.device("meta"):
        hf = Qwen2AudioForConditionalGeneration(config)
    hf.model.audio_tower = tower
    hf.model.multi_modal_projector.linear = projector.projection
    return llava.finish_export(hf, mllm, base, llm, ARCHITECTURE)


def hf_processor_for(hf_model: Qwen2AudioForConditionalGeneration, processor: Any) -> Any:
    """transformers' ``Qwen2AudioProcessor`` for an exported model: the mmcore processor's feature
    extractor (a `ProcessorCall` of a ``WhisperFeatureExtractor``), tokenizer and chat template."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    from mmcore.processing import unwrap_processor

    (call,) = processor.encoder_processors.values()
    extractor = unwrap_processor(call)
    if not isinstance(extractor, WhisperFeatureExtractor):
        raise NoTransformersCounterpartError(
            f"the processor's audio processor is {type(call).__name__}; Qwen2-Audio's is a WhisperFeatureExtractor"
        )
    tokenizer = processor.tokenizer
    if tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) != hf_model.config.audio_token_id:
        raise NoTransformersCounterpartError(
            f"Qwen2AudioProcessor expands {AUDIO_TOKEN}, but the model's audio token id {hf_model.config.audio_token_id} "
            f"is {tokenizer.convert_ids_to_tokens(hf_model.config.audio_token_id)!r}"
        )
    return Qwen2AudioProcessor(
        feature_extractor=extractor, tokenizer=tokenizer, chat_template=getattr(tokenizer, "chat_template", None)
    )
