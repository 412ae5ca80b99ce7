"""Peak memory of converting a transformers LLaVA into mmcore, against loading the LLaVA alone.

Each measurement runs in its own fresh process (peak resident memory, ``ru_maxrss``, is per
process):

- ``llava load``: ``LlavaForConditionalGeneration.from_pretrained(DIR)``, the reference;
- ``mmcore convert``: ``mmcore.convert.convert_pretrained(DIR)``, the same load plus the conversion
  (the mmcore model holds LLaVA's own modules: no weight is copied);
- ``mmcore convert + save``: the conversion, then ``save_pretrained`` of the mmcore directory
  (safetensors, written shard by shard by transformers).

The source is a random mid-size LLaVA written to a temporary directory first: a CLIP-B/16-sized tower
and a Qwen2-0.5B-sized language model (``--small`` for a quick run). A real-size config
(LLaVA-1.5-7B's shapes) is also converted on the meta device, which reads configs only.

    python benchmarks/bench_convert.py
    python benchmarks/bench_convert.py --small --json out.json

Ratios against the reference load in the same run; nothing here is a timed assert.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

from _report import write_json

MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    what, source, target = sys.argv[1], sys.argv[2], sys.argv[3]
    import torch
    start = time.perf_counter()
    if what == "llava load":
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(source)
    else:
        from mmcore.convert import convert_pretrained
        model = convert_pretrained(source).model
        if what == "mmcore convert + save":
            model.save_pretrained(target)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"what": what, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": seconds, "params": params}))
    """
)


def build_source(path: str, small: bool) -> int:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    from mmcore.convert.testing import _tiny_parts

    tokenizer = _tiny_parts("clip")[0]
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=4 if small else 12,
                              num_attention_heads=12, image_size=224, patch_size=16)  # fmt: skip
    text = Qwen2Config(vocab_size=32000 if small else 151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=4 if small else 24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=False)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(path)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
    ).save_pretrained(path)  # fmt: skip
    return sum(p.numel() for p in model.parameters())


def meta_real_size() -> dict:
    """LLaVA-1.5-7B's shapes converted on the meta device (configs only, no weights)."""
    import resource

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmcore.convert import from_hf

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32),
        image_token_index=32000,
    )  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    mllm = from_hf(hf)
    return {
        "what": "LLaVA-1.5-7B shapes, meta device",
        "params": sum(p.numel() for p in mllm.parameters()),
        "seconds": time.perf_counter() - start,
        "peak_growth_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 4-layer tower and LLM (quick)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmcore-bench-convert-") as tmp:
        source = os.path.join(tmp, "llava")
        params = build_source(source, args.small)
        weights_mib = params * 4 / 2**20
        for what in ("llava load", "mmcore convert", "mmcore convert + save"):
            done = subprocess.run(
                [sys.executable, "-c", MEASURE, what, source, os.path.join(tmp, "mmcore")],
                capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            if done.returncode != 0:  # e.g. the CLIP plugin is not installed: say why, not only the exit status
                raise SystemExit(f"{what!r} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = rows[0]["peak_mib"]
    for row in rows:
        row["peak_vs_llava_load"] = row["peak_mib"] / reference
        row["weights_mib"] = weights_mib
    rows.append(meta_real_size())
    for row in rows:
        print(json.dumps(row))
    write_json(args.json, rows, args)
    return rows


if __name__ == "__main__":
    main()
