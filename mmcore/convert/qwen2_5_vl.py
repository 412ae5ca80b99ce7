"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) to mmcore and back: `mmcore.convert.qwen2_vl`
with Qwen2.5-VL's classes (its windowed tower, RMSNorm merger, and videos spaced in time by
``tokens_per_second * second_per_grid_ts`` in the ``mrope`` callback)."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mmcore.builtin.mrope import Qwen2_5_VLTextForCausalLM
from mmcore.convert import qwen2_vl
from mmcore.modeling.multimodal import MultimodalModel

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
QWEN2_5_VL = qwen2_vl.Family(
    MODEL_TYPE,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextForCausalLM,
    "qwen2vl:qwen2_5_vl",
)
processor_from_hf = qwen2_vl.processor_from_hf
hf_processor_for = qwen2_vl.hf_processor_for


def from_hf(hf_model: Any, *, image_processor: Any = None, source: str | None = None) -> MultimodalModel:
    """See `mmcore.convert.qwen2_vl.from_hf`."""
    return qwen2_vl.from_hf(hf_model, image_processor=image_processor, source=source, family=QWEN2_5_VL)


def claims(mllm: MultimodalModel) -> bool:
    """Whether ``mllm``'s towers are Qwen2.5-VL's only."""
    return qwen2_vl.tower_encoders(mllm) == {"qwen2vl:qwen2_5_vl"}


def to_hf(mllm: MultimodalModel) -> Qwen2_5_VLForConditionalGeneration:
    """See `mmcore.convert.qwen2_vl.to_hf`."""
    return qwen2_vl.to_hf(mllm, family=QWEN2_5_VL)
