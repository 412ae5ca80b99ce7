"""Benchmark mmcore's placeholder merge against the two ways other code bases merge, in one process.

Implementations, all given the same ``input_ids``, text embeddings and flattened features:

- ``mmcore (eager)`` / ``mmcore (async)``: `mmcore.modeling.merge.merge_modality_features`, with
  ``check="eager"`` (counts read on the host) and ``check="async"`` (device-side assert), writing the
  feature rows in place into the embeddings as `MultimodalModel` does (``inplace=True``).
- ``mmcore (copy)``: the same with ``check="eager"`` into a new tensor (``inplace=False``, the default
  for callers that do not own the embeddings).
- ``per-sample loop``: the LLaVA ``prepare_inputs_labels_for_multimodal`` / OmniLMM way: for each
  sample, ``torch.where`` finds the placeholder positions, ``.tolist()`` brings them to Python, and the
  sample is rebuilt by ``torch.cat`` of text slices and feature slices; the samples are stacked.
- ``HF masked_scatter``: transformers' LLaVA way: ``LlavaModel.get_placeholder_mask`` (the real
  function from the installed transformers) then ``inputs_embeds.masked_scatter(mask, features)``,
  once per modality, as multi-modality HF models do.

Each implementation gets a fresh copy of the embeddings, made outside the timed region, as a model's
merge gets the embedding lookup's output. Before timing, all outputs and all gradients are checked to
be bit-identical. Times are medians of
``--repeats`` runs after ``--warmup`` runs. Host syncs are counted per implementation, separately for
the forward and the backward, by recording the ops each pass dispatches.

    python benchmarks/bench_merge.py                   # CPU, hidden 1024
    python benchmarks/bench_merge.py --device cuda --hidden 4096 --dtype bfloat16
    python benchmarks/bench_merge.py --json results.json

Numbers are ratios against references measured in the same process; nothing here is a timed assert.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import mmcore
from mmcore.modeling.merge import merge_modality_features, placeholder_masks
from mmcore.testing import HOST_SYNC_OPS, count_host_syncs

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # bench_model's spellings
IMAGE_ID, AUDIO_ID = 32000, 32001  # placeholder ids, outside the random text ids below
TOKEN_IDS = {"vision": IMAGE_ID, "audio": AUDIO_ID}

# What mmcore.testing.count_host_syncs counts: the sync ops as dispatched, and Tensor.tolist.
SYNC_COLUMNS = (*HOST_SYNC_OPS, "tolist")


# --------------------------------------------------------------------------------------------------
# The implementations


def mmcore_merge(check: str, inplace: bool) -> Callable:
    def merge(embeds, input_ids, features):
        masks = placeholder_masks(input_ids, {m: TOKEN_IDS[m] for m in features})
        return merge_modality_features(embeds, masks, features, check=check, inplace=inplace)

    return merge


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> ``[(start, end), ...]`` of their contiguous runs."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def loop_merge(embeds, input_ids, features):
    """LLaVA's ``prepare_inputs_labels_for_multimodal`` / OmniLMM's merge, on expanded placeholders.

    Per sample: ``torch.where`` + ``.tolist()`` for the placeholder positions, then ``torch.cat`` of
    the text slices between them and the next feature rows; finally ``torch.stack`` (every sample
    has the same length here, so LLaVA's pad-to-longest is a plain stack).
    """
    cursor = dict.fromkeys(features, 0)
    new_embeds = []
    for cur_ids, cur_embeds in zip(input_ids, embeds):
        runs = []
        for modality in features:
            positions = torch.where(cur_ids == TOKEN_IDS[modality])[0].tolist()
            runs += [(start, end, modality) for start, end in _runs(positions)]
        runs.sort()
        pieces, prev = [], 0
        for start, end, modality in runs:
            pieces.append(cur_embeds[prev:start])
            pieces.append(features[modality][cursor[modality] : cursor[modality] + end - start])
            cursor[modality] += end - start
            prev = end
        pieces.append(cur_embeds[prev:])
        new_embeds.append(torch.cat(pieces, dim=0))
    return torch.stack(new_embeds, dim=0)


def hf_masked_scatter_merge(embeds, input_ids, features):
    """transformers' LLaVA: ``get_placeholder_mask`` (which checks counts) + ``masked_scatter``."""
    from transformers.models.llava.modeling_llava import LlavaModel

    for modality, feats in features.items():
        # get_placeholder_mask only reads self.config.image_token_id when input_ids are given
        model = types.SimpleNamespace(config=types.SimpleNamespace(image_token_id=TOKEN_IDS[modality]))
        mask = LlavaModel.get_placeholder_mask(model, input_ids, inputs_embeds=embeds, image_features=feats)
        embeds = embeds.masked_scatter(mask, feats)
    return embeds


IMPLEMENTATIONS: dict[str, Callable] = {
    "mmcore (eager)": mmcore_merge("eager", inplace=True),
    "mmcore (async)": mmcore_merge("async", inplace=True),
    "mmcore (copy)": mmcore_merge("eager", inplace=False),
    "per-sample loop": loop_merge,
    "HF masked_scatter": hf_masked_scatter_merge,
}
REFERENCE = "per-sample loop"
OURS = ("mmcore (eager)", "mmcore (async)")


# --------------------------------------------------------------------------------------------------
# Inputs


def make_layout(args, with_audio: bool) -> tuple[torch.Tensor, dict[str, int]]:
    """Random text ids with one image run per sample at a random offset, and, if ``with_audio``,
    ``--audio-clips`` audio runs in every other sample, none overlapping. Seeded."""
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, IMAGE_ID, (args.batch, args.seq), generator=generator)
    n_items = Counter()
    for b in range(args.batch):
        spans = [("vision", args.image_tokens)]
        if with_audio and b % 2 == 0:
            spans += [("audio", args.audio_tokens)] * args.audio_clips
        taken = torch.zeros(args.seq, dtype=torch.bool)
        for modality, length in spans:
            for _ in range(10_000):
                start = rng.randrange(0, args.seq - length + 1)
                if not taken[max(start - 1, 0) : start + length + 1].any():  # keep runs apart
                    break
            else:
                raise SystemExit(f"cannot place {modality} span of {length} in a sequence of {args.seq}")
            taken[start : start + length] = True
            ids[b, start : start + length] = TOKEN_IDS[modality]
            n_items[modality] += 1
    return ids, dict(n_items)


