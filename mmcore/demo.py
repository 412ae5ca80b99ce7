"""The main job, for now: assemble a tiny multimodal model offline and show it working.

Run with ``make demo`` (or ``python -m mmcore.demo``). Builds a tiny CLIP + Whisper + Llama model
from random-weight configs, runs a forward pass with a loss and a backward pass, generates, saves,
reloads, and checks the reloaded model agrees bit for bit. Exits non-zero if anything disagrees.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from mmcore import MultimodalModel, expand_placeholders
    from mmcore.testing import tiny_multimodal_model

    console = Console()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = tiny_multimodal_model(projector="mlp2x_gelu", wrap=True)
    console.print(f"[bold]assembled[/] tiny CLIP + Whisper + Llama in {time.perf_counter() - t0:.2f}s")

    table = Table("part", "trainable", "total")
    for part, (trainable, total) in model.trainable_parameters().items():
        table.add_row(part, f"{trainable:,}", f"{total:,}")
    console.print(table)

    token_ids = model.config.modality_token_ids
    wrap = {m: tuple(v) for m, v in model.config.modality_wrap_token_ids.items()}
    prompts = ["a picture <vision> and a sound <audio> :", "two pictures <vision> <vision> :"]
    items = [{"vision": [4], "audio": [10]}, {"vision": [4, 4]}]
    rows = [
        expand_placeholders(tokenizer(p).input_ids, token_ids, n, wrap=wrap) for p, n in zip(prompts, items)
    ]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding
    attention_mask = (torch.arange(width) >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    pixel_values = torch.randn(3, 3, 28, 28)  # three images: one in sample 0, two in sample 1
    input_features = torch.randn(1, 8, 20)  # one audio clip, in sample 0
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, input_features=input_features)

    model.train()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(**batch, labels=labels)
    out.loss.backward()
    grads = sum(p.grad is not None for p in model.parameters())
    console.print(f"[bold]forward[/] logits {tuple(out.logits.shape)}, loss {out.loss.item():.4f}; backward: {grads} tensors got gradients")

    model.eval()
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    for row, prompt in zip(generated, prompts):
        new = tokenizer.decode(row[width:], skip_special_tokens=True)
        console.print(f"[bold]generate[/] {prompt!r} -> {new!r}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-mllm"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        loaded = MultimodalModel.from_pretrained(path).eval()
        files = sorted(p.name for p in path.iterdir())
        with torch.no_grad():
            same = torch.equal(model(**batch).logits, loaded(**batch).logits)
        same_gen = torch.equal(generated, loaded.generate(**batch, max_new_tokens=8, do_sample=False))
    console.print(f"[bold]saved[/] {', '.join(files)}")
    console.print(f"[bold]reloaded[/] logits identical: {same}; generations identical: {same_gen}")
    ok = bool(torch.isfinite(out.loss)) and same and same_gen and grads > 0
    console.print("[green]demo OK[/]" if ok else "[red]demo FAILED[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
