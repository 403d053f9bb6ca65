"""Run the plan with an on-disk cache: ``<root>/runs/<key>/`` per run, skipped once finished.

An item is one of three commands: ``train`` (``dude train``, then ``measures.py`` for the
measures its phase needs), ``base`` (``measures.py`` on the base model) or ``calib``
(``control.py``, the first-step update ratio). A run folder holds what ``dude train``
writes (config, metrics.jsonl, summary.json; adapter weights are gitignored), the
measures (measures.json) and ``record.json``. A train item is *finished* when it trained
(summary.json) and measures.json has every measure its phase needs, or when it diverged
(diverged.json: its validation loss counts as infinite). A run killed halfway resumes from
its newest checkpoint (every ``SAVE_EVERY`` steps; ``dude train --resume`` is bit-exact, so
a paused study computes what an uninterrupted one does); measures already computed are kept. Each command is its own process, so peak
memory is per run and one failure does not stop the study.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from dude.train.checkpoint import list_checkpoints
from dude.train.options import to_dict
from dude.train.runlock import FolderLock

from measures import measured
from plan import (StudyConfig, base_key, calib_key, calib_request, config_key, ladder, measure_request,
                  rank_runs_per_method, sweep_grid, train_config, with_output)

HERE = Path(__file__).resolve().parent
SAVE_EVERY = 15  # steps between checkpoints: a pause loses at most this many steps per run


@dataclass
class Item:
    """One planned unit of work: its command, cache key, place in the study and config."""

    command: str                      # train, base or calib
    key: str
    record: dict[str, Any]            # phase, method, lr, seed, r
    cfg: Any = None                   # TrainConfig of a train item
    request: dict[str, Any] = field(default_factory=dict)  # measure or calib request

    @property
    def phase(self) -> str:
        return self.record["phase"]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def finished(out: Path, item: Item) -> bool:
    if item.command == "calib":
        return (out / "update_ratio.json").is_file()
    if (out / "diverged.json").is_file():
        return True
    if item.command == "train" and not (out / "summary.json").is_file():
        return False
    return measured(read_json(out / "measures.json") or {}, item.request)


def _python(args: list[str], log: Path) -> tuple[int, float]:
    """(exit code, CPU seconds of the child: user + system, from its own rusage)."""
    # One thread per process: on a shared 2-core machine two OpenMP threads per process spin
    # against the other jobs' threads; STUDY_THREADS overrides.
    threads = os.environ.get("STUDY_THREADS", "1")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as fh:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time (workers run side by side)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _train(item: Item, out: Path, log: Path) -> tuple[int, float]:
    cfg = with_output(item.cfg, out)
    # save_every and resume are left out of the key: they do not change what a run computes
    cfg.run.save_every, cfg.run.keep_checkpoints = SAVE_EVERY, 1
    if (out / "config.yaml").is_file() and list_checkpoints(out):
        cfg.run.resume = True  # continue where the killed run stopped
    else:
        cfg.run.overwrite = True  # nothing to continue from: start over
    path = out / "run-config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    code, cpu = _python(["-m", "dude.cli", "train", "--config", str(path)], log)
    if code != 0 and "training stopped at step" in log.read_text():  # dude's TrainingDiverged
        _write(out / "diverged.json", {"lr": item.record.get("lr"), "log_tail": log.read_text()[-600:]})
    return code, cpu


def trained(out: Path) -> bool:
    """The run's training finished and its adapter is here to be measured. The weights are
    not committed (gitignored): in a fresh clone a finished run that still lacks a measure
    is trained again, which gives the same weights (training is bit-reproducible)."""
    return (out / "summary.json").is_file() and (out / "adapter_model.safetensors").is_file()


def execute(item: Item, out: Path) -> bool:
    """Do one item into ``out``; True when it finished (a diverged run counts as finished)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    start, code, cpu = time.perf_counter(), 0, 0.0
    if item.command == "calib":
        _write(out / "calib-request.json", item.request)
        code, cpu = _python([str(HERE / "control.py"), str(out)], log)
    else:
        if item.command == "train" and not trained(out):
            code, cpu = _train(item, out, log)
            if (out / "diverged.json").is_file():
                code = 0
        if code == 0 and not (out / "diverged.json").is_file():
            _write(out / "measure-request.json", item.request)
            code, more = _python([str(HERE / "measures.py"), str(out)], log)
            cpu += more
    if code != 0:
        return False
    old = read_json(out / "record.json") or {}
    _write(out / "record.json", {
        **old, **item.record, "key": item.key, "threads": int(os.environ.get("STUDY_THREADS", "1")),
        "process_seconds": round(old.get("process_seconds", 0.0) + time.perf_counter() - start, 1),
        "cpu_seconds": round(old.get("cpu_seconds", 0.0) + cpu, 1), "load_average": list(os.getloadavg())})
    return True


