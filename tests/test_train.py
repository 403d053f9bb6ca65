"""The training loop on tiny seeded models: schedule, data order, files written, a
resume after SIGKILL that ends bit-identical, the NaN stop, the output-dir guard."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_llama

from dude.train import TrainConfig, TrainingDiverged, train
from dude.train.batches import DataOrder
from dude.train.checkpoint import list_checkpoints
from dude.train.optim import lr_factor
from dude.train.options import build

RUN_FILES = {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "loss.png", "metrics.jsonl",
             "summary.json"}


class _Tok:
    pad_token_id = 0


def _examples(n: int = 24, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (6 + i % 9,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def _cfg(out: Path, method: str = "dude", **run) -> TrainConfig:
    return build(TrainConfig, {
        "adapter": {"method": method, "r": 4, "alpha": 8},
        "optim": {"steps": 6, "lr": 1e-2, "batch_size": 2, "grad_accum": 2},
        "run": {"output_dir": str(out), "progress": False, **run}})


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def test_warmup_then_cosine():
    cfg = build(TrainConfig, {"optim": {"steps": 20, "warmup_ratio": 0.2, "min_lr_ratio": 0.1}}).optim
    factors = [lr_factor(s, cfg) for s in range(20)]
    assert factors[:4] == sorted(factors[:4]) and factors[3] < 1.0  # rising through warmup
    assert factors[4] == pytest.approx(1.0)
    assert factors[4:] == sorted(factors[4:], reverse=True) and factors[-1] > 0.1


def test_data_order_two_ranks_see_what_one_rank_accumulates():
    one = DataOrder(10, batch_size=2, grad_accum=2, world_size=1, seed=3)
    two = DataOrder(10, batch_size=2, grad_accum=1, world_size=2, seed=3)
    for step in range(7):  # crosses epoch boundaries
        assert [one.micro_batch(step, k, 0) for k in range(2)] == [two.micro_batch(step, 0, r) for r in range(2)]
    seen = [i for step in range(5) for k in range(2) for i in one.micro_batch(step, k, 0)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs


def test_train_writes_the_run_and_learns(tmp_path):
    examples = _examples()
    result = train(_cfg(tmp_path / "run"), tiny_llama(), _Tok(), examples[:4])  # 4 examples: memorise
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} == RUN_FILES
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert set(lines[0]) >= {"step", "loss", "lr", "tokens_per_s", "elapsed_s"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] == pytest.approx(result.final_loss)
    import dude

    reloaded = dude.load(tiny_llama(), out)  # the saved adapter is the trained one
    assert any(not torch.allclose(p, torch.zeros_like(p)) for p in dude.adapter_parameters(reloaded))


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out), tiny_llama(), _Tok(), _examples())
    before = _adapter(out)
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(_cfg(out), tiny_llama(), _Tok(), _examples())
    assert all(torch.equal(before[k], v) for k, v in _adapter(out).items())  # nothing lost
    with pytest.raises(ValueError, match=r"differs .*optim.lr"):
        changed = _cfg(out, resume=True)
        changed.optim.lr = 5e-3
        train(changed, tiny_llama(), _Tok(), _examples())
    (out / "keep.txt").write_text("the user's")
    train(_cfg(out, "lora", overwrite=True), tiny_llama(), _Tok(), _examples())
    assert (out / "keep.txt").read_text() == "the user's"  # --overwrite clears only our files
    assert json.loads((out / "summary.json").read_text())["method"] == "lora"


@pytest.mark.parametrize("problem, message", [
    ("bad_row", "row 2: field 'question' is empty"),  # check_files converts the first row only
    ("rank", "lower AdapterConfig.r"),  # a rank larger than a layer shows when the adapter is applied
])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_start_leaves_no_trace(problem, message, existing, tmp_path, smollm2_dir, capsys):
    """An error found after the run folder is made removes the folders train() made (still
    empty), and keeps one the user made."""
    from dude.cli import main

    path = make_math_file(tmp_path / "math.jsonl", n=6)
    if problem == "bad_row":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[2]["question"] = " "
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = make_tiny_model_dir(tmp_path / "model", smollm2_dir)  # hidden size 32
    out = tmp_path / "runs" / "new" / "run"
    if existing:
        out.mkdir(parents=True)
    assert main(["train", "--name-or-path", str(model_dir), "--task", "file", "--path", str(path),
                 "--eval-fraction", "0", "--tasks", "--adapter.r", "64" if problem == "rank" else "2",
                 "--steps", "1", "--output-dir", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    if existing:
        assert out.is_dir() and not any(out.iterdir())
    else:
        assert not (tmp_path / "runs").exists()


def test_resume_refuses_another_global_batch(tmp_path):
    """optim.grad_accum may change on --resume only with the number of processes, keeping
    the global batch of the checkpoint (batch_size x grad_accum x processes): in one
    process a change is refused, naming the value that keeps it. A checkpoint from before
    the global batch was recorded is checked against the run's config.yaml."""
    out = tmp_path / "run"
    train(_cfg(out, save_every=2), tiny_llama(), _Tok(), _examples())
    changed = _cfg(out, save_every=2, resume=True)
    changed.optim.grad_accum = 1
    refusal = r"global batch of 4 examples .* optim.grad_accum 1 give 2: resume with --grad-accum 2"
    with pytest.raises(ValueError, match=refusal):
        train(changed, tiny_llama(), _Tok(), _examples())
    path = list_checkpoints(out)[-1][1]
    legacy = torch.load(path, weights_only=True)
    assert legacy.pop("global_batch") == 4
    torch.save(legacy, path)
    path.with_name(path.name + ".manifest.json").unlink()  # as written before manifests existed
    with pytest.raises(ValueError, match=refusal):
        train(changed, tiny_llama(), _Tok(), _examples())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_llama()
    calls = {"n": 0}

    def poison(module, args, output):  # from the 9th forward (step 5) the logits are NaN
        calls["n"] += 1
        if calls["n"] > 8:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 5: loss is nan.*step-000004.*optim.lr"):
        train(_cfg(out, save_every=2), model, _Tok(), _examples())
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert not (out / "adapter_model.safetensors").exists()


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    plain = train(_cfg(tmp_path / "a"), tiny_llama(), _Tok(), _examples())
    ckpt = train(_cfg(tmp_path / "b", gradient_checkpointing=True), tiny_llama(), _Tok(), _examples())
    assert ckpt.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ------------------------------------------------------- resume after a real SIGKILL