def make_inputs(args, input_ids, device, dtype):
    g = torch.Generator().manual_seed(args.seed + 1)
    embeds = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device, dtype)
    features = {
        m: torch.randn(int((input_ids == tid).sum()), args.hidden, generator=g).to(device, dtype)
        for m, tid in TOKEN_IDS.items()
        if (input_ids == tid).any()
    }
    grad_out = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device, dtype)
    return input_ids.to(device), embeds, features, grad_out


# --------------------------------------------------------------------------------------------------
# Correctness, syncs, timing


def forward_backward(fn, embeds, input_ids, features, grad_out):
    embeds = embeds.detach().requires_grad_()
    features = {m: f.detach().requires_grad_() for m, f in features.items()}
    out = fn(embeds.clone(), input_ids, features)  # a fresh non-leaf, as an embedding lookup is
    out.backward(grad_out)
    return out.detach(), embeds.grad, {m: f.grad for m, f in features.items()}


def check_identical(input_ids, embeds, features, grad_out) -> None:
    ref_out, ref_embeds_grad, ref_feature_grads = forward_backward(
        IMPLEMENTATIONS[REFERENCE], embeds, input_ids, features, grad_out
    )
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for m in features:
        mask |= input_ids == TOKEN_IDS[m]
    assert torch.equal(ref_out[~mask], embeds[~mask]), "reference changed text positions"
    for name, fn in IMPLEMENTATIONS.items():
        out, embeds_grad, feature_grads = forward_backward(fn, embeds, input_ids, features, grad_out)
        assert torch.equal(out, ref_out), f"{name}: output differs from {REFERENCE}"
        assert torch.equal(embeds_grad, ref_embeds_grad), f"{name}: embeddings' gradient differs"
        for m in features:
            assert torch.equal(feature_grads[m], ref_feature_grads[m]), f"{name}: {m} features' grad differs"


def _sync_counts(syncs) -> dict[str, int]:
    counts = {name: syncs[name] for name in SYNC_COLUMNS}
    counts["total"] = sum(syncs.values())
    return counts


