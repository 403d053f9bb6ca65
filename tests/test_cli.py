"""Each ``dude`` command end to end on the real SmolLM2-135M with tiny budgets, checking
the exact files written; and the errors a user sees for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dude.cli import main

ROOT = Path(__file__).parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
TRAIN_FILES = {"adapter_config.json", "adapter_model.safetensors", "checkpoints", "config.yaml", "eval.json",
               "loss.png", "metrics.jsonl", "summary.json"}


@pytest.mark.parametrize("command", ["train", "eval", "compare", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--config YAML" in text and "model options (YAML section 'model:')" in text


@pytest.mark.parametrize("args, message", [
    (["train", "--lr", "-1"], "optim.lr must be > 0"),
    (["train", "--task", "gsm9k"], "data.task must be one of"),
    (["train", "--config", "nope.yaml"], "--config: no such file 'nope.yaml'"),
    (["train", "--task", "file", "--path", "missing.jsonl", "--output-dir", "{tmp}/x"], "missing.jsonl"),
    (["train", "--tasks", "file:missing.jsonl", "--output-dir", "{tmp}/x"], "eval.tasks: eval set"),
    (["export", "--output-dir", "{tmp}/x"], "export.adapter is required"),
    (["eval", "--adapter", "{tmp}/nothing", "--output-dir", "{tmp}/x"], "--adapter '.*nothing' is not a directory"),
    (["train", "--output-dir", "{tmp}/a_file/run", "--steps", "1", "--tasks"], "Not a directory: '.*a_file/run'"),
    (["train", "--lr", "inf"], "option optim.lr must be a finite number, got .?inf"),
    (["train", "--task", "file", "--path", "{tmp}", "--output-dir", "{tmp}/x"], "does not exist or is not a file"),
])
def test_bad_input_exits_2_naming_the_option(args, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re

    assert re.search(message, err), err


def test_print_config_resolves_yaml_and_flags(capsys):
    assert main(["train", "--config", SMOKE, "--lr", "3e-4", "--adapter.r", "4", "--print-config"]) == 0
    import yaml

    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 3e-4 and resolved["adapter"]["r"] == 4
    assert resolved["optim"]["steps"] == 3 and resolved["adapter"]["svd"] == "randomized"  # from the YAML


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_dir) -> Path:
    """`dude train --config configs/smoke.yaml` on the real model (3 steps, tiny evals)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--config", SMOKE, "--name-or-path", str(smollm2_dir), "--output-dir", str(out),
                 "--no-progress"]) == 0
    return out


def test_train_writes_exactly_its_files(trained):
    assert {p.name for p in trained.iterdir()} == TRAIN_FILES
    assert {p.name for p in (trained / "checkpoints").iterdir()} == {"step-000002.pt", "step-000002.pt.manifest.json"}
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all({"step", "loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r) for r in lines)
    evaluation = json.loads((trained / "eval.json").read_text())
    assert evaluation["heldout"]["n"] == 2 and evaluation["mmlu"]["n"] == 8
    assert (trained / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_train_refuses_its_output_dir_again(trained, capsys):
    assert main(["train", "--config", SMOKE, "--output-dir", str(trained)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_eval_an_adapter(trained, tmp_path, smollm2_dir):
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(trained), "--name-or-path", str(smollm2_dir), "--tasks", "mmlu",
                 "--mmlu-limit", "8", "--output-dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"eval.json"}
    report = json.loads((out / "eval.json").read_text())
    # the same model, merged the same way, as evaluated at the end of training
    assert report["results"]["mmlu"]["predictions"] == json.loads((trained / "eval.json").read_text())["mmlu"][
        "predictions"]


def test_export_merges_into_a_plain_model(trained, tmp_path, smollm2_dir):
    import dude
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(trained), "--name-or-path", str(smollm2_dir),
                 "--output-dir", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _ = dude.load_model(smollm2_dir)
    dude.load(adapted, trained)
    base, _ = dude.load_model(smollm2_dir)
    x = torch.tensor([[1, 504, 3100, 314, 253, 1345, 30, 198]])
    with torch.no_grad():
        want, got, before = adapted.eval()(x).logits, merged(x).logits, base(x).logits
    assert not torch.allclose(want, before, atol=1e-4)  # the adapter moved away from init
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_report_smoothing_and_steps_to_target():
    from dude.compare.report import smoothed, steps_to

    curve = smoothed([4.0, 2.0, 3.0, 1.0], window=2)
    assert curve == [4.0, 3.0, 2.5, 2.0]
    assert steps_to(2.5, [1, 2, 3, 4], curve) == 3 and steps_to(1.0, [1, 2, 3, 4], curve) is None
