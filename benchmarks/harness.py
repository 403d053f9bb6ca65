"""Timing and memory plumbing shared by the benchmarks: interleaved rounds, stats, peak RSS.

The machine is small and shared, so absolute times are noisy. Every comparison is made
within one process and one run: each round times every case once, in a rotated order,
so a burst of outside load hits all cases alike; we report median, min and max over
rounds, and ratios of medians.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], None]], *, rounds: int, warmup: int = 1, device: str = "cpu",
                log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Time every case ``rounds`` times, one call of each per round, in a rotated order.

    Returns ``{name: stats(wall seconds) | {"cpu": stats(process CPU seconds), "rounds":
    wall seconds in round order}}``; CPU time is less sensitive to other processes on a
    shared machine, and the per-round times give ``paired_ratio``. ``warmup`` untimed rounds
    come first.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            cases[name]()
            synchronize(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        if log:
            log(f"  round {k + 1}/{rounds}: " + ", ".join(f"{n}={wall[n][-1]:.3f}s" for n in names))
    return {name: {**stats(wall[name]), "cpu": stats(cpu[name]), "rounds": wall[name]} for name in names}


def ratio(results: dict[str, dict], num: str, den: str) -> float | None:
    if num not in results or den not in results:
        return None
    return results[num]["median"] / results[den]["median"]


def paired_ratio(results: dict[str, dict], num: str, den: str) -> dict:
    """``median_k num_k / den_k`` over the rounds of one ``interleaved`` run, with its range.

    Each round times both cases minutes apart at most, so a drift of the machine's speed
    (this VM's memory bandwidth moves by 20% over tens of minutes) cancels within a round,
    where the ratio of medians can pair a fast round of one case with a slow one of the other.
    """
    per_round = [a / b for a, b in zip(results[num]["rounds"], results[den]["rounds"])]
    return stats(per_round)


def write_result(doc: dict, env: dict, out: Path, name: str) -> Path:
    """Print ``doc`` and save it as ``out/<machine>-<device>-<name>-<date>.json``, the load
    average at the end added to ``env`` (which ``doc`` holds) first."""
    env["loadavg_end"] = os.getloadavg()
    text = json.dumps(doc, indent=1)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{env['machine']}-{env['device'].split(':')[0]}-{name}-{datetime.now():%Y%m%d-%H%M}.json"
    path.write_text(text)
    print(f"wrote {path}")
    return path


# -- memory ------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def release_memory() -> None:
    """Free what Python and glibc hold but do not use, so RSS reflects live tensors."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may keep freed pages, figures stay comparable within a run
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


# -- environment -------------------------------------------------------------------------


def _git_state() -> str | None:
    """``<commit>`` plus ``+dirty`` when src/ has uncommitted changes (figures then reflect them)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str) -> dict:
    import peft
    import transformers

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
    }
    env["git"] = _git_state()
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return env
