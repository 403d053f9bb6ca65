"""The output directory of a run: guard, resolved config, metrics log, loss plot.

Files a training run writes (and nothing else):

    config.yaml                 the fully resolved config
    metrics.jsonl               one JSON object per logged step
    loss.png                    training loss against step
    summary.json                final loss, steps, wall time, peak memory
    eval.json                   when evaluation ran
    data-files.json             sha256 of a file task's data files (datafiles.py)
    adapter_config.json         the adapter (dude.save, PEFT format)
    adapter_model.safetensors
    checkpoints/step-*.pt       when run.save_every > 0 (or the run was preempted),
    checkpoints/step-*.pt.manifest.json   each with its sizes and checksums
    .dude.lock                  while the run goes on (``runlock.py``: one run per folder)
    .tmp-*                      what a run killed while writing leaves; a --resume deletes it
    tensorboard/                with --report-to tensorboard (trackers.py)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from ..safe_write import write_bytes_atomic

RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "eval.json", "data-files.json",
             "adapter_config.json", "adapter_model.safetensors")
# Options that may change between a run and its --resume without changing the result.
# optim.grad_accum changes with the number of processes; resume.py checks that the global
# batch (batch_size x grad_accum x processes) stays the checkpoint's.
RESUMABLE = {"run": {"output_dir", "resume", "overwrite", "progress", "log_every", "save_every", "keep_checkpoints",
                     "report_to", "run_name", "project"},
             "optim": {"grad_accum"}}


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES) or (out / "checkpoints").exists()


def prepare(out: Path, config: dict[str, Any], resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Refuse an output dir that holds another run unless ``overwrite`` (then clear our
    files, never others) or ``resume`` (then the saved config must match). Every rank
    checks; only the one with ``clear`` deletes and creates."""
    if resume and overwrite:
        raise ValueError("run.resume and run.overwrite exclude each other: pick one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"run.output_dir {str(out)!r} exists and is not a directory")
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise ValueError(f"--resume: {str(out)!r} holds no run (no config.yaml); drop --resume to start one")
        diff = config_diff(yaml.safe_load(saved.read_text()), config)
        if diff:
            raise ValueError(f"--resume: the config differs from the run in {str(out)!r} in {diff}; "
                             "resume with the same options, or use --overwrite / another --output-dir")
        if clear:
            remove_leftovers(out)
        return
    if holds_run(out):
        if not overwrite:
            raise ValueError(f"run.output_dir {str(out)!r} already holds a run; pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --output-dir")
        if clear:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)  # --report-to tensorboard's events
    if clear:
        out.mkdir(parents=True, exist_ok=True)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temp files and staging folders (``.tmp-*``) that a run killed while writing
    left in ``out`` and its checkpoints. Called while this run holds the folder's lock
    (runlock.py), so no live writer owns them."""
    found = [p for folder in (out, out / "checkpoints") if folder.is_dir() for p in folder.glob(".tmp-*")]
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def new_folders(out: Path) -> list[Path]:
    """``out`` and those of its parents that do not exist yet, outermost first: the folders
    that starting a run there creates."""
    missing = []
    for path in (out, *out.parents):
        if path.exists():
            break
        missing.append(path)
    return missing[::-1]


def remove_new_folders(created: list[Path]) -> None:
    """After a failed start: remove the folders of ``new_folders`` that are still empty,
    innermost first. ``rmdir`` refuses a folder that holds anything, so no file is ever
    deleted, and a folder that existed before is not in the list."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:  # not empty, or never created
            return


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of options that differ, ignoring those in ``RESUMABLE``."""
    diff = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if key not in RESUMABLE.get(section, ()) and a.get(key) != b.get(key):
                diff.append(f"{section}.{key}")
    return diff


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held (a full disk: ``WriteFailed``, no temp file left)."""
    write_bytes_atomic(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_config(out: Path, config: dict[str, Any]) -> None:
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))


class MetricsLog:
    """Appends one JSON line per logged step; on resume, drops lines after the checkpoint
    (those steps are run again). ``also`` receives every appended record (the trackers)."""

    def __init__(self, path: Path, resume_step: int | None, also: Callable[[dict[str, Any]], None] | None = None):
        self.path, self.also = path, also
        self.elapsed_before = 0.0  # seconds of training before a resume
        if resume_step is None:
            path.write_text("")
        else:
            kept = [line for line in read_lines(path) if line["step"] <= resume_step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
            self.elapsed_before = kept[-1]["elapsed_s"] if kept else 0.0

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.also is not None:
            self.also(record)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line cut short (a process killed, or a disk
    filled, while appending it) is dropped with a warning; damage elsewhere is an error
    naming the line."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                print(f"warning: the last line of {str(path)!r} was cut short while being written; dropped",
                      file=sys.stderr, flush=True)
                break
            raise ValueError(f"{str(path)!r} line {number} is not JSON ({err.msg}); repair or delete that line") from None
    return records


def plot_losses(path: Path, curves: dict[str, tuple[list[int], list[float]]], title: str,
                target: float | None = None) -> None:
    """Loss against step, one line per curve (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label, linewidth=1.6)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
