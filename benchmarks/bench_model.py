"""Benchmark an assembled mmcore model beside its references, in one process; print ratios.

Measurements (issue "Benchmarks", items 3-7), each mmcore / reference:

- ``step``: one training step (forward + backward) of the mmcore model vs HF's
  ``LlavaForConditionalGeneration`` holding the *same* weight tensors (`mmcore_twin_of_llava`), in the
  align stage (projector trainable) and the finetune stage (projector + LLM). Target <= 1.02x.
- ``memory``: bytes autograd saves for backward (every tensor a saved-tensor hook sees, counted once
  per storage) in the align stage, and on CUDA the peak allocated memory. The frozen vision tower must
  save nothing. Target: mmcore <= LLaVA.
- ``generate``: greedy decode tokens/s of the mmcore model (prompt with an image) vs the bare LLM's
  ``generate`` on a text prompt of the same length. Decode speed is ``(t(N) - t(1)) / (N - 1)`` per
  token, so the image's prefill is not counted against decoding. Target >= 0.98x.
- ``encoders``: a vision + audio model's ``encode`` of both modalities vs the sum of each alone.
- ``mfu`` (CUDA only): tokens/s and model FLOPs utilisation of the align step; see docs/performance.md
  for the FLOP count. Target >= 45 %.

Sizes: ``--size small`` (CPU default: CLIP 4x256, image 112 -> 64 tokens; Llama 4x512), ``--size
full`` (CLIP ViT-L/14-336 + a Llama-3-8B architecture, random weights, bf16, SDPA; needs a GPU).

    python benchmarks/bench_model.py                         # CPU, small
    python benchmarks/bench_model.py --device cuda --size full --dtype bf16        # batch 4 x 1024 tokens
    python benchmarks/bench_model.py --only step,generate --json out.json
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _report import interleaved, peak_bf16_flops, write_json
from rich.console import Console
from rich.table import Table
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmcore.presets import LLM_PRESETS
from mmcore.testing import mmcore_twin_of_llava, tiny_whisper_encoder

SIZES = {
    "small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=112, patch_size=14),
        text=dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    ),
    "full": dict(  # CLIP ViT-L/14-336 + Meta-Llama-3-8B
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu"),
        text=LLM_PRESETS["llama3-8b"].config,
    ),
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # fmt: skip


def build(size: str, device: str, dtype: torch.dtype) -> tuple[LlavaForConditionalGeneration, torch.nn.Module, int]:
    spec = SIZES[size]
    vision = CLIPVisionConfig(**spec["vision"])
    text = LlamaConfig(**{"max_position_embeddings": 8192, "tie_word_embeddings": False, **spec["text"], "pad_token_id": 0})
    image_token = text.vocab_size - 1
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the benchmark's dtype: no fp32 copy of an 8B model first
    try:
        with torch.device(device):
            llava = LlavaForConditionalGeneration(config).to(dtype)
    finally:
        torch.set_default_dtype(default)
    return llava, mmcore_twin_of_llava(llava), image_token


def make_batch(llava, image_token: int, batch: int, seq: int, device: str, dtype: torch.dtype) -> dict:
    vc = llava.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    if seq < n_img + 2:
        raise SystemExit(f"--seq {seq}: one image is {n_img} tokens here; give at least {n_img + 2}")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, image_token - 1, (batch, seq), generator=gen)
    ids[:, 1 : 1 + n_img] = image_token
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids, device=device),
        "pixel_values": torch.randn(batch, 3, vc.image_size, vc.image_size, generator=gen).to(device, dtype),
        "labels": ids.masked_fill(ids == image_token, -100).to(device),
    }


def set_stage(llava, stage: str) -> None:
    """align: the projector; finetune: projector + LLM. Weights are shared, so this sets both models."""
    for p in llava.parameters():
        p.requires_grad_(False)
    for p in llava.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    if stage == "finetune":
        for p in [*llava.model.language_model.parameters(), *llava.lm_head.parameters()]:
            p.requires_grad_(True)




def step_fn(model, batch) -> Callable[[], None]:
    def run():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    return run


def saved_bytes(model, batch, only=None) -> int:
    """Bytes autograd keeps for backward during one forward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = only() if only is not None else model(**batch).loss
    del out
    return sum(seen.values())


