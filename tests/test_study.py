"""The paper-claims study (studies/paper_claims): cache keys, resume, lr choice, report.

The fast tests run the study's plan with a fake runner that writes the files a real run
writes (synthetic numbers); the --quick subset itself is behind ``--runslow``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

STUDY_DIR = Path(__file__).resolve().parents[1] / "studies" / "paper_claims"
sys.path.insert(0, str(STUDY_DIR))

from claims import compare  # noqa: E402
import yaml  # noqa: E402
from dude.train.options import to_dict  # noqa: E402
from plan import StudyConfig, TaskBudget, config_key, saved_key, train_config  # noqa: E402
from report import write_report  # noqa: E402
from runner import Study  # noqa: E402

TINY = StudyConfig(
    name="tiny",
    tasks=[TaskBudget("gsm_symbolic", max_length=64, steps=20, batch_size=2, eval_limit=50, mmlu_limit=40,
                      val_limit=8)],
    methods=("lora", "dora", "pissa", "dude"),
    lr_grid={"lora": [1e-3, 3e-3, 1e-2], "dora": [1e-3, 3e-3], "pissa": [1e-4, 3e-4], "dude": [1e-4, 3e-4]},
    seeds=[0, 1, 2], ranks=[4, 16, 64],
)
BEST = {"lora": 3e-3, "dora": 1e-3, "pissa": 3e-4, "dude": 1e-4}  # the fake's validation minima


class FakeRunner:
    """Writes a run's files with numbers from its record: DuDe's loss falls fastest."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, command: str, cfg, out: Path, record: dict) -> bool:
        self.calls.append(record)
        out.mkdir(parents=True, exist_ok=True)
        if record["phase"] == "base":
            (out / "eval.json").write_text(json.dumps({"results": {"heldout": {"accuracy": 0.1, "n": 50},
                                                                   "mmlu": {"accuracy": 0.3, "n": 40}}}))
        else:
            m, seed = record["method"], record["seed"]
            rate = {"lora": 0.05, "dora": 0.05, "pissa": 0.07, "dude": 0.09}[m]
            lines = [{"step": s, "loss": 2.0 * math.exp(-rate * s) + 0.01 * seed} for s in range(1, 21)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            (out / "summary.json").write_text(json.dumps({"wall_time_s": 10.0, "peak_memory_mb": 900.0,
                                                          "trainable_parameters": 1000}))
            if record["phase"] == "sweep":
                (out / "val.json").write_text(json.dumps({"val_loss": 1.0 + abs(math.log(record["lr"] / BEST[m]))}))
            else:
                acc = {"lora": 0.2, "dora": 0.2, "pissa": 0.25, "dude": 0.4}[m] + 0.01 * seed
                (out / "eval.json").write_text(json.dumps({  # as dude train writes it: no "results"
                    "heldout": {"accuracy": acc, "n": 50}, "mmlu": {"accuracy": 0.28, "n": 40}}))
        (out / "record.json").write_text(json.dumps(record))
        return True


def test_config_key_is_the_resolved_config(tmp_path):
    budget = TINY.tasks[0]
    a = train_config(TINY, budget, "dude", 1e-4, 0, 16, "main", tmp_path)
    moved = dataclasses.replace(a, run=dataclasses.replace(a.run, output_dir="elsewhere", overwrite=True))
    assert config_key(a) == config_key(moved)  # where it is written does not change the result
    lora = train_config(TINY, budget, "lora", 1e-3, 0, 16, "main", tmp_path)
    other_svd = dataclasses.replace(lora.adapter, svd_niter=3)
    assert config_key(dataclasses.replace(lora, adapter=other_svd)) == config_key(lora)  # LoRA does no SVD
    assert config_key(dataclasses.replace(a, adapter=dataclasses.replace(a.adapter, svd_niter=3))) != config_key(a)
    other_lr = dataclasses.replace(a, optim=dataclasses.replace(a.optim, lr=2e-4))
    other_seed = train_config(TINY, budget, "dude", 1e-4, 1, 16, "main", tmp_path)
    assert len({config_key(a), config_key(other_lr), config_key(other_seed)}) == 3
    sweep = train_config(TINY, budget, "dude", 1e-4, 0, 16, "sweep", tmp_path)
    key = config_key(sweep)
    (tmp_path / "run").mkdir()  # the key survives the YAML round trip of run-config.yaml (alpha 16 vs 16.0)
    (tmp_path / "run" / "run-config.yaml").write_text(yaml.safe_dump(to_dict(sweep), sort_keys=False))
    assert saved_key(tmp_path / "run") == key
    elsewhere = train_config(TINY, budget, "dude", 1e-4, 0, 16, "sweep", tmp_path / "moved")
    assert config_key(elsewhere) == key  # the same files under another study folder: the same runs
    Path(sweep.data.path).write_text(Path(sweep.data.path).read_text()[:-200] + "\n")
    assert config_key(sweep) != key  # the data file's content is part of the key


def test_fit_and_validation_split_share_no_template(tmp_path):
    cfg = train_config(TINY, TINY.tasks[0], "lora", 1e-3, 0, 16, "sweep", tmp_path)
    fit = [json.loads(x) for x in Path(cfg.data.path).read_text().splitlines()]
    val = [json.loads(x) for x in Path(cfg.data.eval_path).read_text().splitlines()]
    assert len(val) == 8 and len(fit) > 100
    assert not {r["question"] for r in fit} & {r["question"] for r in val}
    from dude.data import load_task

    test_questions = {r["question"] for r in load_task("gsm_symbolic", "test")}
    assert not test_questions & ({r["question"] for r in fit} | {r["question"] for r in val})


def test_study_runs_once_resumes_and_reports(tmp_path):
    fake = FakeRunner()
    study = Study(TINY, tmp_path, runner=fake, log=lambda m: None)
    study.run(max_runs=5)  # an interrupted sitting: base + 4 sweep runs
    assert len(fake.calls) == 5
    write_report(study, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    n_sweep = sum(len(v) for v in TINY.lr_grid.values())
    total = 1 + n_sweep + 4 * 3 + 4 * 2
    assert f"Status: incomplete: 5 of {total} runs finished; {total - 5} missing" in text
    assert "wait for this method's lr sweep" in text
    assert "| **missing** |" in text

    study.run()  # the next sitting finishes the rest, without redoing the first five
    keys = [c["key"] for c in fake.calls]
    assert len(keys) == len(set(keys))
    assert len(keys) == total
    assert study.best_lrs(TINY.tasks[0]) == BEST
    assert {c["lr"] for c in fake.calls if c["phase"] == "main" and c["method"] == "lora"} == {BEST["lora"]}

    again = Study(TINY, tmp_path, runner=fake, log=lambda m: None)
    again.run()
    assert len(fake.calls) == len(keys) and again.skipped == len(keys)  # all cached

    victim = next(c for c in fake.calls if c["phase"] == "main")  # a run killed before it finished
    (tmp_path / "runs" / victim["key"] / "record.json").unlink()
    again.run()
    assert fake.calls[-1]["key"] == victim["key"] and len(fake.calls) == len(keys) + 1

    write_report(again, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "Status: complete" in text and (tmp_path / "plots" / "tiny-gsm_symbolic-loss.png").stat().st_size > 5000
    # DuDe 40-42% vs 20-22% on 50 problems x 3 seeds is beyond 2 standard errors
    line = next(x for x in text.splitlines() if x.startswith("| Higher held-out accuracy on math"))
    assert "**holds**" in line and "DuDe 41.0 ± 1.0" in line
    line = next(x for x in text.splitlines() if x.startswith("| Preserves pretrained"))
    assert "**inconclusive**" in line  # identical MMLU change for all methods
    assert "dude train --config configs/paper/dude_llama2_7b_metamath.yaml" in text


def test_parallel_workers_respect_the_sweep(tmp_path):
    """Two workers (``--jobs 2``) run every planned run once, and a main or rank run only
    after its method's whole sweep has finished."""
    import threading
    import time

    fake, order, lock = FakeRunner(), [], threading.Lock()

    def slow(command, cfg, out, record):
        time.sleep(0.01 if record["phase"] == "sweep" else 0.002)  # let the workers overlap
        with lock:
            order.append((record["phase"], record.get("method"), "start"))
        ok = fake(command, cfg, out, record)
        with lock:
            order.append((record["phase"], record.get("method"), "end"))
        return ok

    study = Study(TINY, tmp_path, runner=slow, log=lambda m: None)
    study.run(jobs=2)
    keys = [c["key"] for c in fake.calls]
    total = 1 + sum(len(v) for v in TINY.lr_grid.values()) + 4 * 3 + 4 * 2
    assert len(keys) == len(set(keys)) == total and study.ran == total
    for method, grid in TINY.lr_grid.items():
        last_sweep_end = max(i for i, e in enumerate(order) if e == ("sweep", method, "end"))
        first_later = min(i for i, e in enumerate(order) if e[1] == method and e[0] != "sweep")
        assert first_later > last_sweep_end


def test_a_task_without_rank_ablation_plans_and_reports_none(tmp_path):
    no_ranks = dataclasses.replace(TINY, tasks=[dataclasses.replace(TINY.tasks[0], rank_ablation=False)])
    fake = FakeRunner()
    study = Study(no_ranks, tmp_path, runner=fake, log=lambda m: None)
    study.run()
    total = 1 + sum(len(v) for v in TINY.lr_grid.values()) + 4 * 3
    assert study.total_runs() == total == len(fake.calls)
    assert not [c for c in fake.calls if c["phase"] == "rank"]
    write_report(study, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "Status: complete" in text and "### Rank ablation" not in text
    assert "r in [4, 16, 64] (alpha = r), seed 0, on no task" in text


def test_uniform_guess_floor_of_a_multiple_choice_validation_set(tmp_path):
    from types import SimpleNamespace

    from report import _guess_floor

    rows = [{"question": "q1", "choices": ["a", "b", "c"], "answer": 0},
            {"question": "q2", "choices": ["a", "b"], "answer": 1}]
    (tmp_path / "mc-val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = SimpleNamespace(data_dir=tmp_path)
    data = {"rows": [{"phase": "sweep", "task": "mc", "val": {"examples": 2, "tokens": 6}}]}
    assert _guess_floor(study, data, "mc") == pytest.approx((math.log(3) + math.log(2)) / 6)
    data["rows"][0]["val"]["examples"] = 3  # a validation set that is not this file: no floor
    assert _guess_floor(study, data, "mc") is None
    assert _guess_floor(study, {"rows": []}, "mc") is None


def test_verdict_rule():
    assert compare((0.5, 0.01, 3), (0.3, 0.01, 3), True)[0] == "holds"
    assert compare((0.3, 0.01, 3), (0.5, 0.01, 3), True)[0] == "does not hold"
    assert compare((0.31, 0.05, 3), (0.30, 0.05, 3), True)[0] == "inconclusive"
    # one seed each: the binomial error of 60 problems decides; 8% vs 5% is noise
    assert compare((0.08, None, 1), (0.05, None, 1), True, n_eval=60)[0] == "inconclusive"
    assert compare((0.2, None, 1), (0.3, None, 1), False)[0] == "inconclusive"  # no noise estimate


@pytest.mark.slow
def test_quick_subset_runs_and_resumes(tmp_path):
    """The --quick subset end to end on the real model (~10-20 min on 2 cores)."""
    run = [sys.executable, str(STUDY_DIR / "run.py"), "--quick", "--root", str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (tmp_path / "REPORT-quick.md").read_text()
    assert "Status: complete" in report and "## Verdicts" in report
    second = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "ran 0, failed 0" in second.stdout
