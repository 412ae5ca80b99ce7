"""The training loop behind ``mmcore train``: one process or many under ``torchrun``.

Per optimizer step: ``grad_accum`` micro-batches from a `GroupedBatchSampler` (``batch_length``: a
`TokenBudgetBatchSampler`), each packed into rows when ``pack_to`` is set; the loss is
normalised by the number of label tokens of the whole global step (all ranks, all micro-batches),
so N ranks with batch B train exactly as one process with batch N*B does; gradients are reduced by
FSDP2 (`mmcore.training.distributed.shard`) when distributed; then clipping, AdamW (projector and
other learning rates apart, `param_groups`) and the LR schedule.

Checkpoints (``save_every`` steps) go to ``<output_dir>/checkpoints/step-NNNNNNN``: the trainable
parameters and their optimizer state as a sharded ``torch.distributed.checkpoint`` (any world size
can load it), the scheduler, the position in the data and every rank's RNG states. Frozen weights
are not written again at every checkpoint (an align stage's checkpoint of an 8B LLM holds the
projectors, not 16 GB); a fingerprint of them is, and resuming checks that the model it resumes
holds the same frozen weights. A new run with the same ``output_dir`` resumes from the latest one. The final model goes to ``<output_dir>/model`` (one HF directory;
with LoRA it holds the adapters and the projectors, see `mmcore.training.lora`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcore.errors import ConfigError, NonFiniteError, SaveError
from mmcore.files import swap_into
from mmcore.training.config import (  # noqa: F401 (FINAL, SCHEDULERS: re-exported)
    CHECKPOINTS,
    FINAL,
    SCHEDULERS,
    TrainConfig,
    latest_checkpoint,
)
from mmcore.training.data import GroupedBatchSampler
from mmcore.training.distributed import (
    DistInfo,
    full_state_dict,
    init_distributed,
    is_sharded,
    shard,
)
from mmcore.training.lora import has_lora
from mmcore.training.stages import apply_stage, param_groups
from mmcore.training.token_budget import TokenBudgetBatchSampler


@dataclass
class TrainResult:
    """What a run did: ``losses`` as ``(step, global mean loss)`` per step, the last step, where the
    final model went (None when not saved), the step it resumed from (0: a fresh start), this
    process's rank (0 in a single-process run), and the steps skipped for a non-finite loss or
    gradient (``skip_nonfinite``)."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    step: int = 0
    model_dir: Path | None = None
    resumed_from: int = 0
    rank: int = 0
    skipped: list[int] = field(default_factory=list)


def _precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return name


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _all_reduce(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        import torch.distributed as dist

        dist.all_reduce(value)
    return value


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


class _Checkpoints:
    """``<output_dir>/checkpoints/step-NNNNNNN`` directories, written atomically (staged, then renamed)."""

    def __init__(self, root: Path, info: DistInfo, keep: int):
        self.root, self.info, self.keep = root / CHECKPOINTS, info, keep

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def save(
        self, step: int, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]
    ) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        final = self.root / f"step-{step:07d}"
        staging = self.root / f".step-{step:07d}.partial"
        if self.info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier(self.info)
        frozen = _frozen_fingerprint(model, self.info)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        with _single_process_quiet(self.info):
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(staging))
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, staging / f"rng-{self.info.rank}.pt")
        _barrier(self.info)
        if self.info.is_main:
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            trainable = [name for name, p in model.named_parameters() if p.requires_grad]
            record = {**state, "step": step, "trainable": trainable, "frozen_fingerprint": frozen}
            (staging / "trainer_state.json").write_text(json.dumps(record, indent=1))
            swap_into(staging, final)  # an older checkpoint of this step is swapped out, never missing
            if self.keep > 0:
                for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier(self.info)
        return final

    def load(self, path: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        saved = json.loads((path / "trainer_state.json").read_text())
        _check_same_model(path, saved, model, _frozen_fingerprint(model, self.info))
        options = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_quiet(self.info):
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),  # the frozen ones stay
        )  # fmt: skip
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_file = path / f"rng-{self.info.rank}.pt"
        if rng_file.is_file():  # a different world size: ranks without a saved state keep their seed
            rng = torch.load(rng_file, weights_only=True)
            random.setstate(_as_tuple(rng["python"]))
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return saved