def bench_step(llava, twin, batch, args) -> list[dict]:
    rows = []
    for stage in ("align", "finetune"):
        set_stage(llava, stage)
        times = interleaved({"mmcore": step_fn(twin, batch), "llava": step_fn(llava, batch)}, args.device, args.warmup, args.repeats)
        m, r = statistics.median(times["mmcore"]), statistics.median(times["llava"])
        rows.append({"what": f"train step ({stage})", "mmcore": m, "reference": r, "ratio": m / r, "unit": "s", "target": "<= 1.02"})
    return rows


def bench_memory(llava, twin, batch, args) -> list[dict]:
    set_stage(llava, "align")
    rows = []
    m, r = saved_bytes(twin, batch), saved_bytes(llava, batch)
    rows.append({"what": "saved for backward (align)", "mmcore": m, "reference": r, "ratio": m / r, "unit": "B", "target": "<= 1.00"})
    vision = twin.encoders["vision"]
    enc_inputs = {"pixel_values": batch["pixel_values"]}
    tower = saved_bytes(twin, batch, only=lambda: vision.run_encoder(dict(enc_inputs))[1][0].sum())
    rows.append({"what": "saved by the frozen vision tower", "mmcore": tower, "reference": 0, "ratio": None, "unit": "B", "target": "0"})
    if args.device.startswith("cuda"):
        peaks = {}
        for name, model in (("mmcore", twin), ("llava", llava)):
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model(**batch).loss.backward()
            peaks[name] = torch.cuda.max_memory_allocated()
        rows.append({"what": "CUDA peak allocated (align step)", "mmcore": peaks["mmcore"], "reference": peaks["llava"],
                     "ratio": peaks["mmcore"] / peaks["llava"], "unit": "B", "target": "<= 1.00"})  # fmt: skip
    return rows


@torch.no_grad()
def bench_generate(llava, twin, batch, args) -> list[dict]:
    prompt = {k: v[:1] for k, v in batch.items() if k != "labels"}
    llm = twin.language_model
    text_ids = prompt["input_ids"].clone()
    text_ids[text_ids == twin.config.modality_token_ids["vision"]] = 5
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(model, inputs, n):
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)

    n = args.new_tokens
    fns = {
        "mmcore N": gen(twin, prompt, n), "mmcore 1": gen(twin, prompt, 1),
        "llm N": gen(llm, {"input_ids": text_ids, "attention_mask": prompt["attention_mask"]}, n),
        "llm 1": gen(llm, {"input_ids": text_ids, "attention_mask": prompt["attention_mask"]}, 1),
    }  # fmt: skip
    times = interleaved(fns, args.device, 1, args.repeats)
    # Decode time = N-token generate minus 1-token generate (prefill), per repeat; the four runs of a
    # repeat are adjacent in time, so the per-repeat ratio cancels most drift. Report its median.
    mm = [a - b for a, b in zip(times["mmcore N"], times["mmcore 1"])]
    ref = [a - b for a, b in zip(times["llm N"], times["llm 1"])]
    ratio = statistics.median(r / m for m, r in zip(mm, ref))
    m, r = (n - 1) / statistics.median(mm), (n - 1) / statistics.median(ref)
    return [{"what": f"greedy decode ({n} tokens, batch 1)", "mmcore": m, "reference": r, "ratio": ratio, "unit": "tok/s", "target": ">= 0.98"}]


@torch.no_grad()
def bench_encoders(args, dtype) -> list[dict]:
    from mmcore import ModalEncoderModule, MultimodalModel
    from mmcore.testing import tiny_clip_vision, tiny_llm

    torch.manual_seed(0)
    clip = tiny_clip_vision(hidden_size=256, image_size=112)
    clip.config.num_hidden_layers = 4
    whisper = tiny_whisper_encoder(d_model=256, num_mel_bins=80, max_source_positions=750)
    with torch.device(args.device):
        model = MultimodalModel(
            {"vision": ModalEncoderModule(clip), "audio": ModalEncoderModule(whisper)}, tiny_llm(hidden_size=256)
        ).to(args.device, dtype).eval()
    b = args.batch
    vision = {"pixel_values": torch.randn(b, 3, 112, 112, device=args.device, dtype=dtype)}
    audio = {"input_features": torch.randn(b, 80, 1500, device=args.device, dtype=dtype)}
    both_inputs = {"vision": vision, "audio": audio}

    def concurrent():
        model.config.concurrent_encoders = True
        try:
            model.encode(both_inputs)
        finally:
            model.config.concurrent_encoders = False

    fns = {"both": lambda: model.encode(both_inputs),
           "vision": lambda: model.encode({"vision": vision}), "audio": lambda: model.encode({"audio": audio})}  # fmt: skip
    if not args.device.startswith("cpu"):  # CPU streams are no-ops: nothing to measure there
        fns["both, streams"] = concurrent
    times = interleaved(fns, args.device, args.warmup, args.repeats)
    both = statistics.median(times["both"])
    alone = statistics.median(times["vision"]) + statistics.median(times["audio"])
    rows = [{"what": "encode vision+audio vs sum alone", "mmcore": both, "reference": alone, "ratio": both / alone, "unit": "s", "target": "<= 1.00"}]
    if "both, streams" in times:
        streams = statistics.median(times["both, streams"])
        rows.append({"what": "encode vision+audio, concurrent streams vs sequential", "mmcore": streams, "reference": both, "ratio": streams / both, "unit": "s", "target": "< 1.00"})
    return rows


