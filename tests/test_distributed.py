"""Multi-process training: ``torchrun`` with 2 CPU processes (DDP, gloo) computes the
same steps as one process accumulating the same 2 micro-batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_math_file, make_tiny_model_dir, tiny_train_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny_ddp")
    make_tiny_model_dir(root / "model", smollm2_dir)
    make_math_file(root / "math.jsonl")
    return root


def _run(prefix: list[str], args: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*prefix, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: a hang kills torchrun's workers too
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out
    return out


def test_torchrun_two_processes_match_one_process_accumulating(tiny, tmp_path):
    common = ["--dropout", "0.0", "--save-every", "2"]
    two = tiny_train_args(tiny, tmp_path / "ddp", 4, *common, "--grad-accum", "1")
    one = tiny_train_args(tiny, tmp_path / "single", 4, *common, "--grad-accum", "2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "dude.cli"]
    _run(torchrun, two)
    _run([sys.executable, "-m", "dude.cli"], one)
    ddp, single = load_file(tmp_path / "ddp" / "adapter_model.safetensors"), \
        load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert ddp.keys() == single.keys()
    for key in ddp:  # same micro-batches; only the order of the gradient sum differs
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("ddp", "single")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert {p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()} == {"step-000002.pt"}
