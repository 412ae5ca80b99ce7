"""FSDP2 on CPU (gloo): ``torchrun --nproc_per_node 2`` trains a tiny model for a few steps, and its
losses and final weights match one process over the same global batch.

Tolerance: absolute 1e-5 on each step's loss and on every final weight (fp32). The two runs see the
same samples per step and normalise the loss by the same global token count; what differs is
summation order (two half batches, reduce-scatter) -- about 1e-6 after four AdamW steps here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TOLERANCE = 1e-5

JOB = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from rich.console import Console
    sys.path.insert(0, {tests!r})
    from test_training import TokenSamples
    from mmcore.testing import tiny_multimodal_model
    from mmcore.training import TrainConfig, train
    from mmcore.training.distributed import close_distributed

    output, batch_size, stage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model, _ = tiny_multimodal_model()
    data = TokenSamples(model, n=16)
    config = TrainConfig(output_dir=output, stage=stage, max_steps=4, batch_size=batch_size, lr=1e-3, warmup_ratio=0.0,
                         progress=False, log_every=1, device="cpu", lora_r=4, save_every=4)
    result = train(model, data, data.collate, config, console=Console(stderr=True, width=200))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(output, "losses.json"), "w") as fh:
            json.dump(result.losses, fh)
    close_distributed()
    """
)


def run_job(script, output, batch_size, stage, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, str(script)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
        ]
    done = subprocess.run(
        [*command, str(output), str(batch_size), stage], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((output / "losses.json").read_text()), done.stderr


@pytest.mark.parametrize("stage", ["finetune", "lora"])
def test_two_processes_with_fsdp2_match_one_process(tmp_path, stage):
    if stage == "lora":
        pytest.importorskip("peft")
    from safetensors.torch import load_file

    script = tmp_path / "job.py"
    script.write_text(JOB.format(tests=os.path.dirname(__file__)))
    single, _ = run_job(script, tmp_path / "one", batch_size=4, stage=stage, nproc=1)
    sharded, log = run_job(script, tmp_path / "two", batch_size=2, stage=stage, nproc=2)
    assert "FSDP2 over 2 processes" in log and "language_model 2" in log
    assert [s for s, _ in sharded] == [s for s, _ in single] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(single, sharded):
        assert abs(a - b) <= TOLERANCE, (single, sharded)
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=TOLERANCE, rtol=0, msg=key)
    from mmcore.testing import tiny_multimodal_model

    # checkpoints: the frozen weights' fingerprint, summed over both ranks' shards, equals one process's
    states = [json.loads((tmp_path / run / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
              for run in ("one", "two")]  # fmt: skip
    assert states[0]["trainable"] == states[1]["trainable"]
    prints = [state["frozen_fingerprint"] for state in states]
    assert prints[0] and prints[0].keys() == prints[1].keys()
    for name, (total, squares) in prints[0].items():
        assert prints[1][name][1] == pytest.approx(squares, rel=1e-5), name
        assert prints[1][name][0] == pytest.approx(total, rel=1e-4, abs=1e-4 * squares**0.5), name
    fresh = tiny_multimodal_model()[0].state_dict()
    assert any(
        ".projector." in k and not torch.equal(one[k], fresh[k]) for k in one if k in fresh
    )  # it trained
