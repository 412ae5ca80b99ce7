"""The main job: teach a tiny multimodal model to caption shapes and sounds, offline, in minutes.

Run with ``make demo`` (or ``python -m mmcore.demo``). It

1. makes a synthetic data set on the fly: pictures of coloured shapes drawn with PIL ("a red
   circle", 9 kinds) and short clips of tones and chords synthesised with torch ("a middle
   tone", 4 kinds), written as PNG/WAV files plus a LLaVA-style ``train.jsonl`` -- the format ``mmcore
   train`` reads;
2. assembles a tiny CLIP + Whisper + Llama model from presets (random weights);
3. trains it with the same loop as ``mmcore train``: stage ``align`` (projectors only), then
   ``finetune`` (projectors + LLM) or, with ``--lora``, ``lora``;
4. saves it, reloads it from disk, and captions held-out pictures and clips with ``generate``;
5. prints held-out exact-match accuracy per modality and a few generations, and exits with status 1
   if any modality is below the target (90 %).

``--quick`` runs a shortened version (the test suite uses it); ``--output DIR`` keeps the model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215)}
SOUNDS = ("low tone", "middle tone", "high tone", "chord")
SAMPLING_RATE = 16000
IMAGE_PROMPT = "<image>\nWhat is in the picture?"
AUDIO_PROMPT = "<audio>\nWhat do you hear?"


@dataclass
class Settings:
    """Sizes and schedule of one demo run."""

    llm_width: int = 128
    train_per_class: int = 80
    eval_per_class: int = 12
    batch_size: int = 16
    align_steps: int = 50
    tune_steps: int = 1800
    align_lr: float = 1e-3
    tune_lr: float = 1e-3
    tune_projector_lr: float | None = None
    lora: bool = False
    seed: int = 0
    target: float = 0.9

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        """A shortened run for tests: fewer samples and steps; learns well above chance, not to 90 %."""
        return cls(
            **{"train_per_class": 16, "eval_per_class": 4, "align_steps": 20, "tune_steps": 300, **overrides}
        )


# -- synthetic data -------------------------------------------------------------------------------------
def draw_shape(shape: str, color: str, rng: random.Random, size: int = 56) -> Any:
    """A ``size`` px RGB picture of one shape, jittered in place, size, colour and background."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(200, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLORS[color])
    radius = size * rng.uniform(0.3, 0.42)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    return image


def synth_sound(kind: str, rng: random.Random, seconds: float = 0.2) -> Any:
    """A mono ``seconds`` clip at 16 kHz: one sine (a low, middle or high tone) or a chord spread
    over four octaves, pitch, phase and loudness jittered, with a little noise."""
    import torch

    if kind == "chord":
        root = rng.uniform(200, 300)
        freqs = [root, root * 2.5, root * 5, root * 10]
    else:
        low, high = {"low tone": (150, 250), "middle tone": (700, 1000), "high tone": (2500, 3500)}[kind]
        freqs = [rng.uniform(low, high)]
    t = torch.arange(int(SAMPLING_RATE * seconds), dtype=torch.float64) / SAMPLING_RATE
    wave = sum(torch.sin(2 * math.pi * f * t + rng.uniform(0, 2 * math.pi)) for f in freqs) / len(freqs)
    noise = torch.randn(
        t.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)), dtype=torch.float64
    )
    return (wave * rng.uniform(0.4, 0.8) + 0.001 * noise).float()


def make_dataset(root: Path, per_class: int, seed: int, name: str) -> Path:
    """Write ``per_class`` pictures per (colour, shape), and as many clips in all, under ``root``,
    and ``root/<name>.jsonl`` describing them LLaVA-style. Returns the JSONL path."""
    from mmcore.training.data import save_wav

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    records = []
    pictures = [(color, shape) for color in COLORS for shape in SHAPES]
    # As many clips as pictures in all, so neither modality starves the other of steps.
    per_sound = round(per_class * len(pictures) / len(SOUNDS))
    for k in range(max(per_class, per_sound)):
        for color, shape in pictures if k < per_class else ():
            path = f"images/{name}-{color}-{shape}-{k}.png"
            draw_shape(shape, color, rng).save(root / path)
            records.append(_record(len(records), "image", path, IMAGE_PROMPT, f"a {color} {shape}"))
        for sound in SOUNDS if k < per_sound else ():
            path = f"audio/{name}-{sound.replace(' ', '-')}-{k}.wav"
            save_wav(root / path, synth_sound(sound, rng), SAMPLING_RATE)
            records.append(_record(len(records), "audio", path, AUDIO_PROMPT, f"a {sound}"))
    jsonl = root / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return jsonl


