"""Items that cost what they hold: audio clips trimmed to their length, and anyres images.

Two measurements, each a ratio against a reference run in the same process (timings alternate and
the median of ``--repeats`` counts; nothing here is a timed assert):

- **audio**: a batch of clips of mixed lengths (``--clips`` seconds) through a Whisper encoder (the
  ``whisper-tiny`` preset's shapes, random weights) and a small Llama. With ``trim_padding`` (the
  default for new models, as Qwen2-Audio) each clip keeps the positions its own samples cover; without
  it every clip costs the 30 s window (1500 positions). Rows: language-model tokens of the batch, and
  the time of a training step (forward + backward, tower frozen as in the align stage) with trimming
  vs the full window.
- **anyres**: a LLaVA-NeXT model (CLIP tower, tiles of ``--tile`` px, a small Llama) built as
  ``LlavaNextForConditionalGeneration`` and converted to mmcore (`mmcore.convert.from_hf`: the same
  modules), on a left-padded batch of two images of different aspect ratios from LlavaNextProcessor.
  Rows: the forward of the mmcore model vs HF's on the same inputs (target ratio <= 1.02), and the
  same for a training step. The outputs are checked equal first.
- **native**: Qwen2-VL's native-resolution tower (each image its own grid of 14 px patches, all of a
  batch one flat patch sequence) and its 3-D rotary positions: a ``Qwen2VLForConditionalGeneration``
  (a 4-block, width-256 tower and the small text model) converted to mmcore (the same modules, the
  ``mrope`` callback), on a left-padded batch of two images of different sizes and a 4-frame video
  from Qwen2VLProcessor. Rows as for anyres (target ratio <= 1.02), logits checked equal first.

    PYTHONPATH=<the plugin sites> .venv/bin/python benchmarks/bench_dynamic.py --json dynamic.json
    ... --small   (a quick run: tiny sizes, two repeats)
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from _report import interleaved, write_json
from rich.console import Console
from rich.table import Table


def _llm(vocab: int, hidden: int, layers: int):
    from mmcore.testing import tiny_llm

    llm = tiny_llm(
        "llama", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
    )  # fmt: skip
    llm.config._attn_implementation = "sdpa"
    return llm


def audio(args) -> list[dict]:
    import mmcore
    from mmcore import MultimodalModel, MultimodalProcessor
    from mmcore.modeling.tokens import add_modality_tokens
    from mmcore.testing import tiny_tokenizer
    from mmcore.training.stages import apply_stage

    preset = "tiny" if args.small else "whisper-tiny"
    # the tiny preset's window is 0.2 s (10 positions): clips shorter than it, in the same proportions
    seconds = [float(s) * (0.2 / 30 if args.small else 1.0) for s in args.clips.split(",")]
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1) for s in seconds]
    rows, steps = [], {}
    for trim in (True, False):
        torch.manual_seed(0)
        encoder = mmcore.build_encoder("whisper", preset=preset, trim_padding=trim)
        tokenizer = tiny_tokenizer()
        model = MultimodalModel({"audio": encoder}, _llm(len(tokenizer) + 8, args.hidden, args.layers))
        add_modality_tokens(tokenizer, model)
        apply_stage(model, "align")
        processor = MultimodalProcessor.from_model(model, tokenizer, padding_side="right")
        token = processor.tokens["audio"]
        batch = processor(text=[f"{token} transcribe this clip" for _ in clips], audio=clips, return_tensors="pt", padding=True)
        batch = dict(batch)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model.train()

        def step(model=model, batch=batch):
            model(**batch, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        name = "trimmed (trim_padding)" if trim else "full window"
        steps[name] = step
        rows.append({"what": f"audio: {name}", "llm_tokens": int(batch["input_ids"].numel()),
                     "audio_tokens": int((batch["input_ids"] == tokenizer.convert_tokens_to_ids(token)).sum())})  # fmt: skip
    times = interleaved(steps, repeats=args.repeats)
    for row, name in zip(rows, steps):
        row["seconds"] = statistics.median(times[name])
        row["times"] = times[name]
    full = rows[1]
    for row in rows:
        row["tokens_vs_full"] = row["llm_tokens"] / full["llm_tokens"]
        row["step_vs_full"] = row["seconds"] / full["seconds"]
    return rows


def _forward_and_step_times(hf: torch.nn.Module, mllm: torch.nn.Module, batch: dict, repeats: int) -> dict:
    """Each model's forward (no grad, eval mode) and training step (train mode) on ``batch``, timed
    alternately: ``{"hf forward", "mmcore forward", "hf step", "mmcore step"}`` -> seconds per repeat."""

    @torch.no_grad()
    def forward(model):
        model(**batch)

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def step(model):
        model(**batch, labels=labels, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    times = interleaved({"hf forward": lambda: forward(hf), "mmcore forward": lambda: forward(mllm)}, repeats=repeats)
    hf.train(), mllm.train()
    times |= interleaved({"hf step": lambda: step(hf), "mmcore step": lambda: step(mllm)}, repeats=repeats)
    return times


def anyres(args) -> list[dict]:
    from tokenizers import AddedToken
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from mmcore.convert import from_hf
    from mmcore.testing import tiny_tokenizer

    tile = 28 if args.small else args.tile
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [tile, 3 * tile], [3 * tile, tile]]
    vision = CLIPVisionConfig(
        hidden_size=64 if args.small else 256, intermediate_size=128 if args.small else 1024,
        num_hidden_layers=2 if args.small else 4, num_attention_heads=4, image_size=tile, patch_size=14,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(config)
    hf.model.image_newline.data.normal_()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    tokenizer.padding_side = "left"
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = ((tile + 3, 3 * tile - 5), (2 * tile + 9, tile + 1))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    prompts = ["user: <image> what is this? assistant: a photo", "user: describe <image> in a few words please assistant:"]
    batch = dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))
    mllm = from_hf(hf).eval()
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(mllm(**batch).logits, hf(**batch).logits, rtol=0, atol=1e-4)

    times = _forward_and_step_times(hf, mllm, batch, args.repeats)
    tokens = int((batch["input_ids"] == config.image_token_index).sum())
    rows = []
    for what in ("forward", "step"):
        ref, got = statistics.median(times[f"hf {what}"]), statistics.median(times[f"mmcore {what}"])
        rows.append({"what": f"anyres: {what} (no grad)" if what == "forward" else f"anyres: training {what}",
                     "image_tokens": tokens, "llm_tokens": int(batch["input_ids"].numel()),
                     "hf_seconds": ref, "mmcore_seconds": got, "ratio": got / ref,
                     "hf_times": times[f"hf {what}"], "mmcore_times": times[f"mmcore {what}"]})  # fmt: skip
    return rows


def native(args) -> list[dict]:
    """Qwen2-VL's native-resolution tower (one flat patch sequence, ``grid_thw``) and M-RoPE: a
    ``Qwen2VLForConditionalGeneration`` built from a config and converted (`mmcore.convert.from_hf`:
    the same modules, the positions through the ``mrope`` callback), on a left-padded batch of two
    images of different sizes and a short video from Qwen2VLProcessor; forward and training step vs
    HF's on the same inputs, the logits checked equal first."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from mmcore.convert import from_hf
    from mmcore.convert.testing import qwen2_vl_tokenizer

    tokenizer, ids = qwen2_vl_tokenizer()
    heads = 8
    half = args.hidden // heads // 2  # each head's rotary half, over (t, h, w) as Qwen2-VL's 16/24/24 of 64
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    vision = dict(
        depth=2 if args.small else 4, embed_dim=64 if args.small else 256, num_heads=4, mlp_ratio=2 if args.small else 4,
        hidden_act="quick_gelu", patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
        hidden_size=args.hidden,
    )  # fmt: skip
    text = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=4, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration(config)
    side = 14 * 2  # px per language-model token along each side
    pixels = dict(
        patch_size=14, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": 4 * side * side, "longest_edge": (64 if args.small else 256) * side * side},
    )  # fmt: skip
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer
    )  # fmt: skip
    tokenizer.padding_side = "left"
    scale = 1 if args.small else 3
    rng = np.random.default_rng(0)
    shapes = ((3 * side * scale, 4 * side * scale + 5), (5 * side * scale - 9, 2 * side * scale))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    video = rng.integers(0, 256, (4, 4 * side, 4 * side, 3), dtype=np.uint8)
    image, clip = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    prompts = [f"user: {image} what is this? assistant: a photo", f"user: {image} or {clip} ? assistant:"]
    batch = dict(processor(text=prompts, images=images, videos=[video], return_tensors="pt", padding=True))
    mllm = from_hf(hf).eval()
    hf.eval()
    with torch.no_grad():
        diff = float((mllm(**batch).logits - hf(**batch).logits).abs().max())
    assert diff <= 1e-4, f"mmcore's logits differ from HF's by {diff}"

    times = _forward_and_step_times(hf, mllm, batch, args.repeats)
    vision_ids = (batch["input_ids"] == config.image_token_id) | (batch["input_ids"] == config.video_token_id)
    rows = []
    for what in ("forward", "step"):
        ref, got = statistics.median(times[f"hf {what}"]), statistics.median(times[f"mmcore {what}"])
        rows.append({"what": f"native: {what} (no grad)" if what == "forward" else f"native: training {what}",
                     "image_tokens": int(vision_ids.sum()), "llm_tokens": int(batch["input_ids"].numel()),
                     "patches": int(batch["pixel_values"].shape[0] + batch["pixel_values_videos"].shape[0]),
                     "image_grid_thw": batch["image_grid_thw"].tolist(), "video_grid_thw": batch["video_grid_thw"].tolist(),
                     "max_abs_logit_diff": diff, "hf_seconds": ref, "mmcore_seconds": got, "ratio": got / ref,
                     "hf_times": times[f"hf {what}"], "mmcore_times": times[f"mmcore {what}"]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="audio,anyres,native")
    parser.add_argument("--clips", default="2,5,10,20", help="clip lengths in seconds (comma separated)")
    parser.add_argument("--tile", type=int, default=112, help="anyres tile size in pixels (patch 14)")
    parser.add_argument("--hidden", type=int, default=512, help="the language model's width")
    parser.add_argument("--layers", type=int, default=4, help="the language model's layers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.small:
        args.hidden, args.layers, args.repeats = 64, 1, min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    parts = {"audio": audio, "anyres": anyres, "native": native}
    rows = [row for name, measure in parts.items() if name in only for row in measure(args)]

    table = Table(title=f"dynamic token counts ({torch.get_num_threads()} threads, median of {args.repeats})")
    for col in ("what", "LLM tokens (of them audio/image)", "seconds", "vs reference"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        if "ratio" in r:
            table.add_row(r["what"], f"{r['llm_tokens']} ({r['image_tokens']})", f"{r['mmcore_seconds']:.3f} (HF {r['hf_seconds']:.3f})", f"{r['ratio']:.3f}x HF")
        else:
            table.add_row(r["what"], f"{r['llm_tokens']} ({r['audio_tokens']})", f"{r['seconds']:.3f}", f"{r['step_vs_full']:.3f}x full, tokens {r['tokens_vs_full']:.3f}x")
    Console().print(table)
    write_json(args.json, rows, args)
    return rows


if __name__ == "__main__":
    main()
