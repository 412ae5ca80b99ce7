"""Training throughput of four ways to batch a LLaVA-instruct-like mix, in one process; print ratios.

For the same samples and the same model, one epoch of training steps (forward, backward, AdamW) with:

- ``(a) random, padded``: shuffled batches of ``--batch`` samples, each padded to its longest sample
  (what `transformers.Trainer` with HF's default collator gives; mmcore's collator without packing);
- ``(b) length-grouped``: mmcore's `GroupedBatchSampler` (one modality group per batch, similar
  lengths), ``--batch`` samples, padded;
- ``(c) packed``: `TokenBudgetBatchSampler` batches of up to ``--pack-to`` tokens, each packed by
  ``MultimodalCollator(pack_to=...)`` into one row (attention within each sample), as micro-batches:
  an optimizer step every k of them, k = (a)'s real tokens per batch / ``--pack-to``, rounded, so
  that an update holds about as many tokens as (a)'s (``mmcore train --batch-length 512 --pack-to
  512 --grad-accum k``);
- ``(d) packed, multi-row``: `TokenBudgetBatchSampler` batches of k rows of up to ``--pack-to``
  tokens each (``row_tokens``), rows of similar fill together, packed by the same collator into a
  (k, W) batch: one pass and one optimizer step per batch (``mmcore train --batch-length 2048
  --pack-to 512``).

The optimizer is AdamW, fused (as `mmcore train` and `transformers.Trainer`'s default
``adamw_torch_fused`` step). ``--packed-groups none`` lets (c) and (d) mix modalities in a batch (one
process needs no modality grouping); the default groups them by modality, as ``mmcore train`` does.

``--device cuda --dtype bf16`` runs it on a GPU (bf16 autocast over fp32 weights), and then also
reports MFU: model FLOPs (6 per parameter and real token for the language model, 6 per parameter
and position for the encoders; attention scores left out; padding is not counted as work) per
second over the GPU's dense bf16 peak. ``--hidden/--layers/--heads`` size the language model and
``--attn`` picks its attention (``flash_attention_2`` takes the packed rows' ``cu_seq_lens``).

Reported per strategy: samples/s and real tokens/s (tokens that are not padding), the padding
overhead (padding as % of all tokens the model ran), and each rate over (a)'s, measured in the same
process; the strategies alternate ``--repeats`` times and each one's fastest epoch counts (load from
other processes only ever adds time). Batches are collated before timing, so only the training step
is measured (the data path is not).

The mix (seeded), modelled on LLaVA-Instruct-665k's composition and lengths; text lengths are
log-normal, in tokens of the tiny tokenizer (one word, one token):

- 30 % text only: median 200 tokens (sigma 0.6), clipped to 50-600;
- 60 % one image: 64 image tokens + text of median 100 (sigma 0.7), clipped to 20-600;
- 5 % multi-image: 2-4 images (64 tokens each) + the same text distribution;
- 5 % audio: one clip (50 tokens) + the same text distribution.
Each conversation is a user turn (a quarter of the text, with the placeholders) and an answer.

Model (random weights, fp32, SDPA): CLIP vision 2 x 64 (112 px, patch 14: 64 tokens, CLS dropped),
Whisper encoder 1 x 64 (50 tokens per clip), MLP projectors, and the language model of
bench_model.py's small size: Llama 4 layers x 512 (intermediate 1536, 8 heads, 4 KV heads); full
finetuning. On CPU, SDPA computes a packed row's block-diagonal mask densely, so a row's attention
costs its full length squared: rows of 512 tokens (a sample longer than that gets its row alone)
keep that below the padded batches' own; flash-attention on GPU computes only the blocks.

    python benchmarks/bench_packing.py                       # CPU, 96 samples, 2 repeats
    python benchmarks/bench_packing.py --samples 16 --hidden 64 --repeats 1 --json out.json   # a smoke run
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from _report import interleaved, peak_bf16_flops, write_json
from rich.console import Console
from rich.table import Table

WORDS = ["the", "a", "red", "blue", "green", "of", "on", "mat", "tone", "is", "yellow", "white", "how", "are", "nine"]
IMAGE_TOKENS, AUDIO_TOKENS = 64, 50
MIX = (("text", 0.30), ("image", 0.60), ("multi-image", 0.05), ("audio", 0.05))


def build(seed: int = 0, hidden: int = 512, layers: int = 4, heads: int = 8, attn: str = "sdpa"):
    """The model and its processor (plain stacking processors and fixed token counts)."""
    from mmcore import ModalEncoderModule, MultimodalModel, MultimodalProcessor
    from mmcore.callbacks import SelectFeatureLayer
    from mmcore.modeling.tokens import add_modality_tokens
    from mmcore.testing import tiny_clip_vision, tiny_llm, tiny_tokenizer, tiny_whisper_encoder

    tokenizer = tiny_tokenizer()
    vision = tiny_clip_vision(hidden_size=64, image_size=112, patch_size=14, seed=seed)
    audio = tiny_whisper_encoder(d_model=64, num_mel_bins=8, max_source_positions=AUDIO_TOKENS, seed=seed)
    llm = tiny_llm(
        "llama", vocab_size=len(tokenizer), hidden_size=hidden, seed=seed, num_hidden_layers=layers,
        intermediate_size=3 * hidden, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=8192,
    )  # fmt: skip
    llm.config._attn_implementation = attn
    model = MultimodalModel(
        encoders={
            "vision": ModalEncoderModule(vision, postprocess_module_callback=SelectFeatureLayer(-2, drop_prefix_tokens=1)),
            "audio": ModalEncoderModule(audio),
        },
        language_model=llm,
        init_projector_type="mlp2x_gelu",
    )
    add_modality_tokens(tokenizer, model)

    def stacked(key):
        return lambda items: {key: torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in items])}

    processor = MultimodalProcessor(
        {"vision": stacked("pixel_values"), "audio": stacked("input_features")}, tokenizer, model,
        {"vision": lambda items, out: [IMAGE_TOKENS] * len(items), "audio": lambda items, out: [AUDIO_TOKENS] * len(items)},
    )  # fmt: skip
    return model, processor


def make_mix(n: int, seed: int = 0) -> list[dict]:
    """``n`` samples of the mix in the module docstring."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def text_length(median: float, sigma: float, low: int, high: int) -> int:
        return int(min(high, max(low, round(rng.lognormvariate(0.0, sigma) * median))))

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    samples = []
    for _ in range(n):
        kind = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]
        sample: dict = {}
        if kind == "text":
            length, marks = text_length(200, 0.6, 50, 600), ""
        else:
            length = text_length(100, 0.7, 20, 600)
            if kind == "audio":
                sample["audio"] = [torch.randn(8, 2 * AUDIO_TOKENS, generator=gen)]
                marks = "<audio>\n"
            else:
                count = 1 if kind == "image" else rng.randint(2, 4)
                sample["vision"] = [torch.randn(3, 112, 112, generator=gen) for _ in range(count)]
                marks = "<vision>" * count + "\n"
        question = max(1, length // 4)
        sample["messages"] = [
            {"role": "user", "content": marks + words(question)},
            {"role": "assistant", "content": words(length - question)},
        ]
        sample["kind"] = kind
        samples.append(sample)
    return samples


def model_flops(model, samples):
    """``flops(real_tokens, sample_indices)``: training FLOPs (forward and backward, 6 per parameter and
    token; attention scores left out) of the language model over ``real_tokens`` and of each encoder
    over the positions of the samples' items (CLIP: 64 patches + CLS per image; Whisper: 50 per clip)."""
    llm = model.language_model
    n_llm = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    if llm.get_output_embeddings().weight is llm.get_input_embeddings().weight:  # tied: the head is a matmul
        n_llm += llm.get_output_embeddings().weight.numel()
    n_enc = {m: sum(p.numel() for p in model.encoders[m].parameters()) for m in ("vision", "audio")}
    positions = {"vision": IMAGE_TOKENS + 1, "audio": AUDIO_TOKENS}

    def flops(real_tokens: int, indices: list[int]) -> float:
        items = {m: sum(len(samples[i].get(m, [])) for i in indices) for m in n_enc}
        return 6.0 * (n_llm * real_tokens + sum(n_enc[m] * positions[m] * items[m] for m in n_enc))

    return flops


class MixDataset(torch.utils.data.Dataset):
    """The mix with the length function and groups mmcore's samplers read."""

    def __init__(self, samples, lengths):
        self.samples, self.lengths = samples, lengths

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return {k: v for k, v in self.samples[i].items() if k != "kind"}

    def modality_key(self, i):
        return "+".join(m for m in ("audio", "vision") if m in self.samples[i]) or "text"

    def length(self, i):
        return self.lengths[i]


def strategies(dataset, processor, args, rows: int) -> dict[str, tuple[list[list[int]], list[dict]]]:
    """Each strategy's batches for one epoch: the sample indices, and the collated batches; ``rows``:
    the packed rows per update, (c)'s micro-batches and (d)'s rows."""
    from mmcore.training import GroupedBatchSampler, MultimodalCollator, TokenBudgetBatchSampler

    n = len(dataset)
    grouping = {"group_by_modality": args.packed_groups == "modality"}
    order = list(range(n))
    random.Random(args.seed).shuffle(order)
    plans = {
        "(a) random, padded": [order[s : s + args.batch] for s in range(0, n, args.batch)],
        "(b) length-grouped": list(GroupedBatchSampler.for_dataset(dataset, args.batch, seed=args.seed)),
        "(c) packed": list(TokenBudgetBatchSampler.for_dataset(dataset, args.pack_to, seed=args.seed, **grouping)),
        "(d) packed, multi-row": list(
            TokenBudgetBatchSampler.for_dataset(
                dataset, rows * args.pack_to, row_tokens=args.pack_to, seed=args.seed, **grouping
            )
        ),
    }
    padded, packed = MultimodalCollator(processor), MultimodalCollator(processor, pack_to=args.pack_to)
    return {
        name: (plan, [(packed if "packed" in name else padded)([dataset[i] for i in batch]) for batch in plan])
        for name, plan in plans.items()
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8, help="samples per padded batch, (a) and (b)")
    parser.add_argument("--pack-to", type=int, default=512, help="tokens per packed row and batch, (c)")
    parser.add_argument(
        "--packed-groups", choices=("modality", "none"), default="modality",
        help="(c), (d): one modality group per batch (mmcore train's default), or any mix",
    )  # fmt: skip
    parser.add_argument("--hidden", type=int, default=512, help="the language model's width")
    parser.add_argument("--layers", type=int, default=4, help="the language model's layers")
    parser.add_argument("--heads", type=int, default=8, help="its attention heads (half as many KV heads)")
    parser.add_argument("--attn", default="sdpa", help="its attention: sdpa, eager, flash_attention_2, ...")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="steps of each strategy before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = build(args.seed, args.hidden, args.layers, args.heads, args.attn)
    model.to(args.device)
    cuda = torch.device(args.device).type == "cuda"
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    samples = make_mix(args.samples, args.seed)
    from mmcore.training import MultimodalCollator

    alone = MultimodalCollator(processor)
    lengths = [alone([{k: v for k, v in s.items() if k != "kind"}])["input_ids"].shape[1] for s in samples]
    dataset = MixDataset(samples, lengths)
    # packed rows per update: about (a)'s real tokens per batch
    rows_per_update = max(1, round(sum(lengths) / -(-len(samples) // args.batch) / args.pack_to))
    batches = {
        name: (plan, [{k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in group])
        for name, (plan, group) in strategies(dataset, processor, args, rows_per_update).items()
    }
    pad = processor.tokenizer.pad_token_id
    model.train()
    # fused, as mmcore train and transformers.Trainer (adamw_torch_fused) step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    # (c): micro-batches of one row, an update every rows_per_update of them; (d): one batch of that many rows
    accum = {name: 1 for name in batches}
    accum["(c) packed"] = rows_per_update

    def epoch(group, k):
        for start in range(0, len(group), k):
            micro = group[start : start + k]
            n = sum((b["labels"][:, 1:] != -100).sum() for b in micro)
            for batch in micro:
                with autocast:
                    loss = model(**{**batch, "use_cache": False}, num_items_in_batch=n).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for name, (_, group) in batches.items():
        epoch(group[: args.warmup * accum[name]], accum[name])
    epochs = {name: lambda name=name, group=group: epoch(group, accum[name]) for name, (_, group) in batches.items()}
    times = interleaved(epochs, args.device, warmup=0, repeats=args.repeats)

    flops = model_flops(model, samples)
    name_peak = peak_bf16_flops(args.device) if cuda else (None, None)
    rows = []
    for name, (plan, group) in batches.items():
        total = sum(b["input_ids"].numel() for b in group)
        real = sum(lengths[i] for batch in plan for i in batch)
        assert real == sum(int((b["input_ids"] != pad).sum()) for b in group), name  # all but padding is real
        count = sum(len(batch) for batch in plan)
        seconds = min(times[name])
        rows.append({"strategy": name, "batches": len(group), "updates": -(-len(group) // accum[name]), "samples": count, "real_tokens": real, "tokens": total,
                     "padding_pct": 100.0 * (total - real) / total, "seconds": seconds, "times": times[name],
                     "samples_per_s": count / seconds, "real_tokens_per_s": real / seconds})  # fmt: skip
        # model FLOPs of the real tokens and items only: padding is not useful work
        rows[-1]["model_flops"] = flops(real, [i for batch in plan for i in batch])
        rows[-1]["model_tflops_per_s"] = rows[-1]["model_flops"] / seconds / 1e12
        if name_peak[1]:
            rows[-1]["mfu"] = rows[-1]["model_flops"] / seconds / name_peak[1]
            rows[-1]["gpu"] = name_peak[0]
    base = rows[0]
    for row in rows:
        row["samples_per_s_vs_a"] = row["samples_per_s"] / base["samples_per_s"]
        row["real_tokens_per_s_vs_a"] = row["real_tokens_per_s"] / base["real_tokens_per_s"]

    kinds = {k: sum(s["kind"] == k for s in samples) for k, _ in MIX}
    table = Table(
        title=f"training step throughput: {args.samples} samples ({', '.join(f'{v} {k}' for k, v in kinds.items())}), "
        f"mean {statistics.mean(lengths):.0f} tokens; batch {args.batch} / pack-to {args.pack_to}; "
        f"{torch.get_num_threads()} threads"
    )
    for col in ("strategy", "batches", "updates", "samples/s", "real tok/s", "padding", "samples/s vs (a)", "tok/s vs (a)"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in rows:
        table.add_row(r["strategy"], str(r["batches"]), str(r["updates"]), f"{r['samples_per_s']:.2f}", f"{r['real_tokens_per_s']:.0f}",
                      f"{r['padding_pct']:.1f} %", f"{r['samples_per_s_vs_a']:.2f}x", f"{r['real_tokens_per_s_vs_a']:.2f}x")  # fmt: skip
    Console().print(table)
    said = ", ".join(f"{r['strategy'][:3]} {r['model_tflops_per_s']:.3g}" for r in rows)
    Console().print(f"model TFLOP/s (real tokens and items only): {said}")
    if name_peak[1]:
        Console().print("MFU (" + name_peak[0] + "): " + ", ".join(f"{r['strategy'][:3]} {r['mfu']:.1%}" for r in rows))
    write_json(args.json, rows, args, mix=kinds, lengths=lengths)
    return rows


if __name__ == "__main__":
    main()
