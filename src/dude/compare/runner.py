"""Run the comparison: the base-model eval, then one ``dude train`` process per
(method, seed), then the report. ``--resume`` skips what already finished.

A comparison with a failed run or a failed base evaluation raises ``RunsFailed`` after
writing its report (whose table and JSON give each failure's reason), so that
``dude compare`` exits non-zero: a table of failures is not a result."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..train.config import EvalCommandConfig, EvalTarget, TrainConfig
from ..train.options import to_dict
from ..train.rundir import config_diff, write_json, write_text_atomic
from ..train.runlock import FolderLock
from ..train.trackers import default_run_name, resolve
from . import report
from .config import CompareConfig

OWN = ("config.yaml", "compare.json", "compare.md", "loss_curves.png")


class RunsFailed(RuntimeError):
    """Some run of the comparison, or the base evaluation, did not finish."""


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _prepare_root(root: Path, cfg: CompareConfig, resolved: dict[str, Any]) -> None:
    names = [run_name(m, s) for s in cfg.compare.seeds for m in cfg.compare.methods]
    held = [n for n in (*OWN, "configs", "base", *names) if (root / n).exists()]
    if cfg.run.resume:
        saved = root / "config.yaml"
        if saved.is_file():
            diff = config_diff(yaml.safe_load(saved.read_text()), resolved)
            if diff:
                raise ValueError(f"--resume: the config differs from the comparison in {str(root)!r} in {diff}")
        return
    if held and not cfg.run.overwrite:
        raise ValueError(f"run.output_dir {str(root)!r} already holds a comparison ({', '.join(held[:4])}); pass "
                         "--resume to finish it, --overwrite to replace it, or another --output-dir")
    for name in held:  # only what a comparison writes
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _subprocess(command: str, config: Any, path: Path) -> tuple[int, str | None]:
    """``python -m dude.cli <command> --config <path>`` with the config written there.

    Returns the exit code and, for a failure, its reason: the child's last line on stderr
    (passed through to ours as it comes, progress bars included) or the signal that ended it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1", DUDE_CONFIG_LOGGED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dude.cli", command, "--config", str(path)], env=env,
                            stderr=subprocess.PIPE)
    tail = b""
    while chunk := os.read(proc.stderr.fileno(), 65536):  # type: ignore[union-attr]
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    code = proc.wait()
    return code, None if code == 0 else failure_reason(code, tail.decode(errors="replace"))


def failure_reason(code: int, stderr_tail: str) -> str:
    """What ended a child, in a line: its own last message (``dude train: error: ...``
    without the prefix and the debugging hint), the last line of a traceback, or its signal."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr_tail) if line.strip()]
    if not lines:
        return f"exit {code}, no message"
    last = re.sub(r"^dude \w+: (error: )?", "", lines[-1]).replace("  (DUDE_DEBUG=1 shows the traceback)", "")
    return f"exit {code}: {last}"


def _train_one(cfg: CompareConfig, root: Path, method: str, seed: int) -> dict[str, Any]:
    name = run_name(method, seed)
    out = root / name
    done = (out / "summary.json").is_file() and (not cfg.eval.tasks or (out / "eval.json").is_file())
    if cfg.run.resume and done:
        print(f"compare: {name} finished before, kept")
        return {"name": name, "returncode": 0, "error": None, "skipped": True}
    started = cfg.run.resume and (out / "config.yaml").is_file()
    train_cfg = TrainConfig(
        model=cfg.model,
        adapter=dataclasses.replace(cfg.adapter, method=method, seed=seed),
        data=cfg.data,
        optim=dataclasses.replace(cfg.optim, lr=cfg.compare.lrs.get(method, cfg.optim.lr)),
        run=dataclasses.replace(cfg.run, output_dir=str(out), seed=seed, resume=started, overwrite=not started,
                                run_name=f"{cfg.run.run_name or default_run_name(root)}/{name}"),  # in the trackers
        eval=cfg.eval,
    )
    print(f"\ncompare: {name} (lr {train_cfg.optim.lr:g}, {cfg.optim.steps} steps)", flush=True)
    start = time.perf_counter()
    code, reason = _subprocess("train", train_cfg, root / "configs" / f"{name}.yaml")
    if code != 0:
        print(f"compare: {name} failed ({reason}); the other runs go on.")
    return {"name": name, "returncode": code, "error": reason, "process_seconds": round(time.perf_counter() - start, 1)}


def _base_eval(cfg: CompareConfig, root: Path) -> tuple[int, str | None]:
    if cfg.run.resume and (root / "base" / "eval.json").is_file():
        return 0, None
    print("\ncompare: evaluating the base model", flush=True)
    eval_cfg = EvalCommandConfig(model=cfg.model, target=EvalTarget(output_dir=str(root / "base"), overwrite=True),
                                 data=cfg.data, eval=dataclasses.replace(cfg.eval, tasks=cfg.compare.base_tasks))
    return _subprocess("eval", eval_cfg, root / "configs" / "base.yaml")


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every method and seed; write and print the report; return it."""
    resolve(cfg.run.report_to)  # a tracker that is not installed: one line now, not one per run
    root = Path(cfg.run.output_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"run.output_dir {str(root)!r} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    with FolderLock(root, "dude compare"):  # one comparison per folder; each run locks its own folder too
        return _run_compare(cfg, root)


def _run_compare(cfg: CompareConfig, root: Path) -> dict[str, Any]:
    start = time.perf_counter()
    resolved = to_dict(cfg)
    _prepare_root(root, cfg, resolved)
    write_text_atomic(root / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    _fetch_model(cfg)
    base_code, base_error = _base_eval(cfg, root) if cfg.compare.base_tasks else (None, None)
    runs = [_train_one(cfg, root, m, s) for s in cfg.compare.seeds for m in cfg.compare.methods]
    wall = time.perf_counter() - start
    if cfg.run.resume and (root / "compare.json").is_file():  # count the time of the runs before
        wall += json.loads((root / "compare.json").read_text()).get("wall_time_s", 0.0)
    result = report.build(cfg, root, runs, base_code, wall)
    result["base_error"] = base_error
    write_json(root / "compare.json", result)
    table = report.table(result)
    write_text_atomic(root / "compare.md", table + "\n")
    report.plot(result, root / "loss_curves.png")
    print("\n" + table)
    print(f"\nwrote {root / 'compare.json'}, {root / 'compare.md'}, {root / 'loss_curves.png'}")
    failed = [f"{r['name']} ({r['error']})" for r in runs if r["returncode"] != 0]
    failed += [f"the base evaluation ({base_error})"] if base_error else []
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(runs) + bool(cfg.compare.base_tasks)} jobs failed: "
                         f"{'; '.join(failed)}. The table and compare.json give each reason; fix it and "
                         f"finish with --resume")
    return result


def _fetch_model(cfg: CompareConfig) -> None:
    """Fetch the built-in model once, here, so a failed fetch is one error and not one per run."""
    if cfg.model.name_or_path is None:
        from ..hub import default_model_dir

        default_model_dir()
