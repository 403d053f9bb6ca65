"""Run the plan with an on-disk cache: ``<root>/runs/<key>/`` per run, skipped once finished.

A run directory holds what ``dude train`` writes (config, metrics.jsonl, summary.json,
eval.json; the adapter weights are gitignored) plus ``record.json``: the run's place in
the study (phase, task, method, lr, seed, r). A run is *finished* when its summary, its
evaluation (main/rank runs) or validation loss (sweep runs) and record are there; an
unfinished directory (a killed run) is started over. Each run is its own process, so
peak memory is per run and one failure does not stop the study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from dude.train.options import to_dict

from plan import (StudyConfig, TaskBudget, ablation_ranks, base_config, config_key, main_specs, rank_specs,
                  sweep_specs, with_output)

HERE = Path(__file__).resolve().parent


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def finished(out: Path, phase: str) -> bool:
    needed = ["summary.json", "record.json", "val.json" if phase == "sweep" else "eval.json"]
    if phase == "base":
        needed = ["eval.json", "record.json"]
    return all((out / name).is_file() for name in needed)


def _python(args: list[str], log: Path) -> int:
    # One thread per run: on a shared 2-core machine two OpenMP threads per process spin
    # against the other jobs' threads (a 3-step smoke run took minutes); STUDY_THREADS overrides.
    threads = os.environ.get("STUDY_THREADS", "1")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as fh:
        return subprocess.run([sys.executable, *args], env=env, stdout=fh, stderr=subprocess.STDOUT).returncode


def execute(command: str, cfg: Any, out: Path, record: dict[str, Any]) -> bool:
    """``dude <command>`` on ``cfg`` into ``out`` (then the validation loss for sweep runs)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = with_output(cfg, out)
    if command == "train":
        cfg.run.overwrite = True  # an unfinished run of the same config is started over
    path = out / "run-config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log = out / "run.log"
    start = time.perf_counter()
    code = _python(["-m", "dude.cli", command, "--config", str(path)], log)
    if code == 0 and record["phase"] == "sweep":
        code = _python([str(HERE / "valloss.py"), str(out)], log)
    if code != 0:
        return False
    _write(out / "record.json", {**record, "process_seconds": round(time.perf_counter() - start, 1),
                                 "threads": int(os.environ.get("STUDY_THREADS", "1"))})
    return True


