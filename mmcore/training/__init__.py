"""Training building blocks for `MultimodalModel`: stages, LoRA, the collator, data, FSDP2 and the loop.

>>> from mmcore.training import apply_stage, param_groups, MultimodalCollator   # doctest: +SKIP
>>> report = apply_stage(model, "align")                # what trains, as a table
>>> optimizer = torch.optim.AdamW(param_groups(model, lr=2e-5, projector_lr=1e-3))
>>> batch = MultimodalCollator(processor)([sample, ...]) # works with transformers.Trainer too

Names resolve lazily (the submodules import torch). See docs/training.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "STAGES": "mmcore.training.stages",
    "StageReport": "mmcore.training.stages",
    "apply_stage": "mmcore.training.stages",
    "param_groups": "mmcore.training.stages",
    "stage_report": "mmcore.training.stages",
    "add_lora": "mmcore.training.lora",
    "merge_lora": "mmcore.training.lora",
    "has_lora": "mmcore.training.lora",
    "train_token_rows": "mmcore.training.token_rows",
    "new_token_ids": "mmcore.training.token_rows",
    "TokenRows": "mmcore.training.token_rows",
    "Stage": "mmcore.training.stages",
    "MultimodalCollator": "mmcore.training.collator",
    "ConversationDataset": "mmcore.training.data",
    "GroupedBatchSampler": "mmcore.training.data",
    "TokenBudgetBatchSampler": "mmcore.training.token_budget",
    "plan_rows": "mmcore.training.packing",
    "DataFormatError": "mmcore.training.data",
    "read_jsonl": "mmcore.training.data",
    "shard": "mmcore.training.distributed",
    "init_distributed": "mmcore.training.distributed",
    "close_distributed": "mmcore.training.distributed",
    "TrainConfig": "mmcore.training.config",
    "TrainResult": "mmcore.training.loop",
    "train": "mmcore.training.loop",
    "save_model": "mmcore.training.loop",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mmcore.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
