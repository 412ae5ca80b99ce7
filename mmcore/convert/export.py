"""``mmcore export``: an mmcore model directory as a plain transformers directory.

The output holds what ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``
load with no mmcore installed, and what serving engines take (``vllm serve OUT``): safetensors
weights, ``config.json`` with ``architectures: ["LlavaForConditionalGeneration"]`` (or
``LlavaNextForConditionalGeneration`` for an anyres model, ``LlavaOnevisionForConditionalGeneration``
for a OneVision one), the processor
(image processor, tokenizer, chat template). Written atomically (`mmcore.files.staged_directory`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmcore.errors import SerializationError


def export_hf(mllm: Any, processor: Any, output: str | os.PathLike) -> dict[str, Any]:
    """Write ``mllm`` (see `mmcore.convert.to_hf` for the shapes that convert) and its
    `MultimodalProcessor` into ``output`` as a transformers directory; return a summary."""
    from mmcore.convert import family_for
    from mmcore.files import staged_directory

    family = family_for(mllm)
    hf_model = family.to_hf(mllm)
    hf_processor = family.hf_processor_for(hf_model, processor)
    with staged_directory(output) as staging:
        hf_model.save_pretrained(staging)
        hf_processor.save_pretrained(staging)
    return {
        "output": str(output),
        "architectures": list(hf_model.config.architectures or [type(hf_model).__name__]),
        "files": sorted(p.name for p in Path(output).iterdir()),
    }


def export_model(model_dir: str | os.PathLike, output: str | os.PathLike, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Load the mmcore model directory ``model_dir`` (model and processor, weights in their saved dtype)
    and `export_hf` it into ``output``."""
    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.processing import MultimodalProcessor

    mllm = MultimodalModel.from_pretrained(model_dir, dtype="auto", trust_remote_code=trust_remote_code)
    try:
        processor = MultimodalProcessor.from_pretrained(model_dir, mllm, trust_remote_code=trust_remote_code)
    except SerializationError as exc:
        raise SerializationError(
            f"{model_dir}: exporting needs the model's processor (tokenizer and image processor) saved with it: {exc}"
        ) from exc
    return export_hf(mllm.eval(), processor, output)