class CudaSyncWarnings:
    """On CUDA, also count the syncs CUDA itself reports (``torch.cuda.set_sync_debug_mode``)."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.count = 0

    def __enter__(self):
        if self.enabled:
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._caught)
            self._catch.__exit__(*exc)


def count_syncs(fn, embeds, input_ids, features, grad_out) -> dict[str, dict[str, int]]:
    embeds = embeds.detach().requires_grad_()
    features = {m: f.detach().requires_grad_() for m, f in features.items()}
    lookup = embeds.clone()
    with CudaSyncWarnings(embeds.device) as fcuda, count_host_syncs() as forward:
        out = fn(lookup, input_ids, features)
    with CudaSyncWarnings(embeds.device) as bcuda, count_host_syncs() as backward:
        out.backward(grad_out)
    result = {"forward": _sync_counts(forward), "backward": _sync_counts(backward)}
    if embeds.device.type == "cuda":  # not part of "total": a cross-check of it
        result["forward"]["cuda_sync_debug_warnings"] = fcuda.count
        result["backward"]["cuda_sync_debug_warnings"] = bcuda.count
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(step: Callable, setup: Callable, device, warmup: int, repeats: int) -> dict[str, float]:
    """Median etc. of ``step(setup())``; ``setup`` runs outside the timed region."""
    for _ in range(warmup):
        step(setup())
    _synchronize(device)
    times = []
    for _ in range(repeats):
        state = setup()
        _synchronize(device)
        start = time.perf_counter()
        step(state)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_ms": 1e3 * statistics.median(times),
        "iqr_ms": 1e3 * (q[2] - q[0]),
        "min_ms": 1e3 * min(times),
        "times_ms": [round(1e3 * t, 2) for t in times],
    }


def measure(fn, embeds, input_ids, features, grad_out, device, warmup, repeats) -> dict[str, dict]:
    """Every implementation gets a fresh copy of the embeddings, made untimed: in a model the merge
    takes the embedding lookup's output, a new tensor of its own (which mmcore writes into)."""

    def lookup():
        with torch.no_grad():
            return embeds.clone()

    def forward(fresh):
        with torch.no_grad():
            fn(fresh, input_ids, features)

    leaf_embeds = embeds.detach().requires_grad_()
    leaf_features = {m: f.detach().requires_grad_() for m, f in features.items()}

    def tracked_lookup():
        leaf_embeds.grad = None
        for f in leaf_features.values():
            f.grad = None
        return leaf_embeds.clone()

    def forward_backward_step(fresh):
        fn(fresh, input_ids, leaf_features).backward(grad_out)

    return {
        "forward": time_it(forward, lookup, device, warmup, repeats),
        "forward_backward": time_it(forward_backward_step, tracked_lookup, device, warmup, repeats),
    }


# --------------------------------------------------------------------------------------------------
# Driver


def run_scenario(args, name: str, with_audio: bool, device, dtype) -> dict:
    ids, n_items = make_layout(args, with_audio)
    input_ids, embeds, features, grad_out = make_inputs(args, ids, device, dtype)
    check_identical(input_ids, embeds, features, grad_out)
    result = {
        "name": name,
        "items": n_items,
        "feature_rows": {m: f.shape[0] for m, f in features.items()},
        "implementations": {},
    }
    for impl, fn in IMPLEMENTATIONS.items():
        timings = measure(fn, embeds, input_ids, features, grad_out, device, args.warmup, args.repeats)
        syncs = count_syncs(fn, embeds, input_ids, features, grad_out)
        result["implementations"][impl] = {**timings, "host_syncs": syncs}
    ref = result["implementations"][REFERENCE]
    hf = result["implementations"]["HF masked_scatter"]
    passes = ("forward", "forward_backward")
    for r in result["implementations"].values():
        r["speedup_vs_loop"] = {p: ref[p]["median_ms"] / r[p]["median_ms"] for p in passes}
        r["speedup_vs_hf"] = {p: hf[p]["median_ms"] / r[p]["median_ms"] for p in passes}
    return result