class Study:
    """The plan of a study and its cache under ``root/runs``.

    ``runner(item, out) -> bool`` does one item (tests pass a fake)."""

    def __init__(self, study: StudyConfig, root: Path, runner: Callable[[Item, Path], bool] = execute,
                 log: Callable[[str], None] = print):
        self.study, self.root, self.runner, self.log = study, root, runner, log
        self.runs_dir, self.data_dir = root / "runs", root / "data"
        self.ran = self.skipped = self.failed = 0
        self._items: dict[Any, Any] = {}
        self._busy: set[str] = set()  # keys of the items a worker is doing now: their folders are not read

    def _train_item(self, phase: str, method: str, lr: float, seed: int, r: int) -> Item:
        """The item of one run; memoized, since the plan is recomputed after every item and a
        key hashes the training file."""
        args = (phase, method, lr, seed, r)
        if args not in self._items:
            cfg = train_config(self.study, method, lr, seed, r, self.data_dir)
            record = {"phase": phase, "method": method, "lr": lr, "seed": seed, "r": r}
            self._items[args] = Item("train", config_key(cfg), record, cfg,
                                     measure_request(self.study, self.data_dir, phase, seed))
        return self._items[args]

    def val_loss(self, method: str, lr: float) -> float | None:
        """Validation loss of the seed-0 sweep run of ``method`` at ``lr``; inf if it diverged."""
        item = self._train_item("sweep", method, lr, 0, self.study.r)
        out = self.runs_dir / item.key
        if item.key in self._busy or not finished(out, item):
            return None
        return math.inf if (out / "diverged.json").is_file() else read_json(out / "measures.json")["val"]["loss"]

    def sweep(self, method: str) -> tuple[list[float], float | None]:
        """(grid so far, best lr once the sweep has settled)."""
        loss_of = lambda lr: self.val_loss(method, lr)  # noqa: E731
        grid, settled = sweep_grid(self.study.lr_grid[method], loss_of, self.study.max_extensions)
        return grid, (min(grid, key=loss_of) if settled else None)

    def best_lrs(self) -> dict[str, float]:
        return {m: lr for m in self.study.methods if (lr := self.sweep(m)[1]) is not None}

    def control_lr(self, best: dict[str, float]) -> float | None:
        """k * best lr of the matched method (3 significant digits), once both are known."""
        if self.study.control is None or self.study.control[1] not in best:
            return None
        calib = next(i for i in self.plan_fixed() if i.command == "calib")
        if calib.key in self._busy:
            return None
        ratio = read_json(self.runs_dir / calib.key / "update_ratio.json")
        return float(f"{ratio['ratio'] * best[self.study.control[1]]:.3g}") if ratio else None

    def plan_fixed(self) -> list[Item]:
        """The base measures and the calibration: their keys depend on the data alone."""
        s = self.study
        if "fixed" not in self._items:
            self._items["fixed"] = [Item("base", base_key(s, self.data_dir), {"phase": "base"},
                                         request=measure_request(s, self.data_dir, "base"))]
            if s.control is not None:
                self._items["fixed"].append(Item("calib", calib_key(s, self.data_dir), {"phase": "calib"},
                                                 request=calib_request(s, self.data_dir)))
        return list(self._items["fixed"])

    def plan(self) -> list[Item]:
        """Every item that can be planned now, in the order they run: the base measures, the
        update-ratio calibration, the sweeps, the main runs, the control, the rank ablation."""
        s, r = self.study, self.study.r
        items = self.plan_fixed()
        best = {}
        for m in s.methods:
            grid, best_m = self.sweep(m)
            items += [self._train_item("sweep", m, lr, 0, r) for lr in grid]
            if best_m is not None:
                best[m] = best_m
        items += [self._train_item("main", m, best[m], seed, r) for seed in s.seeds for m in s.methods if m in best]
        lr_c = self.control_lr(best)
        if lr_c is not None:
            items += [self._train_item("control", s.control[0], lr_c, seed, r) for seed in s.seeds]
        items += [self._train_item("rank", m, best[m], 0, rank) for rank in s.ranks if rank != r
                  for m in s.rank_methods if m in best]
        items += [self._train_item("rank", m, ladder(best[m], rung), 0, rank) for rank, rungs in s.rank_lr_rungs.items()
                  for rung in rungs for m in s.rank_methods if m in best]
        return items

    def _do(self, item: Item) -> None:
        label = " ".join(f"{k}={v}" for k, v in item.record.items())
        self.log(f"[{time.strftime('%H:%M:%S')}] {item.command} {item.key}: {label}")
        start = time.perf_counter()
        ok = self.runner(item, self.runs_dir / item.key)
        self.ran += ok
        self.failed += not ok
        self.log(f"[{time.strftime('%H:%M:%S')}]   {'done' if ok else 'FAILED (see run.log)'} "
                 f"in {time.perf_counter() - start:.0f} s")

    def run(self, max_runs: int | None = None, jobs: int = 1) -> None:
        """Run what is not finished. A finished sweep unlocks later phases, so the plan is
        recomputed whenever an item ends; ``jobs`` items go side by side (one process each,
        never two on one run folder); a worker with nothing plannable waits for the others.
        Planning never reads the folder of an item being done (a worker writes its files
        meanwhile). The study root is locked: one study process per root."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FolderLock(self.root, "the study runner", what="study root"):
            self._run(max_runs, jobs)

    def _run(self, max_runs: int | None, jobs: int) -> None:
        attempted: set[tuple[str, str]] = set()
        busy = self._busy
        lock = threading.Condition()

        def next_item() -> Item | None:
            with lock:
                while True:
                    if max_runs is not None and self.ran + self.failed + len(busy) >= max_runs:
                        return None
                    todo = [i for i in self.plan() if (i.key, i.phase) not in attempted and i.key not in busy
                            and not finished(self.runs_dir / i.key, i)]
                    if todo:
                        attempted.add((todo[0].key, todo[0].phase))
                        busy.add(todo[0].key)
                        return todo[0]
                    if not busy:
                        lock.notify_all()
                        return None
                    lock.wait()

        def worker() -> None:
            while (item := next_item()) is not None:
                try:
                    self._do(item)
                finally:
                    with lock:
                        busy.discard(item.key)
                        lock.notify_all()

        threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.skipped = sum(finished(self.runs_dir / i.key, i) for i in self.plan()) - self.ran

    def missing(self) -> list[dict[str, Any]]:
        """Planned items not finished, plus what still waits for a sweep."""
        out = [dict(i.record, key=i.key) for i in self.plan() if not finished(self.runs_dir / i.key, i)]
        best = self.best_lrs()
        n_rank = rank_runs_per_method(self.study)
        n_later = {m: len(self.study.seeds) - 1 + n_rank * (m in self.study.rank_methods) for m in self.study.methods}
        out += [{"phase": "main+rank", "method": m, "count": n_later[m],
                 "note": f"{n_later[m]} main/rank runs, not planned yet: they wait for this method's lr sweep"}
                for m in self.study.methods if m not in best]
        if self.study.control is not None and self.control_lr(best) is None:
            n = len(self.study.seeds)
            out.append({"phase": "control", "method": self.study.control[0], "count": n,
                        "note": f"{n} runs, not planned yet: they wait for the calibration and the "
                                f"{self.study.control[1]} sweep"})
        return out

    def records(self) -> list[dict[str, Any]]:
        """Every finished item of the plan, with its files read (a run that is both a sweep
        and a main run appears once per phase)."""
        return [load_record(self.runs_dir / i.key, i) for i in self.plan() if finished(self.runs_dir / i.key, i)]


def load_record(out: Path, item: Item) -> dict[str, Any]:
    metrics = out / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    return {**(read_json(out / "record.json") or {}), **item.record, "key": item.key,
            "steps": [r["step"] for r in lines], "loss": [r["loss"] for r in lines],
            "summary": read_json(out / "summary.json"), "measures": read_json(out / "measures.json") or {},
            "diverged": (out / "diverged.json").is_file(), "ratio": read_json(out / "update_ratio.json")}