def _frozen_fingerprint(model: nn.Module, info: DistInfo) -> dict[str, list[float]]:
    """Frozen parameter name -> ``[sum, sum of squares]`` over the whole tensor (every rank's shard):
    a few numbers per tensor, cheap to compute at a checkpoint, that a different initialisation or
    another checkpoint moves far beyond summation-order noise."""
    from torch.distributed.tensor import DTensor

    names, sharded, stats = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        dtensor = isinstance(param, DTensor)
        local = (param.to_local() if dtensor else param).detach().reshape(-1).float()
        names.append(name)
        sharded.append(dtensor and any(p.is_shard() for p in param.placements))
        stats.append(torch.stack([local.sum(), torch.dot(local, local)]).double())
    if not names:
        return {}
    values = torch.stack(stats)
    if info.world_size > 1 and any(sharded):
        import torch.distributed as dist

        mask = torch.tensor(sharded, device=values.device).unsqueeze(1)
        total = torch.where(mask, values, torch.zeros_like(values))
        dist.all_reduce(total)
        values = torch.where(mask, total, values)
    return {name: [float(a), float(b)] for name, (a, b) in zip(names, values.cpu().tolist())}


def _check_same_model(path: Path, saved: Mapping[str, Any], model: nn.Module, frozen: Mapping[str, list[float]]) -> None:
    """A checkpoint holds only what trains: resuming needs the same trainable parameters, and frozen
    weights equal to those of the run that wrote it (the same model, the same stage)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if "trainable" in saved and saved["trainable"] != trainable:
        theirs, ours = set(saved["trainable"]), set(trainable)
        example = sorted((theirs - ours) or (ours - theirs) or theirs)[0]
        raise ConfigError(
            f"checkpoint {path} trained {len(theirs)} parameter tensors, this run trains {len(ours)} "
            f"(e.g. {example!r} is in one and not the other): resume with the same stage and model, "
            "or start a new output dir"
        )
    expected = saved.get("frozen_fingerprint") or {}
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    for name, (total, squares) in expected.items():
        got = frozen.get(name)
        if got is None:
            raise ConfigError(f"checkpoint {path} expects a frozen parameter {name!r} this model does not have")
        # float32 sums of the same values in another order (another world size) agree to ~1e-6 of
        # the sum of squares, and of sqrt(n x sum of squares) for the plain sum (its bound, by Cauchy-Schwarz)
        squares_tol = 1e-4 * max(squares, got[1]) + 1e-30
        total_tol = 1e-4 * (sizes[name] * max(squares, got[1])) ** 0.5 + 1e-30
        if abs(got[1] - squares) > squares_tol or abs(got[0] - total) > total_tol:
            raise ConfigError(
                f"checkpoint {path} was written with other frozen weights: {name!r} differs from the "
                "model this run starts from; checkpoints hold only what trains, so resume from the model "
                "the interrupted run started from (same directory, or the same spec and --seed)"
            )


@contextmanager
def _single_process_quiet(info: DistInfo) -> Iterator[None]:
    """torch.distributed.checkpoint warns that it "assumes a single process" when no process group
    exists; in a single-process run that is exactly the intent."""
    with warnings.catch_warnings():
        if not info.distributed:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process")
        yield


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def train(
    model: nn.Module,
    dataset: Any,
    collator: Callable[[list[Any]], dict[str, Any]],
    config: TrainConfig,
    *,
    processor: Any = None,
    console: Any = None,
) -> TrainResult:
    """Train ``model`` (a `MultimodalModel`) on ``dataset`` batched by ``collator`` (e.g.
    `MultimodalCollator`), as ``config`` says. Works as one process or under ``torchrun``.

    ``processor`` (anything with ``save_pretrained``, e.g. the `MultimodalProcessor` or tokenizer)
    is saved beside the final model. Returns a `TrainResult`.

    Under ``torchrun`` it joins the process group (`init_distributed`) and shards the model with FSDP2
    in place; the group stays up, so stages can follow one another in the same processes (``lora``
    only on a model that had its adapters before sharding). Call `close_distributed` at the end.
    """
    from rich.console import Console

    config.check()
    info = init_distributed(config.device)
    console = console or Console(stderr=True)
    say = console.print if info.is_main else (lambda *a, **k: None)
    return _train(model, dataset, collator, config, processor, info, console, say)


def _train(model, dataset, collator, config, processor, info, console, say) -> TrainResult:
    """One run, step by step: set the model up, plan the steps, resume, train, save."""
    autocast = _prepare_model(model, config, info, say)
    run = _plan_run(model, dataset, collator, config, info, autocast)
    _resume(run, say)
    per_step = (
        f"{run.global_batch} samples per step ({config.batch_size} x "
        if config.batch_length is None
        else f"{info.world_size * config.grad_accum} batches of up to {config.batch_length} length per step ("
    )
    say(
        f"training {run.total} steps: {per_step}{info.world_size} process(es) x {config.grad_accum} "
        f"accumulation), {run.per_epoch} steps per epoch, on {info.device}"
        + (f"; samples packed into rows of up to {config.pack_to} tokens" if config.pack_to else "")
        + ("" if config.group_by_modality else "; modalities mixed in a batch")
    )
    _run_steps(run, console, say)
    if run.result.skipped:
        skipped = run.result.skipped
        say(f"{len(skipped)} step(s) skipped for a non-finite loss or gradients: {skipped}")
    if config.save_final:
        run.result.model_dir = _save_final(run, processor)
        say(f"saved {run.result.model_dir}")
    return run.result


@dataclass
class _Run:
    """What one run carries from its set-up through the steps to the final save."""

    model: nn.Module
    dataset: Any
    collator: Callable[[list[Any]], dict[str, Any]]
    config: TrainConfig
    info: DistInfo
    autocast: Any
    optimizer: Any
    scheduler: Any
    sampler: GroupedBatchSampler | TokenBudgetBatchSampler
    checkpoints: _Checkpoints
    total: int
    per_epoch: int
    global_batch: int
    #: where the data stands: ``epoch``, ``batch_in_epoch`` (and ``global_batch``), saved in checkpoints
    state: dict[str, Any]
    result: TrainResult
    step: int = 0


def _prepare_model(model: nn.Module, config: TrainConfig, info: DistInfo, say: Callable[..., Any]) -> Any:
    """Seed, apply the stage, move (or, under torchrun, shard) the model; the autocast context."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if is_sharded(model) and config.stage == "lora" and not has_lora(model):
        raise ConfigError(
            "LoRA cannot be added to a model FSDP already sharded; train from the saved model instead"
        )
    if config.train_new_token_rows and (info.distributed or is_sharded(model)):
        raise ConfigError(
            "train_new_token_rows (--train-new-token-rows) works in one process for now: FSDP2 sharding "
            "replaces the embedding weights that carry its hooks"
        )
    report = apply_stage(
        model,
        config.stage,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_on_encoders=config.lora_on_encoders,
        train_new_token_rows=config.train_new_token_rows or None,
    )
    say(report)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not is_sharded(model):
        model.to(info.device)
    model.train()
    precision = _precision(config.mixed_precision, info.device)
    if info.distributed:
        if not is_sharded(model):  # a second stage in the same processes keeps the sharding
            units = shard(model, mixed_precision=precision)
            say(
                f"FSDP2 over {info.world_size} processes: "
                + ", ".join(f"{k} {v}" for k, v in units.items())
                + " units"
            )
        return nullcontext()
    if precision != "no":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(info.device.type, dtype=dtype)
    return nullcontext()