class Study:
    """The plan of a study and its cache under ``root/runs``.

    ``runner(command, cfg, out, record) -> bool`` does one run (tests pass a fake)."""

    def __init__(self, study: StudyConfig, root: Path, runner: Callable[..., bool] = execute,
                 log: Callable[[str], None] = print):
        self.study, self.root, self.runner, self.log = study, root, runner, log
        self.runs_dir = root / "runs"
        self.data_dir = root / "data"
        self.ran = self.skipped = self.failed = 0

    def _do(self, command: str, cfg: Any, key: str, record: dict[str, Any]) -> None:
        out = self.runs_dir / key
        if finished(out, record["phase"]):
            self.skipped += 1
            return
        label = " ".join(f"{k}={v}" for k, v in record.items() if k != "study")
        self.log(f"[{time.strftime('%H:%M:%S')}] run {key}: {label}")
        start = time.perf_counter()
        ok = self.runner(command, cfg, out, {**record, "key": key})
        self.ran += ok
        self.failed += not ok
        self.log(f"[{time.strftime('%H:%M:%S')}]   {'done' if ok else 'FAILED (see run.log)'} "
                 f"in {time.perf_counter() - start:.0f} s")

    def best_lrs(self, budget: TaskBudget) -> dict[str, float]:
        """method -> lr of lowest validation loss, for methods whose whole sweep finished."""
        best = {}
        for method in self.study.methods:
            losses = {}
            for spec in sweep_specs(self.study, budget, self.data_dir):
                out = self.runs_dir / spec.key
                if spec.method == method and finished(out, "sweep"):
                    losses[spec.lr] = json.loads((out / "val.json").read_text())["val_loss"]
            if len(losses) == len(self.study.lr_grid[method]):
                best[method] = min(losses, key=losses.get)
        return best

    def plan(self) -> list[tuple[str, Any, str, dict[str, Any]]]:
        """Every run that can be planned now, in the order they run: per task the base
        eval, the sweep and the main runs; then the rank ablations (least needed last)."""
        items, ranks = [], []
        for budget in self.study.tasks:
            base = base_config(budget)
            items.append(("eval", base, config_key(base), {"phase": "base", "task": budget.task}))
            best = self.best_lrs(budget)
            specs = sweep_specs(self.study, budget, self.data_dir) + main_specs(self.study, budget, best, self.data_dir)
            items += [("train", s.config, s.key, {"study": self.study.name, **s.describe()}) for s in specs]
            ranks += [("train", s.config, s.key, {"study": self.study.name, **s.describe()})
                      for s in rank_specs(self.study, budget, best, self.data_dir)]
        return items + ranks

    def run(self, max_runs: int | None = None, jobs: int = 1) -> None:
        """Run what is not finished, phase by phase (a finished sweep unlocks the later
        phases, so the plan is recomputed whenever a run ends). ``jobs`` runs go side by
        side, each its own one-thread process; a worker with nothing plannable waits for
        the others (their sweep may unlock more)."""
        attempted: set[str] = set()
        busy: set[str] = set()
        lock = threading.Condition()

        def next_item() -> tuple | None:
            with lock:
                while True:
                    if max_runs is not None and self.ran + self.failed + len(busy) >= max_runs:
                        return None
                    todo = [i for i in self.plan()
                            if i[2] not in attempted and not finished(self.runs_dir / i[2], i[3]["phase"])]
                    if todo:
                        attempted.add(todo[0][2])
                        busy.add(todo[0][2])
                        return todo[0]
                    if not busy:
                        lock.notify_all()
                        return None
                    lock.wait()

        def worker() -> None:
            while (item := next_item()) is not None:
                try:
                    self._do(*item)
                finally:
                    with lock:
                        busy.discard(item[2])
                        lock.notify_all()

        threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.skipped = sum(finished(self.runs_dir / i[2], i[3]["phase"]) for i in self.plan()) - self.ran

    def missing(self) -> list[dict[str, Any]]:
        """Records of planned runs not finished, plus the phases still locked by a sweep."""
        out = [dict(i[3], key=i[2]) for i in self.plan() if not finished(self.runs_dir / i[2], i[3]["phase"])]
        for budget in self.study.tasks:
            best = self.best_lrs(budget)
            for m in self.study.methods:
                if m not in best:
                    n_rank = len(ablation_ranks(self.study, budget))
                    out.append({"phase": "main+rank", "task": budget.task, "method": m,
                                "note": f"{len(self.study.seeds)} main + {n_rank} rank runs, not planned "
                                        "yet: they wait for this method's lr sweep", "count": len(self.study.seeds) + n_rank})
        return out

    def total_runs(self) -> int:
        """Runs in the whole study once every sweep has picked its lr."""
        s = self.study
        return sum(1 + sum(len(s.lr_grid[m]) for m in s.methods)
                   + len(s.methods) * (len(s.seeds) + len(ablation_ranks(s, b))) for b in s.tasks)

    def records(self) -> list[dict[str, Any]]:
        """Every finished run of this study's plan, with its files read."""
        rows = []
        for command, cfg, key, record in self.plan():
            out = self.runs_dir / key
            if finished(out, record["phase"]):
                rows.append(load_record(out))
        return rows


def load_record(out: Path) -> dict[str, Any]:
    def read(name: str) -> Any:
        return json.loads((out / name).read_text()) if (out / name).is_file() else None

    row = read("record.json")
    metrics = out / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    row["steps"] = [r["step"] for r in lines]
    row["loss"] = [r["loss"] for r in lines]
    row["summary"] = read("summary.json")
    row["val"] = read("val.json")
    evaluation = read("eval.json") or {}
    results = evaluation.get("results", evaluation)  # dude eval wraps them, dude train does not
    results = {k: v for k, v in results.items() if isinstance(v, dict) and "accuracy" in v}
    row["accuracy"] = {k: v["accuracy"] for k, v in results.items()}
    row["eval_n"] = {k: v["n"] for k, v in results.items()}
    return row
