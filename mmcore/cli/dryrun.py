"""Parameter counts per part and training-memory estimates per stage, for ``mmcore assemble --dry-run``.

The model is built on the meta device, so an 8B combination costs no memory. Memory per stage
(documented in docs/cli.md)::

    memory = 2 B x (all parameters, bf16 weights)  +  14 B x (trainable parameters)

The 14 B are a bf16 gradient (2 B), an fp32 master copy (4 B) and Adam's two fp32 moments (8 B):
16 B per trainable parameter in all, the usual mixed-precision Adam figure. Activations, the
KV cache and framework overhead are left out: they depend on batch size, sequence length and
checkpointing (measure them with ``mmcore test-run``).
"""

from __future__ import annotations

from typing import Any

from mmcore.training.stages import STAGES

WEIGHT_BYTES = 2  # bf16
TRAINABLE_EXTRA_BYTES = 14  # bf16 grad 2 + fp32 master 4 + Adam m 4 + Adam v 4
LORA_RANK = 16


def _numel(module: Any) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def lora_parameters(llm: Any, rank: int = LORA_RANK) -> int:
    """Parameters LoRA of rank ``rank`` adds: ``rank * (in + out)`` per adapted Linear (every Linear
    and GPT-2 style Conv1D of the LLM except its output head, as PEFT's ``all-linear`` target)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = llm.get_output_embeddings()
    total = 0
    for module in llm.modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
            total += rank * (fan_in + fan_out)
    return total


def count_report(model: Any, *, placeholder_tokens: int = 0) -> dict[str, Any]:
    """Parameter counts per part, per stage, with bf16 size and the memory estimate (see module doc).

    ``placeholder_tokens``: how many modality tokens assembling adds (noted, not counted: whether they
    need new embedding rows depends on the tokenizer's free ids).
    """
    parts: list[dict[str, Any]] = []
    projectors = 0
    encoders = 0
    counts = model.trainable_parameters()  # a part two encoders share counts once
    for name, encoder in model.encoders.items():
        module, projector = counts[f"{name}.module"][1], counts[f"{name}.projector"][1]
        encoders += module
        projectors += projector
        parts.append({"part": f"{name}.module", "params": module})
        parts.append({"part": f"{name}.projector", "params": projector,
                      "type": encoder.projector.config.projector_type})  # fmt: skip
    llm = model.get_base_language_model()
    embed = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight is embed
    llm_total = _numel(llm)
    head_params = 0 if (head is None or tied) else head.weight.numel()
    parts.append({"part": "language_model.embeddings", "params": embed.numel()})
    parts.append({"part": "language_model.lm_head", "params": head_params, "tied": tied})
    parts.append({"part": "language_model.layers", "params": llm_total - embed.numel() - head_params})
    total = encoders + projectors + llm_total
    lora = lora_parameters(llm)
    trainable = {
        "align": projectors,
        "lora": projectors + lora,
        "finetune": projectors + llm_total,
        "full": total,
    }
    stages = []
    for stage in STAGES.values():
        params = total + (lora if stage.lora else 0)
        stages.append({
            "stage": stage.name,
            "trains": stage.what_trains(LORA_RANK),
            "params": params,
            "trainable": trainable[stage.name],
            "memory_bytes": WEIGHT_BYTES * params + TRAINABLE_EXTRA_BYTES * trainable[stage.name],
        })  # fmt: skip
    width = embed.shape[1]
    rows = 1 if tied or head is None else 2
    notes = [
        "memory = 2 B x params (bf16 weights) + 14 B x trainable (bf16 grad, fp32 master, Adam m and v); "
        "activations, KV cache and framework overhead not included (measure with `mmcore test-run`)",
        f"language model counted at vocab_size {embed.shape[0]}; the {placeholder_tokens} modality token(s) "
        "add "
        f"up to {placeholder_tokens * width * rows} parameters if the tokenizer has no free ids",
    ]
    return {
        "parts": parts,
        "total_params": total,
        "encoder_params": encoders,
        "projector_params": projectors,
        "llm_params": llm_total,
        "lora_params": lora,
        "bf16_bytes": WEIGHT_BYTES * total,
        "stages": stages,
        "notes": notes,
    }