def targets(results: list[dict], min_speedup: float) -> list[dict]:
    out = []
    for scenario in results:
        for impl in OURS:
            r = scenario["implementations"][impl]
            for p in ("forward", "forward_backward"):
                s = r["speedup_vs_loop"][p]
                out.append(
                    {
                        "target": f"{impl} >= {min_speedup:g}x per-sample loop, {p}",
                        "scenario": scenario["name"],
                        "value": f"{s:.2f}x",
                        "met": s >= min_speedup,
                    }
                )
            bwd = r["host_syncs"]["backward"]["total"]
            out.append(
                {
                    "target": f"{impl}: no host syncs in backward",
                    "scenario": scenario["name"],
                    "value": str(bwd),
                    "met": bwd == 0,
                }
            )
    return out


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _source_state() -> dict:
    """Which merge was measured: the git commit, whether mmcore/ had uncommitted changes, and a hash
    of merge.py as it was imported."""
    merge_py = sys.modules[merge_modality_features.__module__].__file__
    with open(merge_py, "rb") as f:
        state = {"merge_py_sha256": hashlib.sha256(f.read()).hexdigest()[:12]}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = ["git", "-C", root]
        state["git_commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "mmcore"], capture_output=True, text=True)
        state["mmcore_uncommitted_changes"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return state


def environment(args, device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mmcore": getattr(mmcore, "__version__", "?"),
        "device": str(device),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_end": _loadavg(),  # other work on the machine skews CPU timings; check this
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        **_source_state(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def render(console: Console, report: dict) -> None:
    env, cfg = report["environment"], report["config"]
    console.print(
        f"[bold]merge benchmark[/] {env['date']}  torch {env['torch']}  device {env['device']}  "
        f"cpu {env['cpu']!r}  nproc {env['nproc']}  threads {env['torch_threads']}  "
        f"load average after {env['loadavg_end']}"
    )
    console.print(
        f"merge.py sha256 {env['merge_py_sha256']}  git {env.get('git_commit', '?')}  "
        f"mmcore/ uncommitted changes: {env.get('mmcore_uncommitted_changes', '?')}"
    )
    console.print(
        f"batch {cfg['batch']}  seq {cfg['seq']}  hidden {cfg['hidden']}  dtype {cfg['dtype']}  "
        f"warmup {cfg['warmup']}  repeats {cfg['repeats']} (median, ms)"
    )
    for scenario in report["scenarios"]:
        table = Table(title=f"{scenario['name']}: items {scenario['items']}, rows {scenario['feature_rows']}")
        for col in ("implementation", "fwd ms", "fwd IQR", "fwd+bwd ms", "fwd+bwd IQR",
                    "loop/impl fwd", "loop/impl f+b", "HF/impl fwd", "HF/impl f+b",
                    "syncs fwd", "syncs bwd"):  # fmt: skip
            table.add_column(col, justify="left" if col == "implementation" else "right", no_wrap=True)
        for impl, r in scenario["implementations"].items():
            f, fb = r["forward"], r["forward_backward"]
            table.add_row(
                impl,
                f"{f['median_ms']:.1f}",
                f"{f['iqr_ms']:.1f}",
                f"{fb['median_ms']:.1f}",
                f"{fb['iqr_ms']:.1f}",
                f"{r['speedup_vs_loop']['forward']:.2f}x",
                f"{r['speedup_vs_loop']['forward_backward']:.2f}x",
                f"{r['speedup_vs_hf']['forward']:.2f}x",
                f"{r['speedup_vs_hf']['forward_backward']:.2f}x",
                str(r["host_syncs"]["forward"]["total"]),
                str(r["host_syncs"]["backward"]["total"]),
            )
        console.print(table)
        syncs = Table(title=f"{scenario['name']}: host syncs by op (forward / backward)")
        syncs.add_column("implementation", no_wrap=True)
        for col in SYNC_COLUMNS:
            syncs.add_column(col, justify="right")
        for impl, r in scenario["implementations"].items():
            s = r["host_syncs"]
            syncs.add_row(impl, *(f"{s['forward'][c]} / {s['backward'][c]}" for c in SYNC_COLUMNS))
        console.print(syncs)
    table = Table(title="targets")
    for col in ("target", "scenario", "value", "met"):
        table.add_column(col)
    for t in report["targets"]:
        table.add_row(t["target"], t["scenario"], t["value"], "[green]yes[/]" if t["met"] else "[red]no[/]")
    console.print(table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024, help="4096 is the issue's full size, meant for a GPU")
    p.add_argument("--image-tokens", type=int, default=576, help="tokens of the one image per sample")
    p.add_argument("--audio-clips", type=int, default=2, help="audio clips in every other sample (run 2)")
    p.add_argument("--audio-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPE_NAMES) + tuple(DTYPE_NAMES.values()))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.add_argument("--threads", type=int, default=cores, help="torch threads (default: the usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-speedup", type=float, default=4.0, help="target: mmcore vs the per-sample loop")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPE_NAMES.get(args.dtype, args.dtype))
    stream = sys.stderr if args.json == "-" else sys.stdout
    # wide enough for the tables when piped to a file (rich falls back to 80 columns there)
    console = Console(file=stream, width=None if stream.isatty() else 170)
    started = time.perf_counter()
    console.print(f"load average before: {_loadavg()} (run on an otherwise idle machine)")
    scenarios = []
    for name, with_audio in (("vision", False), ("vision+audio", True)):
        console.print(f"running {name} ...")
        scenarios.append(run_scenario(args, name, with_audio, device, dtype))
    report = {
        "environment": environment(args, device),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "scenarios": scenarios,
    }
    report["targets"] = targets(scenarios, args.min_speedup)
    report["wall_s"] = time.perf_counter() - started
    render(console, report)
    console.print(f"total {report['wall_s']:.0f} s")
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
