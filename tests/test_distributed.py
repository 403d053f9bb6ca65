"""Multi-process training with 2 CPU processes over gloo: DDP and FSDP2 (under torchrun,
and under ``accelerate launch`` with accelerate's own FSDP config file) compute the same
steps as one process accumulating the same 2 micro-batches; a sharded run killed with
SIGKILL resumes from its DCP checkpoint to the same bits; FSDP evaluates after training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_math_file, make_tiny_model_dir, tiny_train_args

from dude.train import distributed
from dude.train.checkpoint import list_checkpoints

CONFIGS = Path(__file__).parents[1] / "configs"
PYTHON = [sys.executable, "-m"]
TORCHRUN = [*PYTHON, "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dude.cli"]
ACCELERATE = [*PYTHON, "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / "fsdp.yaml"),
              "--main_process_port", "0", "-m", "dude.cli"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny_ddp")
    make_tiny_model_dir(root / "model", smollm2_dir)
    make_math_file(root / "math.jsonl")
    return root


def _start(prefix: list[str], args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*prefix, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: a hang kills torchrun's workers too


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out
    return out


def _run(prefix: list[str], args: list[str]) -> str:
    return _finish(_start(prefix, args))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> Path:
    """The same 4 steps (no dropout) four ways, each evaluated after training: one process
    accumulating 2 micro-batches; 2 processes with DDP, with FSDP, and with FSDP under
    ``accelerate launch``. The eval file's greedy answers tell a trained model from the base."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--dropout", "0.0", "--lr", "2e-2", "--save-every", "2", "--eval.tasks", f"file:{tiny / 'math.jsonl'}",
              "--eval.limit", "4", "--max-new-tokens", "8"]
    _run([*PYTHON, "dude.cli"], tiny_train_args(tiny, root / "single", 4, *common, "--grad-accum", "2"))
    _run(TORCHRUN, tiny_train_args(tiny, root / "ddp", 4, *common, "--grad-accum", "1"))
    _run(TORCHRUN, tiny_train_args(tiny, root / "fsdp", 4, *common, "--grad-accum", "1", "--strategy", "fsdp"))
    _run(ACCELERATE, tiny_train_args(tiny, root / "accelerate", 4, *common, "--grad-accum", "1"))
    _run([*PYTHON, "dude.cli"], ["eval", "--name-or-path", str(tiny / "model"), "--tasks", f"file:{tiny / 'math.jsonl'}",
                                 "--eval-limit", "4", "--max-new-tokens", "8", "--output-dir", str(root / "base")])
    return root


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter_model.safetensors")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _answers(run: Path) -> list[str]:
    saved = json.loads((run / "eval.json").read_text())
    (result,) = saved.get("results", saved).values()  # `dude eval` nests them
    return [p["output"] for p in result["predictions"]]


def test_ddp_two_processes_match_one_process_accumulating(runs):
    ddp, single = _adapter(runs / "ddp"), _adapter(runs / "single")
    for key in ddp:  # same micro-batches; only the order of the gradient sum differs
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5)
    assert _losses(runs / "ddp") == pytest.approx(_losses(runs / "single"), rel=1e-5)
    assert {p.name for p in (runs / "ddp" / "checkpoints").iterdir()} == {"step-000002.pt"}
    assert _answers(runs / "ddp") == _answers(runs / "single")


def test_fsdp_matches_ddp_and_one_process_and_evaluates(runs, tiny):
    fsdp, ddp, single = (_adapter(runs / name) for name in ("fsdp", "ddp", "single"))
    for key in (k for k in fsdp if k.endswith("lora_B.weight")):  # [B, -B0]: B moved away from its init B0
        r = fsdp[key].shape[1] // 2
        assert not torch.allclose(fsdp[key][:, :r], -fsdp[key][:, r:])
    # Measured here: FSDP2 and DDP give the same bits (max difference 0.0): both average
    # the same two gradients; one process differs only in the order of the gradient sum.
    assert _max_difference(fsdp, ddp) <= 1e-6
    for key in fsdp:
        torch.testing.assert_close(fsdp[key], single[key], rtol=1e-4, atol=1e-5)
    assert _losses(runs / "fsdp") == pytest.approx(_losses(runs / "single"), rel=1e-5)
    shards = runs / "fsdp" / "checkpoints" / "step-000002"
    assert {".metadata", "trainer_state.pt", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in shards.iterdir()}
    assert [p.name for p in (runs / "fsdp" / "checkpoints").iterdir()] == ["step-000002"]  # no temp left
    # rank 0 rebuilt the model from the base and the written adapter: the same answers
    # as the trained model in memory, and not the base model's
    assert _answers(runs / "fsdp") == _answers(runs / "single") != _answers(runs / "base")


def test_accelerate_launch_with_its_fsdp_config_runs_the_same(runs):
    assert _max_difference(_adapter(runs / "accelerate"), _adapter(runs / "fsdp")) == 0.0
    assert "strategy: fsdp" in (runs / "accelerate" / "config.yaml").read_text()
    assert _answers(runs / "accelerate") == _answers(runs / "fsdp")


def test_fsdp_resume_after_sigkill_is_bit_identical(tiny, tmp_path):
    steps, fsdp = 16, ["--grad-accum", "1", "--strategy", "fsdp", "--save-every", "3"]  # dropout 0.1: RNG restored
    full = _start(TORCHRUN, tiny_train_args(tiny, tmp_path / "full", steps, *fsdp))
    _finish(full)  # one at a time: 2 cores
    killed = tmp_path / "killed"
    victim = _start(TORCHRUN, tiny_train_args(tiny, killed, steps, *fsdp, "--keep-checkpoints", "0"))
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step-000006").exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both workers, as a lost machine
    victim.wait()
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before the kill"
    assert list_checkpoints(killed)[-1][0] < steps
    out = _run(TORCHRUN, tiny_train_args(tiny, killed, steps, *fsdp, "--resume"))
    assert f"continuing from {killed / 'checkpoints'}" in out
    a, b = _adapter(tmp_path / "full"), _adapter(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same world size: same bits
    assert _losses(tmp_path / "full") == _losses(killed)


def test_quantized_base_under_ddp_and_fsdp_matches_one_process(tiny, tmp_path):
    common = ["--dropout", "0.0", "--lr", "2e-2", "--quantize", "nf4", "--save-every", "1"]
    _run([*PYTHON, "dude.cli"], tiny_train_args(tiny, tmp_path / "single", 2, *common, "--grad-accum", "2"))
    for strategy in ("ddp", "fsdp"):
        _run(TORCHRUN, tiny_train_args(tiny, tmp_path / strategy, 2, *common, "--grad-accum", "1", "--strategy", strategy))
    single = _adapter(tmp_path / "single")
    for strategy in ("ddp", "fsdp"):  # measured: the same bits as one process
        assert _max_difference(_adapter(tmp_path / strategy), single) <= 1e-5
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000001" / ".metadata").exists()


@pytest.mark.parametrize("env, message", [
    ({"FSDP_VERSION": "1"}, "fsdp_version 1.*set fsdp_version: 2"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
])
def test_accelerate_fsdp_settings_dude_cannot_honour_are_refused(monkeypatch, env, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        distributed.launcher_strategy("ddp")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert distributed.launcher_strategy("ddp") == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert distributed.launcher_strategy("ddp") == "ddp"
