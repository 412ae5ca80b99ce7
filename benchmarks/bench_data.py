"""Does the data path keep up with the training step? Samples/s of loading + processing + collating
alone, of the step alone, and of both together, with ``num_workers`` 0, 1 and 2.

The data is mmcore's real path (`ConversationDataset` over a JSONL file of PNG images and WAV clips
on disk -> the plugins' processors through `MultimodalProcessor` -> `MultimodalCollator`) on a mix
like bench_packing's: 30 % text only, 60 % one image, 5 % two or three images, 5 % one audio clip.
Images are 320-800 px wide photos-like noise (COCO's sizes), clips 2-15 s at 16 kHz.

Two models, each with the processors its encoders come with (random weights, the align stage:
towers and LLM frozen, projectors trained, the cheapest step and so the hardest case for the data):

- ``tiny``: the ``tiny`` CLIP and Whisper presets (28 px, 0.2 s windows) and a 2 x 64 Llama;
- ``mid``: CLIP ViT-B/16 at 224 px (12 layers), Whisper-tiny's encoder (30 s windows) and a 4 x 512
  Llama.

Rows per model: data alone (iterating the DataLoader), step alone (on batches collated beforehand)
and end to end (the DataLoader feeding the step), samples/s, with the end-to-end rate as a ratio of
the step-alone rate: 1.00 means the data path costs the step nothing.

    PYTHONPATH=<the plugin sites> .venv/bin/python benchmarks/bench_data.py --json data.json
    ... --small   (a smoke run: the tiny model, 16 samples, workers 0 and 1)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import interleaved, write_json
from rich.console import Console
from rich.table import Table

MIX = (("text", 0.30), ("image", 0.60), ("multi-image", 0.05), ("audio", 0.05))
WORDS = ["the", "a", "red", "blue", "green", "of", "on", "mat", "tone", "is", "yellow", "white", "how", "are", "nine"]


def write_data(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` LLaVA-style records and their media files under ``root``; the JSONL path."""
    from PIL import Image

    from mmcore.training.data import save_wav

    rng, prng = np.random.default_rng(seed), random.Random(seed)
    (root / "images").mkdir(parents=True)
    (root / "clips").mkdir()
    kinds = prng.choices([k for k, _ in MIX], weights=[w for _, w in MIX], k=n)

    def image(i: int) -> str:
        w = int(rng.integers(320, 801))
        h = int(w * rng.uniform(0.6, 1.3))
        # smooth noise (compresses like a photo, unlike white noise)
        small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(root / "images" / f"{i}.png")
        return f"images/{i}.png"

    def words(k: int) -> str:
        return " ".join(prng.choice(WORDS) for _ in range(k))

    with open(root / "data.jsonl", "w") as fh:
        for i, kind in enumerate(kinds):
            record: dict = {"id": str(i)}
            marker = ""
            if kind == "image":
                record["image"], marker = image(i), "<image>\n"
            elif kind == "multi-image":
                k = prng.choice((2, 3))
                record["image"] = [image(i * 10 + j) for j in range(k)]
                marker = "<image>\n" * k
            elif kind == "audio":
                seconds = rng.uniform(2, 15)
                save_wav(root / "clips" / f"{i}.wav", torch.from_numpy(rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1), 16000)
                record["audio"], marker = f"clips/{i}.wav", "<audio>\n"
            record["conversations"] = [
                {"from": "human", "value": marker + words(prng.randint(8, 40))},
                {"from": "gpt", "value": words(prng.randint(10, 80))},
            ]
            fh.write(json.dumps(record) + "\n")
    return root / "data.jsonl"


def build(size: str):
    import mmcore
    from mmcore import MultimodalModel, MultimodalProcessor
    from mmcore.modeling.tokens import add_modality_tokens
    from mmcore.testing import tiny_llm, tiny_tokenizer
    from mmcore.training.stages import apply_stage

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision = mmcore.build_encoder("clip", preset="tiny" if size == "tiny" else "vit-b-16")
    audio = mmcore.build_encoder("whisper", preset="tiny" if size == "tiny" else "whisper-tiny")
    hidden, layers = (64, 2) if size == "tiny" else (512, 4)
    llm = tiny_llm(
        "llama", vocab_size=len(tokenizer) + 8, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
    )  # fmt: skip
    llm.config._attn_implementation = "sdpa"
    model = MultimodalModel({"vision": vision, "audio": audio}, llm, init_projector_type="mlp2x_gelu")
    add_modality_tokens(tokenizer, model)
    apply_stage(model, "align")
    return model.train(), MultimodalProcessor.from_model(model, tokenizer)


def _loader(dataset, collator, batch: int, workers: int):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=False, collate_fn=collator, num_workers=workers,
        persistent_workers=False, multiprocessing_context="fork" if workers else None,
    )  # fmt: skip


def run(size: str, data: Path, args) -> list[dict]:
    from mmcore.training import ConversationDataset, MultimodalCollator
    from mmcore.training.data import registered_loaders

    model, processor = build(size)
    dataset = ConversationDataset(data, loaders=registered_loaders())
    collator = MultimodalCollator(processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n = len(dataset)

    def step(batch):
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = list(_loader(dataset, collator, args.batch, 0))
    for batch in batches:  # warm-up: every batch shape once
        step(batch)
    fns: dict[tuple[str, int | None], Any] = {("step alone (batches collated beforehand)", None): lambda: [step(b) for b in batches]}
    for workers in args.workers:
        fns[("data alone", workers)] = lambda w=workers: [None for _ in _loader(dataset, collator, args.batch, w)]
    for workers in args.workers:
        fns[("end to end", workers)] = lambda w=workers: [step(b) for b in _loader(dataset, collator, args.batch, w)]
    best = {key: min(t) for key, t in interleaved(fns, warmup=0, repeats=args.repeats).items()}
    rows = [{"model": size, "what": what, "workers": workers, "seconds": best[(what, workers)],
             "samples_per_s": n / best[(what, workers)]} for what, workers in fns]  # fmt: skip
    alone = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_step_alone"] = row["samples_per_s"] / alone
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=2, help="passes of each row; the fastest counts")
    parser.add_argument("--small", action="store_true", help="the tiny model, 16 samples, workers 0 and 1")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.small:
        args.samples, args.models, args.workers, args.repeats = 16, "tiny", "0,1", 2
    args.workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmcore-bench-data-") as tmp:
        data = write_data(Path(tmp), args.samples)
        for size in args.models.split(","):
            rows += run(size, data, args)
    table = Table(title=f"data path vs training step: {args.samples} samples, batches of {args.batch}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for col in ("model", "what", "workers", "samples/s", "vs step alone"):
        table.add_column(col, justify="left" if col in ("model", "what") else "right")
    for r in rows:
        table.add_row(r["model"], r["what"], "" if r["workers"] is None else str(r["workers"]), f"{r['samples_per_s']:.1f}", f"{r['vs_step_alone']:.2f}x")
    Console().print(table)
    write_json(args.json, rows, args)
    return rows


if __name__ == "__main__":
    main()
