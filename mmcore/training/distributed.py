"""Distributed training on PyTorch's own engine: process-group setup and FSDP2 sharding.

`shard` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2) to an assembled `MultimodalModel`:
one unit per encoder layer, per projector and per LLM decoder layer, then the root (embeddings,
norms, head and whatever else is left). Frozen parameters are sharded too (memory) but never
reduced: FSDP2 reduce-scatters only gradients that exist. On GPU, ``mixed_precision="bf16"``
computes in bf16 and reduces gradients in fp32.

Launch with ``torchrun`` (see docs/training.md); `init_distributed` reads its environment. It works
on CPU with the gloo backend as well (tests use it).

Ranks may hold different modalities in one step: `MultimodalModel` agrees across ranks which
encoders run and runs the missing ones on a stand-in item with zero contribution, so every unit's
collectives match (``config.agree_on_modalities``). The training sampler
(`mmcore.training.data.GroupedBatchSampler`) gives all ranks the same modality group anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcore.errors import ConfigError

#: ModuleList names that hold a stack of blocks: transformers (``layers``, ``layer``, GPT-2's ``h``)
#: and timm (``blocks``).
LAYER_LIST_NAMES = ("layers", "layer", "blocks", "h")

PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node), its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ...).

    Single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): no process group, device ``cuda`` if
    available else ``cpu``. Distributed: NCCL on CUDA (one GPU per local rank), gloo on CPU.
    ``device`` forces ``"cpu"`` or ``"cuda"``.
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if kind == "cuda" else "gloo", device_id=where if kind == "cuda" else None
        )
    return DistInfo(rank, world_size, local_rank, where)


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def layer_units(module: nn.Module) -> list[nn.Module]:
    """The blocks of every layer stack inside ``module``: children of ``nn.ModuleList``s named as in
    `LAYER_LIST_NAMES`, outermost stacks only (a block's own inner lists stay inside it)."""
    units: list[nn.Module] = []
    taken: list[str] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList) or name.rsplit(".", 1)[-1] not in LAYER_LIST_NAMES:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        taken.append(name)
        units.extend(sub)
    return units


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2 ``MixedPrecisionPolicy`` for ``"bf16"``/``"fp16"`` (compute in it, reduce in fp32); None for ``"no"``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in PRECISIONS:
        raise ConfigError(f"mixed precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "no":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(
    model: nn.Module,
    *,
    mixed_precision: str = "no",
    reshard_after_forward: bool = True,
    mesh: Any = None,
) -> dict[str, int]:
    """Apply FSDP2 to ``model`` in place: each encoder layer, each projector, each LLM decoder layer,
    then the root. Needs an initialised process group (`init_distributed`) unless ``mesh`` is given.

    Returns the number of units per part, e.g. ``{"vision.module": 2, "vision.projector": 1,
    "language_model": 2, "root": 1}``. Build the optimizer after this call (parameters become
    sharded DTensors).
    """
    from torch.distributed.fsdp import fully_shard

    options: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    policy = mixed_precision_policy(mixed_precision)
    if policy is not None:
        options["mp_policy"] = policy
    if mesh is not None:
        options["mesh"] = mesh
    counts: dict[str, int] = {}
    for name, encoder in model.encoders.items():
        blocks = layer_units(encoder.module)
        for block in blocks:
            fully_shard(block, **options)
        counts[f"{name}.module"] = len(blocks)
        fully_shard(encoder.projector, **options)
        counts[f"{name}.projector"] = 1
    blocks = layer_units(model.language_model)
    if not blocks:
        raise ConfigError(
            f"found no decoder layer stack ({'/'.join(LAYER_LIST_NAMES)}) in {type(model.language_model).__name__}"
        )
    for block in blocks:
        fully_shard(block, **options)
    counts["language_model"] = len(blocks)
    fully_shard(model, **options)
    counts["root"] = 1
    return counts


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, gathered to every rank's memory only on rank 0
    (other ranks get an empty dict); for a model that is not sharded, its plain state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
