"""Ranks that see different modalities in one step: 2 gloo processes under FSDP2 and DDP, per-step
layouts that differ across ranks (image vs text only, audio vs image, both text only, image+audio vs
audio), a few AdamW steps; the weights equal one process over the union of the batches (fp32, 1e-5).

Without the ranks' agreement (``config.agree_on_modalities=False``) FSDP2 fails on the first step
whose layouts differ, and the test says so within its time limit instead of hanging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

TOLERANCE = 1e-5
LIMIT_S = 240

JOB = textwrap.dedent(
    """
    import datetime, os, sys
    import torch
    import torch.distributed as dist
    from mmcore.testing import tiny_multimodal_model

    mode, output, agree = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    torch.manual_seed(0)
    model, tokenizer = tiny_multimodal_model()
    model.config.agree_on_modalities = agree
    ids = model.config.modality_token_ids
    gen = torch.Generator().manual_seed(1)

    def batch(modalities):
        # one sample: BOS, 4 image placeholders and/or 10 audio ones, then text
        tokens, extra = [1], {}
        if "image" in modalities:
            tokens += [ids["vision"]] * 4
            extra["pixel_values"] = torch.randn(1, 3, 28, 28, generator=gen)
        if "audio" in modalities:
            tokens += [ids["audio"]] * 10
            extra["input_features"] = torch.randn(1, 8, 20, generator=gen)
        tokens += torch.randint(5, 300, (6,), generator=gen).tolist()
        input_ids = torch.tensor([tokens])
        return dict(input_ids=input_ids, labels=input_ids.clone(), **extra)

    # step -> (rank 0's batch, rank 1's batch)
    layouts = [(("image",), ()), (("audio",), ("image",)), ((), ()), (("image", "audio"), ("audio",))]
    steps = [(batch(a), batch(b)) for a, b in layouts]

    if mode == "one":
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for pair in steps:
            loss = sum(model(**b).loss for b in pair) / 2  # what averaging the two ranks' gradients gives
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        state = model.state_dict()
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank = dist.get_rank()
        if mode == "fsdp2":
            from mmcore.training.distributed import full_state_dict, shard
            shard(model)
            wrapped = model
        else:
            # CLIP's last layer is never used (LLaVA takes the penultimate hidden state): DDP must know
            wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        model.train()
        optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
        for pair in steps:
            wrapped(**pair[rank]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        state = full_state_dict(model) if mode == "fsdp2" else model.state_dict()
        if rank != 0:
            state = None
        dist.destroy_process_group()
    if state is not None:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, output)
    # torch 2.11 + gloo: about one run in six, a worker that has left its process group aborts while the
    # interpreter finalizes ("terminate called without an active exception", no Python frame), after
    # all of the work above; skipping the finalization keeps that teardown race out of the result
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def _run(script, tmp_path, mode: str, agree: bool = True) -> subprocess.CompletedProcess:
    output = tmp_path / f"{mode}-{int(agree)}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script)]
    if mode != "one":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    # its own session: on a timeout the whole group (torchrun and its workers) is killed, so nothing
    # keeps the pipes open and the test never hangs
    proc = subprocess.Popen([*command, mode, str(output), "1" if agree else "0"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, -9, out, err + f"\n[killed after {LIMIT_S} s]")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agree")
    script = tmp / "job.py"
    script.write_text(JOB)
    one = _run(script, tmp, "one")
    assert one.returncode == 0, one.stderr[-4000:]
    return script, tmp, torch.load(tmp / "one-1.pt", weights_only=True)


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_ranks_with_different_modalities_train_like_one_process(job, mode):
    script, tmp, reference = job
    done = _run(script, tmp, mode)
    assert done.returncode == 0, done.stderr[-6000:]
    got = torch.load(tmp / f"{mode}-1.pt", weights_only=True)
    assert sorted(got) == sorted(reference)
    moved = 0
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=TOLERANCE, msg=key)
    # the encoders trained (all three parts got gradients from the steps that had their inputs)
    from mmcore.testing import tiny_multimodal_model

    torch.manual_seed(0)
    initial = tiny_multimodal_model()[0].state_dict()
    for part in ("encoders.vision.projector.", "encoders.audio.projector.", "language_model."):
        moved += any(not torch.equal(initial[k], reference[k]) for k in reference if k.startswith(part))
    assert moved == 3


def test_without_the_agreement_fsdp2_fails_instead_of_hanging(job):
    script, tmp, _ = job
    done = _run(script, tmp, "fsdp2", agree=False)
    assert done.returncode != 0  # a size mismatch or the process group's timeout, never a hang of CI
    assert "doesn't match expected size" in done.stderr or "killed after" in done.stderr or "imeout" in done.stderr