def _plan_run(model, dataset, collator, config: TrainConfig, info: DistInfo, autocast: Any) -> _Run:
    """The optimizer, the sampler, the number of steps and the LR schedule over them."""
    import transformers

    groups = param_groups(model, config.lr, config.projector_lr, config.weight_decay)
    # fused (one kernel per step, not a pass per state tensor), as transformers.Trainer's default
    # adamw_torch_fused, where torch has the kernel: floating-point parameters on CPU or CUDA
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)
    sharding = dict(
        world_size=info.world_size, rank=info.rank, seed=config.seed, group_by_modality=config.group_by_modality
    )
    if config.batch_length is not None:
        if hasattr(dataset, "use_token_lengths"):  # JSONL conversations: a budget in tokens, not characters
            dataset.use_token_lengths(collator)
        rows = config.pack_to if config.pack_to is not None and config.pack_to < config.batch_length else None
        sampler = TokenBudgetBatchSampler.for_dataset(dataset, config.batch_length, row_tokens=rows, **sharding)
    else:
        sampler = GroupedBatchSampler.for_dataset(dataset, config.batch_size, **sharding)
    if config.pack_to is not None:
        if not hasattr(collator, "with_packing"):
            raise ConfigError(
                "pack_to (--pack-to) needs a collator that packs (MultimodalCollator), got "
                f"{type(collator).__name__}"
            )
        collator = collator.with_packing(config.pack_to)
    if len(sampler) < config.grad_accum:
        raise ConfigError(
            f"one epoch holds {len(sampler)} batches, fewer than grad_accum={config.grad_accum}; "
            "lower grad_accum or the batch size"
        )
    per_epoch = len(sampler) // config.grad_accum
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    scheduler = transformers.get_scheduler(
        config.scheduler,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * total),
        num_training_steps=total,
    )
    global_batch: int | str = config.batch_size * info.world_size * config.grad_accum
    if config.batch_length is not None:  # a length budget: the number of samples varies
        global_batch = f"{info.world_size * config.grad_accum} x up to {config.batch_length} length"
    return _Run(
        model=model, dataset=dataset, collator=collator, config=config, info=info, autocast=autocast,
        optimizer=optimizer, scheduler=scheduler, sampler=sampler,
        checkpoints=_Checkpoints(Path(config.output_dir), info, config.keep_checkpoints),
        total=total, per_epoch=per_epoch, global_batch=global_batch,
        state={"epoch": 0, "batch_in_epoch": 0, "global_batch": global_batch},
        result=TrainResult(rank=info.rank),
    )  # fmt: skip


