"""The benchmark scripts run, on tiny sizes, and what they report that does not depend on the
machine holds: identical outputs (each script asserts it before timing), host-sync counts, memory
kept for backward. Timings are never asserted (docs/performance.md has them)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()  # the merge benchmark sets its own
    yield
    torch.set_num_threads(threads)


def load(name):
    if str(BENCHMARKS) not in sys.path:  # as when a script runs: its folder (benchmarks/_report.py) importable
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_benchmark_counts_syncs_and_makes_none_in_the_backward(tmp_path):
    out = tmp_path / "merge.json"
    args = ["--batch", "4", "--seq", "64", "--hidden", "16", "--image-tokens", "8", "--audio-tokens", "4",
            "--warmup", "0", "--repeats", "2", "--threads", "1", "--json", str(out)]  # fmt: skip
    assert load("bench_merge").main(args) == 0
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["scenarios"]] == ["vision", "vision+audio"]
    for scenario in report["scenarios"]:
        impls = scenario["implementations"]
        assert set(impls) == {"mmcore (eager)", "mmcore (async)", "mmcore (copy)", "per-sample loop", "HF masked_scatter"}
        for name in ("mmcore (eager)", "mmcore (async)", "mmcore (copy)"):
            assert impls[name]["host_syncs"]["backward"]["total"] == 0, name
        assert impls["mmcore (async)"]["host_syncs"]["forward"]["total"] == 0
        eager = impls["mmcore (eager)"]["host_syncs"]["forward"]
        assert eager["tolist"] == eager["total"] == 1  # the counts, read once for the error message
        # the loop: one nonzero and one tolist per sample per modality present
        samples_x_modalities = 4 * len(scenario["items"])
        assert impls["per-sample loop"]["host_syncs"]["forward"]["total"] == 2 * samples_x_modalities
        assert impls["HF masked_scatter"]["host_syncs"]["backward"]["masked_scatter_backward"] == len(scenario["items"])
    assert all(t["met"] for t in report["targets"] if "host syncs" in t["target"])


def test_model_benchmark_keeps_what_llava_keeps_for_backward(tmp_path):
    out = tmp_path / "model.json"
    args = ["--batch", "1", "--seq", "96", "--new-tokens", "3", "--warmup", "0", "--repeats", "1",
            "--only", "step,memory,generate,encoders", "--json", str(out)]  # fmt: skip
    rows = {row["what"]: row for row in load("bench_model").main(args)}
    assert json.loads(out.read_text())["rows"]
    saved = rows["saved for backward (align)"]
    # mmcore keeps two int64 position vectors for the merge, LLaVA a bool mask: bytes, not MiB, apart
    assert saved["reference"] > 0 and abs(saved["mmcore"] - saved["reference"]) < 16 * 1024
    assert rows["saved by the frozen vision tower"]["mmcore"] == 0
    # timed rows: present and numeric (their values are timings, never asserted)
    for what in ("train step (align)", "train step (finetune)", "greedy decode (3 tokens, batch 1)", "encode vision+audio vs sum alone"):
        assert isinstance(rows[what]["ratio"], float), what


def test_cli_benchmark_imports_nothing_heavy(tmp_path):
    out = tmp_path / "cli.json"
    result = load("bench_cli").main(["--repeats", "2", "--json", str(out)])
    assert result["heavy_imports"] == []
    assert set(result["commands"]) == {"mmcore list-encoders", "mmcore list-encoders --json", 'python -c "import torch"', "python -c pass"}


def test_packing_benchmark_packs_without_padding_and_covers_the_samples(tmp_path):
    out = tmp_path / "packing.json"
    args = ["--samples", "16", "--hidden", "32", "--layers", "1", "--batch", "4", "--pack-to", "256",
            "--repeats", "1", "--warmup", "0", "--json", str(out)]  # fmt: skip
    rows = {row["strategy"]: row for row in load("bench_packing").main(args)}
    assert json.loads(out.read_text())["rows"]
    padded, grouped, packed = rows["(a) random, padded"], rows["(b) length-grouped"], rows["(c) packed"]
    # one packed row per batch: no padding; every sample once, as in the random batches
    assert packed["padding_pct"] == 0.0 and packed["samples"] == padded["samples"] == 16
    assert packed["real_tokens"] == padded["real_tokens"] and padded["padding_pct"] > 0
    assert grouped["samples"] <= 16  # groups smaller than a batch are dropped
    # several packed rows per batch: every sample once, one pass per update (not one per row)
    rows_d = rows["(d) packed, multi-row"]
    assert rows_d["samples"] == 16 and rows_d["real_tokens"] == padded["real_tokens"]
    assert rows_d["batches"] == rows_d["updates"] < packed["batches"]
    # the model FLOPs count the real tokens and items only: the same work however it is batched
    assert padded["model_flops"] == packed["model_flops"] == rows_d["model_flops"] > 0
    assert "mfu" not in padded  # a GPU's figure
    for row in rows.values():  # timed: present and numeric, never asserted
        assert isinstance(row["samples_per_s_vs_a"], float)


def test_convert_benchmark_reports_peaks_against_the_llava_load(tmp_path):
    out = tmp_path / "convert.json"
    rows = {row["what"]: row for row in load("bench_convert").main(["--small", "--json", str(out)])}
    assert json.loads(out.read_text())
    load_row, convert, saved = rows["llava load"], rows["mmcore convert"], rows["mmcore convert + save"]
    # the conversion holds LLaVA's own modules: same parameter count, no second copy of the weights
    assert load_row["params"] == convert["params"] == saved["params"]
    assert convert["peak_mib"] - load_row["peak_mib"] < 0.5 * load_row["weights_mib"]
    meta = rows["LLaVA-1.5-7B shapes, meta device"]
    assert meta["params"] > 7e9 and meta["peak_growth_mib"] < 256  # configs only, no weights


def test_dynamic_benchmark_trims_audio_and_matches_llava_next_and_qwen2_vl(tmp_path):
    out = tmp_path / "dynamic.json"
    rows = {row["what"]: row for row in load("bench_dynamic").main(["--small", "--repeats", "1", "--json", str(out)])}
    assert json.loads(out.read_text())["rows"]
    trimmed, full = rows["audio: trimmed (trim_padding)"], rows["audio: full window"]
    assert full["audio_tokens"] == 4 * 10  # four clips, each the tiny preset's whole 10-position window
    assert trimmed["audio_tokens"] < full["audio_tokens"] and trimmed["llm_tokens"] < full["llm_tokens"]
    for what in ("anyres: forward (no grad)", "anyres: training step"):  # outputs checked equal before timing
        assert rows[what]["image_tokens"] > 0 and isinstance(rows[what]["ratio"], float)
    for what in ("native: forward (no grad)", "native: training step"):  # Qwen2-VL, logits checked equal first
        row = rows[what]
        assert row["image_grid_thw"] == [[1, 6, 8], [1, 10, 4]] and row["video_grid_thw"] == [[2, 8, 8]]
        assert row["image_tokens"] == (48 + 40 + 128) // 4 and row["max_abs_logit_diff"] <= 1e-4
        assert isinstance(row["ratio"], float)


def test_data_benchmark_runs_the_real_data_path(tmp_path):
    out = tmp_path / "data.json"
    rows = load("bench_data").main(["--small", "--json", str(out)])
    assert json.loads(out.read_text())["rows"]
    kinds = [(r["what"], r["workers"]) for r in rows]
    assert kinds == [("step alone (batches collated beforehand)", None), ("data alone", 0), ("data alone", 1),
                     ("end to end", 0), ("end to end", 1)]  # fmt: skip
    for row in rows:  # timed: present and numeric, never asserted
        assert row["samples_per_s"] > 0 and isinstance(row["vs_step_alone"], float)