def make_tiny_model_dir(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_math_file(path: Path, n: int = 40) -> Path:
    import random

    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            fh.write(json.dumps({"question": f"Ann has {a} pens and gets {b} more. How many pens?",
                                 "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_model_dir(root / "model", smollm2_dir)
    make_math_file(root / "math.jsonl")
    return root


def tiny_train_args(tiny: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--name-or-path", str(tiny / "model"), "--task", "file", "--path", str(tiny / "math.jsonl"),
            "--max-length", "96", "--method", "dude", "--adapter.r", "4", "--alpha", "8", "--dropout", "0.1",
            "--steps", str(steps), "--lr", "5e-3", "--optim-batch-size", "2", "--grad-accum", "2",
            "--output-dir", str(out), "--no-progress", *extra]


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dude.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill_is_bit_identical(tiny_dir, tmp_path):
    steps = 40
    full = _cli(tiny_train_args(tiny_dir, tmp_path / "full", steps))
    killed_dir = tmp_path / "killed"
    victim = _cli(tiny_train_args(tiny_dir, killed_dir, steps, "--save-every", "5", "--keep-checkpoints", "0"))
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoints" / "step-000010.pt").exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed_dir / "adapter_model.safetensors").exists(), "the run finished before the kill"
    assert (killed_dir / ".dude.lock").exists()  # left by the killed run: its flock died with it, so no block
    last = list_checkpoints(killed_dir)[-1][0]
    assert last < steps
    resumed = _cli(tiny_train_args(tiny_dir, killed_dir, steps, "--save-every", "5", "--resume"))
    out_resumed, _ = resumed.communicate(timeout=300)
    out_full, _ = full.communicate(timeout=300)
    assert resumed.returncode == 0, out_resumed
    assert full.returncode == 0, out_full
    assert f"continuing from {killed_dir / 'checkpoints'}" in out_resumed
    a, b = _adapter(tmp_path / "full"), _adapter(killed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "full", killed_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == steps


def test_resume_on_a_4bit_base_is_bit_identical(tiny_dir, tmp_path):
    """QDuDe (residual in NF4, two LoftQ alternations) resumed by a fresh process from a
    step-3 checkpoint: the 4-bit model is rebuilt from the base and ends bit-identical."""
    def run(out: Path, *extra: str) -> str:
        proc = _cli(tiny_train_args(tiny_dir, out, 6, "--quantize", "nf4", "--quant-iters", "2", "--save-every", "3",
                                    "--keep-checkpoints", "0", *extra))
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        return output

    run(tmp_path / "full")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json", "checkpoints/step-000006.pt"):
        (cut / name).unlink(missing_ok=True)
    assert [s for s, _ in list_checkpoints(cut)] == [3]
    assert f"continuing from {cut / 'checkpoints' / 'step-000003.pt'}" in run(cut, "--resume")
    a, b = _adapter(tmp_path / "full"), _adapter(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "full", cut)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