def _resume(run: _Run, say: Callable[..., Any]) -> None:
    """Continue from the latest checkpoint in the output dir (``config.resume``), if there is one."""
    latest = run.checkpoints.latest() if run.config.resume else None
    if latest is None:
        return
    saved = run.checkpoints.load(latest, run.model, run.optimizer, run.scheduler)
    if saved.get("global_batch") != run.global_batch:
        raise ConfigError(
            f"checkpoint {latest} was trained with a global batch of {saved.get('global_batch')}, this run has "
            f"{run.global_batch}; keep batch_size x processes x grad_accum the same to resume, or start a new output dir"
        )
    run.step = run.result.resumed_from = int(saved["step"])
    run.state.update(epoch=int(saved["epoch"]), batch_in_epoch=int(saved["batch_in_epoch"]))
    say(f"resumed from {latest} (step {run.step})")


def _run_steps(run: _Run, console: Any, say: Callable[..., Any]) -> None:
    """Optimizer steps until ``run.total``: epoch after epoch, ``grad_accum`` micro-batches a step."""
    config, state = run.config, run.state
    progress = _progress(console, enabled=config.progress and run.info.is_main)
    task = progress.add_task("train", total=run.total, completed=run.step, loss=float("nan"))
    window: list[float] = []
    started = time.perf_counter()
    with progress:
        while run.step < run.total:
            run.sampler.set_epoch(state["epoch"])
            batches = list(iter(run.sampler))[state["batch_in_epoch"] :]
            loader = torch.utils.data.DataLoader(
                run.dataset, batch_sampler=batches, collate_fn=run.collator, num_workers=config.num_workers
            )
            micro: list[dict[str, Any]] = []
            micro_indices: list[int] = []
            for number, batch in enumerate(loader):
                micro.append(batch)
                micro_indices += batches[number]
                state["batch_in_epoch"] += 1
                if len(micro) < config.grad_accum:
                    continue
                loss = _optimizer_step(
                    run.model, micro, run.optimizer, run.scheduler, config, run.info, run.autocast
                )
                run.step += 1
                if not math.isfinite(loss):
                    _non_finite_step(run, loss, micro_indices, say)
                micro, micro_indices = [], []
                run.result.losses.append((run.step, loss))
                window.append(loss)
                progress.update(task, advance=1, loss=loss)
                if run.step % config.log_every == 0 or run.step == run.total:
                    rate = (run.step - run.result.resumed_from) / (time.perf_counter() - started)
                    say(
                        f"step {run.step}/{run.total}  loss {sum(window) / len(window):.4f}  "
                        f"lr {run.scheduler.get_last_lr()[-1]:.2e}  {rate:.2f} steps/s"
                    )
                    window = []
                if config.save_every and run.step % config.save_every == 0:
                    say(f"checkpoint {_save_checkpoint(run)}")
                if run.step >= run.total:
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    run.result.step = run.step


def _save_checkpoint(run: _Run) -> Path:
    """A checkpoint of this step; one that cannot be written (a full disk) is a `SaveError` saying
    which checkpoint is the last one left (the partial one is removed)."""
    from torch.distributed.checkpoint.api import CheckpointException

    previous = run.checkpoints.latest()
    try:
        return run.checkpoints.save(run.step, run.model, run.optimizer, run.scheduler, run.state)
    except (OSError, CheckpointException) as exc:
        cause = _os_error(exc)
        if cause is None:
            raise
        shutil.rmtree(run.checkpoints.root / f".step-{run.step:07d}.partial", ignore_errors=True)
        kept = f"the last checkpoint is {previous}" if previous is not None else "no earlier checkpoint exists"
        raise SaveError(
            f"the checkpoint of step {run.step} could not be written to {run.checkpoints.root} "
            f"({cause.strerror or cause}); {kept}; free some space (or lower --keep-checkpoints) and resume "
            "with the same -o"
        ) from exc


