"""``dude eval --adapter RUN --tasks heldout`` on a run trained on a file scores exactly
the rows that run held out: the data options come from the run's ``config.yaml``, options
that contradict its split are refused, and a run that held out nothing says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import make_math_file, make_tiny_model_dir

from dude.cli import main
from dude.train.config import DataConfig
from dude.train.tasks import train_examples

SPLIT = ["--eval-fraction", "0.25", "--split-seed", "7"]  # not dude eval's defaults (0.1, 0)


def _train(root: Path, model: Path, path: Path, name: str, split: list[str], tasks: list[str]) -> Path:
    out = root / name
    assert main(["train", "--name-or-path", str(model), "--task", "file", "--path", str(path), *split,
                 "--tasks", *tasks, "--max-new-tokens", "4", "--method", "dude", "--adapter.r", "2", "--steps", "1",
                 "--optim-batch-size", "2", "--output-dir", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Two tiny runs on a 40-row math file: one holds out 0.25 with split seed 7 (and scores
    it after training), one trains on every row."""
    root = tmp_path_factory.mktemp("eval_run")
    path = make_math_file(root / "math.jsonl", n=40)
    model = make_tiny_model_dir(root / "model", smollm2_dir)
    return {"path": path, "model": model, "split": _train(root, model, path, "split", SPLIT, ["heldout"]),
            "all": _train(root, model, path, "all", ["--eval-fraction", "0"], [])}


def _eval(run: Path, out: Path, *extra: str) -> int:
    return main(["eval", "--adapter", str(run), "--tasks", "heldout", "--max-new-tokens", "4",
                 "--output-dir", str(out), *extra])


def test_eval_of_a_run_scores_the_rows_it_held_out(runs, tmp_path):
    assert _eval(runs["split"], tmp_path) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())["results"]["heldout"]["predictions"]
    rows = [json.loads(line)["question"] for line in runs["path"].read_text().splitlines()]
    trained = {ex["question"] for ex in train_examples(DataConfig(task="file", path=str(runs["path"]),
                                                                  eval_fraction=0.25, split_seed=7))}
    held = sorted(q for q in rows if q not in trained)
    assert len(held) == 10 and sorted(p["question"] for p in scored) == held  # every held-out row, no other
    # the same rows, answered the same, as the evaluation at the end of training
    assert scored == json.loads((runs["split"] / "eval.json").read_text())["heldout"]["predictions"]


@pytest.mark.parametrize("flag, value, option", [
    ("--split-seed", "0", "data.split_seed"),
    ("--eval-fraction", "0.1", "data.eval_fraction"),
    ("--format", "instruction", "data.format"),
])
def test_options_that_contradict_the_runs_split_are_refused(runs, tmp_path, capsys, flag, value, option):
    assert _eval(runs["split"], tmp_path, flag, value) == 2
    err = capsys.readouterr().err
    assert f"{option} is" in err and "config.yaml" in err
    assert not (tmp_path / "eval.json").exists()


def test_a_run_trained_on_every_row_has_no_heldout_set(runs, tmp_path, capsys):
    assert _eval(runs["all"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "data.eval_fraction 0" in err and "--eval-path" in err
    assert not (tmp_path / "eval.json").exists()
    # a held-out file given by the user is scored, read like the training file
    other = make_math_file(tmp_path / "other.jsonl", n=3)
    assert _eval(runs["all"], tmp_path, "--eval-path", str(other)) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["heldout"]["n"] == 3



def test_a_data_file_edited_since_training_is_refused(runs, tmp_path, capsys):
    """The run recorded its file's sha256 (data-files.json): edited, 'heldout' would be other
    rows, so dude eval refuses it by name; restored, it goes on. --resume likewise."""
    record = json.loads((runs["split"] / "data-files.json").read_text())
    assert set(record) == {"data.path"} and record["data.path"]["file"] == str(runs["path"])
    original = runs["path"].read_text()
    try:
        runs["path"].write_text(original.replace("\n", "\n\n", 1))  # a blank line: the same rows, other bytes
        assert _eval(runs["split"], tmp_path / "e") == 2
        err = capsys.readouterr().err
        assert "data.path" in err and "changed since the run" in err and "--tasks file:" in err, err
    finally:
        runs["path"].write_text(original)
    assert _eval(runs["split"], tmp_path / "restored") == 0

    path = tmp_path / "copy.jsonl"
    path.write_text(original)
    args = ["train", "--name-or-path", str(runs["model"]), "--task", "file", "--path", str(path), "--tasks",
            "--method", "lora", "--adapter.r", "2", "--steps", "2", "--save-every", "1", "--optim-batch-size", "2",
            "--output-dir", str(tmp_path / "r"), "--no-progress"]
    assert main(args) == 0
    path.write_text(original + original.splitlines()[0] + "\n")
    assert main([*args, "--resume"]) == 2
    assert "changed since the run" in capsys.readouterr().err