def _record(index: int, key: str, path: str, prompt: str, caption: str) -> dict[str, Any]:
    return {
        "id": f"{index:05d}",
        key: path,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}],
    }


def build_model(llm_width: int) -> tuple[Any, Any]:
    """Tiny CLIP and Whisper towers (the plugins' ``tiny`` presets) + a random 2-layer Llama
    (`mmcore.testing.tiny_llm`), its offline tokenizer with ``<vision>``/``<audio>`` added, and the
    `MultimodalProcessor`."""
    from mmcore import MultimodalModel, add_modality_tokens, build_encoder
    from mmcore.processing import MultimodalProcessor
    from mmcore.testing import tiny_llm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    encoders = {
        "vision": build_encoder("clip", preset="tiny"),
        "audio": build_encoder("whisper", preset="tiny"),
    }
    llm = tiny_llm(vocab_size=len(tokenizer), hidden_size=llm_width)
    model = MultimodalModel(encoders, llm, init_projector_type="mlp2x_gelu")
    add_modality_tokens(tokenizer, model)
    return model, MultimodalProcessor.from_model(model, tokenizer)


# -- evaluation ---------------------------------------------------------------------------------------------
def caption(model: Any, processor: Any, samples: Sequence[dict[str, Any]], batch_size: int = 32) -> list[str]:
    """Greedy captions (first line of the answer) for samples of one modality."""
    import torch

    tokenizer = processor.tokenizer
    newline = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))
    stop = [tokenizer.eos_token_id, *newline[-1:]]
    out: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        modality = next(m for m in processor.modalities if m in chunk[0])
        prompts = [[m for m in s["messages"] if m["role"] != "assistant"] for s in chunk]
        batch = processor(
            messages=prompts,
            add_generation_prompt=True,
            padding_side="left",
            **{modality: [s[modality] for s in chunk]},
        )
        with torch.no_grad():
            generated = model.generate(
                **batch,
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
        width = batch["input_ids"].shape[1]
        for row in generated:
            text = tokenizer.decode(row[width:], skip_special_tokens=True)
            out.append(text.strip().split("\n")[0].strip())
    return out


def evaluate(model: Any, processor: Any, dataset: Any) -> dict[str, list[tuple[str, str]]]:
    """Modality -> ``(reference, generated)`` per held-out sample."""
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        modality = next(m for m in processor.modalities if m in sample)
        by_modality.setdefault(modality, []).append(sample)
    results = {}
    for modality, samples in sorted(by_modality.items()):
        references = [next(m["content"] for m in s["messages"] if m["role"] == "assistant") for s in samples]
        results[modality] = list(zip(references, caption(model, processor, samples)))
    return results


# -- the run ----------------------------------------------------------------------------------------------
def run(settings: Settings, workdir: Path, console: Any) -> dict[str, float]:
    """Build data, train, save, reload, evaluate; print the tables. Returns accuracy per modality."""
    import torch
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.processing import MultimodalProcessor
    from mmcore.training import ConversationDataset, MultimodalCollator, TrainConfig, train

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    data = workdir / "data"
    train_file = make_dataset(data, settings.train_per_class, settings.seed, "train")
    eval_file = make_dataset(data, settings.eval_per_class, settings.seed + 1, "heldout")
    train_set, eval_set = ConversationDataset(train_file), ConversationDataset(eval_file)
    console.print(
        f"[bold]data[/] {len(train_set)} training and {len(eval_set)} held-out samples "
        f"({len(COLORS) * len(SHAPES)} picture captions, {len(SOUNDS)} sound captions) in {time.perf_counter() - t0:.1f}s"
    )

    model, processor = build_model(settings.llm_width)
    console.print(
        f"[bold]model[/] CLIP (preset tiny) + Whisper (preset tiny) + a 2-layer Llama of width {settings.llm_width}, "
        "random weights, and the offline tiny tokenizer"
    )
    collator = MultimodalCollator(processor)
    common = dict(
        batch_size=settings.batch_size, warmup_ratio=0.05, log_every=50, seed=settings.seed, device="cpu"
    )
    tune_stage = "lora" if settings.lora else "finetune"
    stages = [
        ("align", settings.align_steps, settings.align_lr, None),
        (tune_stage, settings.tune_steps, settings.tune_lr, settings.tune_projector_lr),
    ]
    for stage, steps, lr, projector_lr in stages:
        console.rule(f"stage {stage}")
        config = TrainConfig(
            output_dir=str(workdir / stage), stage=stage, max_steps=steps, lr=lr, projector_lr=projector_lr,
            lora_r=8, save_final=stage == tune_stage, **common,
        )  # fmt: skip
        result = train(model, train_set, collator, config, processor=processor, console=console)
    saved = result.model_dir
    console.print(f"[bold]saved[/] {saved}: {', '.join(sorted(p.name for p in saved.iterdir()))}")

    loaded = MultimodalModel.from_pretrained(saved).eval()
    loaded_processor = MultimodalProcessor.from_pretrained(saved, loaded)
    console.print(f"[bold]reloaded[/] {type(loaded).__name__} from {saved}")
    results = evaluate(loaded, loaded_processor, eval_set)

    classes = {"vision": len(COLORS) * len(SHAPES), "audio": len(SOUNDS)}
    table = Table(title="held-out exact-match captions")
    for column in ("modality", "samples", "accuracy", "chance"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    accuracy = {}
    for modality, pairs in results.items():
        accuracy[modality] = sum(ref == got for ref, got in pairs) / len(pairs)
        ok = "green" if accuracy[modality] >= settings.target else "red"
        table.add_row(
            modality,
            str(len(pairs)),
            f"[{ok}]{100 * accuracy[modality]:.1f} %[/]",
            f"{100 / classes[modality]:.1f} %",
        )
    console.print(table)
    examples = Table(title="examples")
    for column in ("modality", "reference", "generated"):
        examples.add_column(column)
    for modality, pairs in results.items():
        seen: dict[str, str] = {}
        for ref, got in pairs:  # the first sample of each caption, then up to three misses
            seen.setdefault(ref, got)
        shown = list(seen.items())[:4] + [(r, g) for r, g in pairs if r != g][:3]
        for ref, got in shown:
            examples.add_row(modality, ref, got if got == ref else f"[red]{got}[/]")
    console.print(examples)
    console.print(f"[bold]total time[/] {time.perf_counter() - t0:.0f}s")
    return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmcore.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a shortened run (tests): learns, but not to 90 %%"
    )
    parser.add_argument("--lora", action="store_true", help="second stage LoRA instead of full finetuning")
    parser.add_argument("--output", type=Path, help="keep the data and trained model in this directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    settings = (Settings.quick if args.quick else Settings)(lora=args.lora, seed=args.seed)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        accuracy = run(settings, args.output, console)
    else:
        with tempfile.TemporaryDirectory(prefix="mmcore-demo-") as tmp:
            accuracy = run(settings, Path(tmp), console)
    worst = min(accuracy.values())
    if args.quick:
        console.print(
            f"[bold]quick run[/]: lowest accuracy {100 * worst:.1f} % (the full demo aims at {100 * settings.target:.0f} %)"
        )
        return 0
    if worst < settings.target:
        console.print(
            f"[red]demo FAILED[/]: a modality is below {100 * settings.target:.0f} % held-out accuracy"
        )
        return 1
    console.print(
        f"[green]demo OK[/]: every modality at or above {100 * settings.target:.0f} % held-out accuracy"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
