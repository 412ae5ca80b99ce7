"""``mmcore test-run``: run a model directory (or an assembly file, assembled in memory) for real on dummy inputs.

What one run does, in order:

1. loads the model (``MultimodalModel.from_pretrained``) and tokenizer, and the processor when saved;
2. asks each encoder's plugin for dummy inputs (``factory.dummy_inputs``), runs the encoders once
   to learn how many tokens each item becomes (and checks the plugin's ``num_tokens`` agrees), and
   builds a batch of text with that many placeholders per item, with labels;
3. one warm-up training step, then a forward pass with per-part timing hooks (shapes, time per part);
4. ``--steps`` timed training steps: forward, backward for the trainable parts (``--train``) and an
   AdamW step unless ``--no-optimizer``; losses and gradients checked for finiteness;
5. generation: ``--generate N`` tokens, greedy, after a warm-up, timed token by token through a
   streamer: prefill tokens/s = batch x prompt length / time to the first new token (encoders
   included); decode tokens/s = batch x (N - 1) / time from the first to the last new token.

Times come from ``time.perf_counter`` with ``torch.cuda.synchronize`` on CUDA. Peak memory is the
CUDA allocator's peak on a GPU (reset before each phase), the process's peak RSS on CPU.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import typer

from mmcore.cli.output import human_bytes, library_progress_bars, print_json, print_table
from mmcore.errors import ConfigError
from mmcore.training.stages import STAGES

DTYPES = ("auto", "fp32", "bf16", "fp16")
#: the stages test-run trains: those that add no LoRA adapters (`mmcore train` trains those)
TRAIN_STAGES = tuple(name for name, stage in STAGES.items() if not stage.lora)
_PROMPT = "user: describe the input. assistant:"
_ANSWER = " it is a short test ."


def test_run(
    target: Path = typer.Argument(
        ..., metavar="MODEL_DIR|ASSEMBLY", help="A model directory (mmcore assemble -o) or a TOML assembly file."
    ),
    device: Optional[str] = typer.Option(
        None, "--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="fp32, bf16, fp16 (auto: bf16 on CUDA, fp32 on CPU)."),
    batch_size: int = typer.Option(
        2, "--batch-size", "-b", min=1, help="Samples per batch (each with one item per modality)."
    ),
    steps: int = typer.Option(3, "--steps", min=1, help="Timed training steps after one warm-up step."),
    generate: int = typer.Option(8, "--generate", min=0, help="New tokens to generate (0: skip generation)."),
    train: str = typer.Option(
        "align",
        "--train",
        help="What trains: " + ", ".join(f"{n} ({STAGES[n].trains})" for n in TRAIN_STAGES) + ".",
    ),
    optimizer: bool = typer.Option(
        True, "--optimizer/--no-optimizer", help="Include an AdamW step in each training step."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed for the dummy inputs."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Let MODEL_DIR import the code its files name (see docs/security.md)."
    ),
) -> None:
    """Run a combination for real on dummy inputs: shapes, speed, memory, finite losses and gradients.

    Exit status 0 when every loss and gradient is finite and every plugin's token count matches its
    encoder's output; 1 otherwise (the report says what failed); 2 on bad input.

    Examples:

      mmcore test-run out/tiny

      mmcore test-run out/siglip-qwen --device cuda --dtype bf16 --batch-size 8 --steps 5 --generate 32

      mmcore test-run model.toml --train finetune --json
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if train not in TRAIN_STAGES:
        raise ConfigError(f"--train {train!r}: expected one of {', '.join(TRAIN_STAGES)}")
    check_target(target, "MODEL_DIR|ASSEMBLY")
    torch_device = _resolve_device(device)
    with library_progress_bars():
        report = run(
            target, device=torch_device, dtype=dtype, batch_size=batch_size, steps=steps, generate=generate,
            train=train, optimizer=optimizer, seed=seed, trust_remote_code=trust_remote_code,
        )  # fmt: skip
    if as_json:
        print_json(report)
    else:
        _print_report(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _resolve_device(device: str | None) -> Any:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: no CUDA device is available (torch.cuda.is_available() is False); "
                "use --device cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def _torch_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# -- loading ---------------------------------------------------------------------------------------


def check_target(target: Path, label: str) -> None:
    """`ConfigError` unless ``target`` is a directory or a ``.toml`` assembly file (``label``: the
    argument's name in the message)."""
    if not target.exists():
        raise ConfigError(f"{label} {str(target)!r}: no such directory or file")
    if not target.is_dir() and target.suffix != ".toml":
        raise ConfigError(f"{label} {str(target)!r}: expected a model directory or a .toml assembly file")


def load_target(target: Path, dtype: Any, trust_remote_code: bool = False) -> tuple[Any, Any, Any, str]:
    """``(model, tokenizer, processor or None, kind)`` from a model directory or a TOML assembly file.

    ``trust_remote_code`` is passed to every loader as given: without it a directory whose config,
    tokenizer or processor names code to import is refused with a typed error, never asked about."""
    if target.is_dir():
        return (*_load_dir(target, dtype, trust_remote_code), "model_dir")
    from mmcore.cli.assemble import spec_from_cli
    from mmcore.cli.build import build_from_spec

    built = build_from_spec(spec_from_cli(target))
    built.model.to(dtype)
    return built.model, built.tokenizer, built.processor, "spec"


def _load_dir(target: Path, dtype: Any, trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.trust import refusing_remote_code

    where = f"MODEL_DIR {str(target)!r}"
    if not (target / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json; expected a directory written by `mmcore assemble`")
    try:
        with refusing_remote_code(where):
            model = MultimodalModel.from_pretrained(target, dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(str(target), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: cannot load: {first}") from exc
    processor = None
    if (target / "processor_config.json").is_file():
        from mmcore.processing import MultimodalProcessor

        processor = MultimodalProcessor.from_pretrained(target, model, trust_remote_code=trust_remote_code)
    return model, tokenizer, processor


# -- the run ---------------------------------------------------------------------------------------


def run(
    target: Path, *, device: Any, dtype: str = "auto", batch_size: int = 2, steps: int = 3, generate: int = 8,
    train: str = "align", optimizer: bool = True, seed: int = 0, trust_remote_code: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run the test and return the report (see the module docstring)."""
    import torch

    torch_dtype = _torch_dtype(dtype, device)
    torch.manual_seed(seed)
    model, tokenizer, processor, kind = load_target(target, torch_dtype, trust_remote_code)
    model.to(device)
    timer = _Timer(device)
    inputs, counts, encoder_parts, checks_ok = _encoder_inputs(model, batch_size, device, torch_dtype)
    batch, prompts = _text_batch(model, tokenizer, processor, counts, batch_size, device)
    trainable = _set_stage(model, train)

    # warm-up step, then a forward pass with per-part timing hooks
    opt = (
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6) if optimizer else None
    )
    model.train()
    _train_step(model, batch, inputs, opt, timer)
    part_times = _timed_parts(model, batch, inputs, timer)
    for part in encoder_parts:
        part.update(part_times.get(part["name"], {}))

    timer.reset_peak()
    records = []
    for index in range(steps):
        records.append(_train_step(model, batch, inputs, opt, timer, check_grads=index == steps - 1))
    train_peak = timer.peak()
    grads = records[-1].pop("grads")
    losses = [r.pop("loss") for r in records]
    seq_len = batch["input_ids"].shape[1]
    step_s = [r["step_s"] for r in records]
    train_report = {
        "stage": train,
        "trains": STAGES[train].trains,
        "optimizer": "AdamW" if optimizer else None,
        "losses": losses,
        "loss_finite": all(math.isfinite(x) for x in losses),
        "grads_finite": all(g["grads_finite"] in (True, None) for g in grads.values()),
        "forward_ms": _mean_ms(r["forward_s"] for r in records),
        "backward_ms": _mean_ms(r["backward_s"] for r in records),
        "optimizer_ms": _mean_ms(r["optimizer_s"] for r in records) if optimizer else None,
        "step_ms": _mean_ms(step_s),
        "step_ms_min": round(min(step_s) * 1e3, 3),
        "tokens_per_s": round(batch_size * seq_len / (sum(step_s) / len(step_s)), 1),
        "peak_memory_bytes": train_peak,
    }
    parts = encoder_parts + [
        {"name": "language_model", "kind": "llm", **part_times.get("language_model", {})}
    ]
    for part in parts:
        keys = (
            [f"{part['name']}.module", f"{part['name']}.projector"]
            if part["kind"] == "encoder"
            else ["language_model"]
        )
        part["params"] = sum(trainable[k][1] for k in keys)
        part["trainable"] = sum(trainable[k][0] for k in keys)
        finite = [grads[k]["grads_finite"] for k in keys if grads[k]["grads_finite"] is not None]
        part["grads_finite"] = all(finite) if finite else None
        part["trainable_without_grad"] = sum(grads[k]["without_grad"] for k in keys)
    gen_report = _generate(model, prompts, inputs, tokenizer, generate, timer) if generate > 0 else None
    ok = train_report["loss_finite"] and train_report["grads_finite"] and checks_ok
    return {
        "target": str(target),
        "kind": kind,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(torch_dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "sequence_length": seq_len,
        "steps": steps,
        "memory_kind": timer.memory_kind,
        "parts": parts,
        "train": train_report,
        "generate": gen_report,
        "peak_memory_bytes": max(
            [m for m in (train_peak, gen_report and gen_report["peak_memory_bytes"]) if m is not None],
            default=None,
        ),
        "processor": processor is not None,
        "ok": ok,
    }


class _Timer:
    """perf_counter with CUDA synchronisation; peak memory (CUDA allocator or process RSS)."""

    def __init__(self, device: Any):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device
        self.memory_kind = "cuda_max_allocated" if self.cuda else "process_peak_rss"

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated(self.device))
        return _peak_rss()


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _mean_ms(values: Any) -> float:
    values = list(values)
    return round(sum(values) / len(values) * 1e3, 3)


def _encoder_inputs(model: Any, batch_size: int, device: Any, dtype: Any) -> tuple[dict, dict, list, bool]:
    """Dummy inputs per encoder (from its plugin), the token count per item (measured), and a part
    record per encoder with the plugin's own count beside the measured one."""
    import torch

    from mmcore.factory import factory_for_source
    from mmcore.modeling.merge import flatten_features

    inputs: dict[str, dict[str, Any]] = {}
    counts: dict[str, list[int]] = {}
    parts = []
    ok = True
    for name, encoder in model.encoders.items():
        source = encoder.source or {}
        if source.get("kind") != "plugin":
            raise ConfigError(
                f"encoder {name!r} was not built by a plugin, so there are no dummy inputs for it; "
                "test-run needs models assembled from registered encoders (mmcore assemble)"
            )
        factory = factory_for_source(name, source)
        recipe = source.get("recipe") or {}
        raw = factory.dummy_inputs(recipe, batch_size)
        predicted = [encoder.projector.num_output_tokens(int(n)) for n in factory.num_tokens(recipe, raw)]
        moved = {
            k: (v.to(device=device, dtype=dtype) if torch.is_floating_point(v) else v.to(device))
            if isinstance(v, torch.Tensor) else v
            for k, v in raw.items()
        }  # fmt: skip
        with torch.no_grad():
            features = encoder(**encoder.select_inputs(moved))  # call names -> the encoder's arguments
        per_item = _tokens_per_item(features, name)
        flatten_features(features, name)  # checks the features' shape as the merge will
        inputs[name], counts[name] = moved, per_item
        matches = predicted == per_item
        ok = ok and matches
        parts.append({
            "name": name,
            "kind": "encoder",
            "encoder": source.get("encoder"),
            "projector": encoder.projector.config.projector_type,
            "input_shapes": {k: list(v.shape) for k, v in raw.items() if isinstance(v, torch.Tensor)},
            "tokens_per_item": per_item,
            "num_tokens_predicted": predicted,
            "num_tokens_ok": matches,
        })  # fmt: skip
    return inputs, counts, parts, ok


def _tokens_per_item(features: Any, name: str) -> list[int]:
    if isinstance(features, (list, tuple)):
        return [int(f.shape[0]) for f in features]
    if features.dim() == 3:
        return [int(features.shape[1])] * int(features.shape[0])
    raise ConfigError(
        f"encoder {name!r}: features of shape {tuple(features.shape)}; expected (items, tokens, width)"
    )


def _text_batch(
    model: Any, tokenizer: Any, processor: Any, counts: dict, batch_size: int, device: Any
) -> tuple[dict, dict]:
    """One sample per batch row: prompt, one placeholder run per modality, answer; labels = ids.
    Expanded and padded by the `MultimodalProcessor` (built from the model when none was saved):
    right-padded with labels for training, and the same rows left-padded for generation (a
    decoder-only model continues each row from its last real token)."""
    if processor is None:
        from mmcore.processing import MultimodalProcessor

        processor = MultimodalProcessor.from_model(model, tokenizer)
    if tokenizer.pad_token_id is None:  # this run's own tokenizer; generation pads with EOS too
        tokenizer.pad_token = tokenizer.eos_token
    token_ids = model.modality_token_ids
    prompt = tokenizer(_PROMPT, add_special_tokens=False)["input_ids"]
    answer = tokenizer(_ANSWER, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    samples = []
    for row in range(batch_size):
        ids = bos + [token_ids[m] for m in model.encoders] + prompt + answer
        samples.append(processor.expand(ids, {m: [counts[m][row]] for m in model.encoders}, sample=row))
    train = processor.pad(samples, labels=samples, padding=True, padding_side="right", return_tensors="pt")
    prompts = processor.pad(samples, padding=True, padding_side="left", return_tensors="pt")
    return (
        {key: train[key].to(device) for key in ("input_ids", "attention_mask", "labels")},
        {key: prompts[key].to(device) for key in ("input_ids", "attention_mask")},
    )


def _set_stage(model: Any, stage: str) -> dict[str, tuple[int, int]]:
    """`mmcore.training.apply_stage`, as part -> ``(trainable, total)`` parameters."""
    from mmcore.training.stages import apply_stage

    return {part: (trainable, total) for part, trainable, total in apply_stage(model, stage).rows}


def _train_step(
    model: Any, batch: dict, inputs: dict, opt: Any, timer: _Timer, check_grads: bool = False
) -> dict:
    t0 = timer.now()
    out = model(**batch, encoder_inputs=inputs)
    t1 = timer.now()
    out.loss.backward()
    t2 = timer.now()
    grads = _grad_check(model) if check_grads else None
    t3 = timer.now()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    t4 = timer.now()
    return {
        "loss": float(out.loss.detach().float()),
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "optimizer_s": t4 - t3,
        "step_s": (t2 - t0) + (t4 - t3),
        "grads": grads,
    }


def _grad_check(model: Any) -> dict[str, dict[str, Any]]:
    import torch

    report = {}
    for key, module in model.parts().items():
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            report[key] = {"grads_finite": None, "without_grad": 0}
            continue
        # Parameters a forward never reaches (e.g. the layers after a selected feature layer) get no
        # gradient: counted apart, not as a failure.
        with_grad = [p for p in trainable if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in with_grad) if with_grad else None
        report[key] = {
            "grads_finite": finite,
            "without_grad": sum(p.numel() for p in trainable if p.grad is None),
        }
    return report


def _timed_parts(model: Any, batch: dict, inputs: dict, timer: _Timer) -> dict[str, dict[str, Any]]:
    """Forward time and output shape of each encoder (with its projector) and of the LLM, by hooks."""
    import torch

    results: dict[str, dict[str, Any]] = {}
    handles = []
    modules = {**{name: enc for name, enc in model.encoders.items()}, "language_model": model.language_model}
    for name, module in modules.items():

        def pre(_module, _args, _kwargs, name=name):
            results.setdefault(name, {})["_t0"] = timer.now()

        def post(_module, _args, _kwargs, output, name=name):
            entry = results[name]
            entry["forward_ms"] = round((timer.now() - entry.pop("_t0")) * 1e3, 3)
            entry["output_shape"] = _shape(output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**batch, encoder_inputs=inputs)
    finally:
        for handle in handles:
            handle.remove()
    return results


def _shape(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return list(output.shape)
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, torch.Tensor) for o in output):
        return [list(o.shape) for o in output]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return list(logits.shape)
    return type(output).__name__


def _generate(
    model: Any, prompts: dict, inputs: dict, tokenizer: Any, new_tokens: int, timer: _Timer
) -> dict[str, Any]:
    """Greedy generation of exactly ``new_tokens`` tokens from the left-padded ``prompts``, timed token
    by token through a streamer (``generate`` hands it the prompt, then each new token, copied to the
    host: a sync point)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(
        input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], encoder_inputs=inputs,
        do_sample=False, pad_token_id=pad, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
    )  # fmt: skip
    with torch.no_grad():
        model.generate(**kwargs)  # warm-up
        timer.reset_peak()
        clock = TokenClock()
        start = timer.now()
        out = model.generate(**kwargs, streamer=clock)
        total_s = timer.now() - start
    batch_size, prompt = prompts["input_ids"].shape
    # clock.times[0]: the prompt handed over; [1]: the first new token (encoders + prefill); then one per step
    prefill_s = clock.times[1] - start
    decode_s = clock.times[-1] - clock.times[1]
    return {
        "new_tokens": new_tokens,
        "output_shape": list(out.shape),
        "prefill_ms": round(prefill_s * 1e3, 3),
        "decode_ms_per_token": round(decode_s / (new_tokens - 1) * 1e3, 3) if new_tokens > 1 else None,
        "total_ms": round(total_s * 1e3, 3),
        "prefill_tokens_per_s": round(batch_size * prompt / prefill_s, 1),
        "decode_tokens_per_s": round(batch_size * (new_tokens - 1) / decode_s, 1)
        if new_tokens > 1 and decode_s > 0
        else None,
        "peak_memory_bytes": timer.peak(),
    }


def tokens_cell(tokens: list[int] | None, predicted: list[int] | None = None) -> str | None:
    """The tokens/item column: one number when every item has it, else every item's count."""
    if tokens is None:
        return None
    shown = str(tokens[0]) if len(set(tokens)) == 1 else ", ".join(map(str, tokens))
    if predicted is not None and list(predicted) != list(tokens):
        said = str(predicted[0]) if len(set(predicted)) == 1 else ", ".join(map(str, predicted))
        shown += f" (plugin says {said})"
    return shown


# -- printing --------------------------------------------------------------------------------------


def _print_report(report: dict[str, Any]) -> None:
    from mmcore.cli.output import console, human_count

    train = report["train"]
    gen = report["generate"]
    title = (
        f"test-run {report['target']} on {report['device_name']} ({report['dtype']}), "
        f"batch {report['batch_size']}, "
        f"sequence {report['sequence_length']}"
    )
    rows = []
    for part in report["parts"]:
        tokens = tokens_cell(part.get("tokens_per_item"), part.get("num_tokens_predicted"))
        rows.append([
            part["name"] + _encoder_label(part),
            human_count(part["params"]),
            human_count(part["trainable"]),
            part.get("output_shape"),
            part.get("forward_ms"),
            tokens,
            {True: "yes", False: "NO", None: "-"}[part["grads_finite"]]
            + (f" ({human_count(part['trainable_without_grad'])} unused)" if part["trainable_without_grad"]
               else ""),
        ])  # fmt: skip
    print_table(
        title, ["part", "params", "trainable", "output shape", "fwd ms", "tokens/item", "grads ok"], rows
    )
    step_rows = [
        ["forward", f"{train['forward_ms']} ms"],
        ["backward", f"{train['backward_ms']} ms"],
        ["optimizer (AdamW)", f"{train['optimizer_ms']} ms" if train["optimizer"] else "skipped"],
        ["step (mean / min)", f"{train['step_ms']} / {train['step_ms_min']} ms"],
        ["train tokens/s", train["tokens_per_s"]],
        ["losses", ", ".join(f"{x:.4f}" for x in train["losses"])],
        ["losses finite", "yes" if train["loss_finite"] else "NO"],
        ["gradients finite", "yes" if train["grads_finite"] else "NO"],
        ["peak memory (train)", human_bytes(train["peak_memory_bytes"])],
    ]
    if gen is not None:
        step_rows += [
            ["generated", f"{gen['new_tokens']} tokens, output {gen['output_shape']}"],
            [
                "prefill (to the first token)",
                f"{gen['prefill_ms']} ms, {gen['prefill_tokens_per_s']} tokens/s",
            ],
            [
                "decode",
                f"{gen['decode_ms_per_token']} ms/token, {gen['decode_tokens_per_s']} tokens/s"
                if gen["decode_tokens_per_s"] is not None
                else "-",
            ],
            ["peak memory (generate)", human_bytes(gen["peak_memory_bytes"])],
        ]
    memory = "CUDA max allocated" if report["memory_kind"] == "cuda_max_allocated" else "process peak RSS"
    title = f"Training ({train['stage']}: {train['trains']}), {report['steps']} timed steps after a warm-up"
    print_table(title, ["", ""], step_rows, caption=f"memory: {memory}")
    console().print(
        "OK" if report["ok"] else "FAILED: non-finite loss or gradient, or a plugin's token count is wrong"
    )


def _encoder_label(part: dict[str, Any]) -> str:
    return f": {part['encoder'].rpartition(':')[2]} + {part['projector']}" if part.get("encoder") else ""


def register(app: typer.Typer) -> None:
    """Add ``test-run`` to ``app``."""
    app.command("test-run")(test_run)