def bench_mfu(llava, twin, batch, args) -> list[dict]:
    """Align, then LoRA (r=16 on every LLM linear; changes the shared modules, so it runs last)."""
    if not args.device.startswith("cuda"):
        return []
    n_llm = sum(p.numel() for p in llava.model.language_model.parameters()) + llava.lm_head.weight.numel()
    n_vision = sum(p.numel() for p in llava.model.vision_tower.parameters())
    tokens = batch["input_ids"].numel()
    vc = llava.config.vision_config
    image_tokens = batch["pixel_values"].shape[0] * ((vc.image_size // vc.patch_size) ** 2 + 1)
    # Both stages: LLM forward (2N per token) + backward to the activations (2N per token; no base
    # weight grads, LoRA's are negligible); vision tower forward only. Attention-score FLOPs are
    # left out (small at these lengths).
    flops = 4 * n_llm * tokens + 2 * n_vision * image_tokens
    name, peak = peak_bf16_flops(args.device)
    rows = []
    for stage in ("align", "lora"):
        if stage == "align":
            set_stage(llava, "align")
        else:
            try:
                import peft  # noqa: F401
            except ImportError:
                break
            from mmcore.training import apply_stage

            apply_stage(twin, "lora", lora_r=16)
            twin.to(args.device, next(twin.language_model.parameters()).dtype)
        times = interleaved({"mmcore": step_fn(twin, batch)}, args.device, args.warmup, args.repeats)["mmcore"]
        step = statistics.median(times)
        rows += [{"what": f"{stage} step tokens/s", "mmcore": tokens / step, "reference": None, "ratio": None, "unit": "tok/s", "target": ""},
                 {"what": f"{stage} step MFU ({name})", "mmcore": flops / step / peak if peak else None, "reference": None,
                  "ratio": None, "unit": "", "target": ">= 0.45"}]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--size", choices=SIZES, default="small")
    # full size on one 80 GB GPU: 4 x 1024 tokens keeps an 8B finetune step's weights, gradients and
    # activations (about 6.5 MB per token in bf16 without activation checkpointing) in memory
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, help="default: 256 (small), 1024 (full)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", default="step,memory,generate,encoders,mfu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.seq = args.seq or {"small": 256, "full": 1024}[args.size]
    dtype = DTYPES[args.dtype]
    only = set(args.only.split(","))
    torch.set_num_threads(torch.get_num_threads())
    llava, twin, image_token = build(args.size, args.device, dtype)
    batch = make_batch(llava, image_token, args.batch, args.seq, args.device, dtype)
    rows = []
    for name, fn in (("step", bench_step), ("memory", bench_memory), ("generate", bench_generate), ("mfu", bench_mfu)):
        if name in only:
            rows += fn(llava, twin, batch, args)
    if "encoders" in only:
        rows += bench_encoders(args, dtype)

    table = Table(title=f"mmcore vs references: {args.size}, {args.device}, {args.dtype}, batch {args.batch}, seq {args.seq}")
    for col in ("measurement", "mmcore", "reference", "ratio", "target"):
        table.add_column(col, justify="left" if col == "measurement" else "right")

    def fmt(v, unit):
        if v is None:
            return "-"
        if unit == "B":
            return f"{v / 2**20:.1f} MiB"
        if unit == "s":
            return f"{v * 1e3:.1f} ms"
        return f"{v:.1f} {unit}" if unit else f"{v:.3f}"

    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}x"
        table.add_row(row["what"], fmt(row["mmcore"], row["unit"]), fmt(row["reference"], row["unit"]), ratio, row["target"])
    Console().print(table)
    write_json(args.json, rows, args)
    return rows


if __name__ == "__main__":
    main()