def _os_error(exc: BaseException) -> OSError | None:
    """The `OSError` behind ``exc``: itself, or the first one torch.distributed.checkpoint collected."""
    if isinstance(exc, OSError):
        return exc
    for failure in getattr(exc, "failures", {}).values():
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, OSError):
            return error
    return None


def _non_finite_step(run: _Run, loss: float, micro_indices: list[int], say: Callable[..., Any]) -> None:
    """A step whose loss or gradients were not finite (and so made no update): stop, or skip and count."""
    samples = _sample_names(run.dataset, micro_indices)
    if not run.config.skip_nonfinite:
        raise NonFiniteError(
            f"step {run.step}: the loss or the gradients are not finite (loss {loss}); samples "
            f"{samples} (this process's batch); no update was made and nothing saved at this step; "
            "check these samples' inputs, lower --lr, or pass --skip-nonfinite to skip such steps",
            step=run.step,
            samples=samples,
        )
    run.result.skipped.append(run.step)
    say(f"step {run.step}: skipped (non-finite loss or gradients; samples {samples})")


def _save_final(run: _Run, processor: Any) -> Path | None:
    """``<output_dir>/model``; a failed save (a full disk) says which checkpoint is left to resume from."""
    target = Path(run.config.output_dir) / FINAL
    try:
        return save_model(run.model, target, run.info, processor)
    except OSError as exc:
        last = run.checkpoints.latest()
        kept = (
            f"the last checkpoint is {last} (resume from it with the same -o once there is room)"
            if last is not None
            else "no checkpoint was written (use --save-every N to keep some)"
        )
        raise SaveError(
            f"the final model could not be saved to {target} after step {run.step} "
            f"({exc.strerror or exc}); {kept}"
        ) from exc


def _sample_names(dataset: Any, indices: list[int]) -> list[Any]:
    """The ``id`` of each sample (its index when it has none)."""
    records = getattr(dataset, "records", None)
    names = []
    for index in indices:
        record = records[index] if records is not None else None
        names.append(record.get("id", index) if isinstance(record, Mapping) else index)
    return names


def _optimizer_step(model, micro, optimizer, scheduler, config, info, autocast) -> float:
    device = info.device
    # Every label token of the global step counts once, whichever rank or micro-batch holds it.
    items = sum((b["labels"][:, 1:] != -100).sum() for b in micro).to(device)
    items = _all_reduce(items.clone(), info).clamp(min=1)
    total = torch.zeros((), device=device)
    for index, batch in enumerate(micro):
        if is_sharded(model):
            model.set_requires_gradient_sync(index == len(micro) - 1)
        with autocast:
            out = model(**{**_to_device(batch, device), "use_cache": False}, num_items_in_batch=items)
        # The data-parallel reduction averages over ranks; the loss already is a share of the global sum.
        (out.loss * info.world_size).backward()
        total += out.loss.detach().float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        # A modality absent from this step gives its projector no gradient; one process (through the
        # model's zero term) sees zeros there, so make it zeros everywhere: AdamW then moves every
        # trainable parameter the same way whether the run is sharded or not.
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    # The norm is the one check of every gradient at once; with clipping off it clips nothing (inf).
    norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards; its value is the global norm
        norm = norm.full_tensor()
    loss = _all_reduce(total, info)
    finite = _all_reduce((torch.isfinite(loss) & torch.isfinite(norm)).float().reshape(1), info)
    if bool(finite.item() == info.world_size):
        optimizer.step()
        scheduler.step()
    else:  # no update (and no schedule step): non-finite weights never come from this step
        loss = torch.full_like(loss, float("nan"))
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def save_model(
    model: nn.Module, path: Path, info: DistInfo | None = None, processor: Any = None
) -> Path | None:
    """Save ``model`` (sharded or not) as one HF directory at ``path``, from rank 0; ``processor`` too.
    Every rank must call it (gathering a sharded model is collective)."""
    info = info or DistInfo()
    state_dict = full_state_dict(model)
    if info.is_main:
        model.save_pretrained(path, state_dict=state_dict)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(path)
    _barrier(info)
    return path
