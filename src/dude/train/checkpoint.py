"""Training checkpoints: everything ``--resume`` needs to continue bit-exactly.

One file per checkpoint, ``<output_dir>/checkpoints/step-000040.pt``, holding the
trainable adapter tensors, the optimizer and scheduler states, the RNG states (torch,
CUDA, python, numpy) and the step (the data order is a pure function of the seed and
the step, see ``batches.py``). It is written with ``torch.save`` to a temporary file,
fsynced and renamed, so a killed run leaves either the old set or the new one; it is
read with ``torch.load(weights_only=True)``: tensors and plain containers only, no
arbitrary pickle. Under FSDP a checkpoint is a folder of shards instead,
``step-000040/`` (``sharded_checkpoint.py``); both are listed here.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIRNAME = "checkpoints"
_PATTERN = re.compile(r"step-(\d{6,})(\.pt)?")  # a file, or a folder of shards


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, shuffling), as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def path_for(output_dir: Path, step: int, sharded: bool = False) -> Path:
    return Path(output_dir) / DIRNAME / f"step-{step:06d}{'' if sharded else '.pt'}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first (temp files are ignored)."""
    folder = Path(output_dir) / DIRNAME
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PATTERN.fullmatch(p.name))]
    return sorted(found)


def save(output_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write checkpoint ``step``; then drop all but the ``keep`` newest."""
    path = path_for(output_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or not ours
        raise ValueError(f"--resume: checkpoint {str(path)!r} cannot be read ({err}); "
                         "delete it to resume from the one before") from None


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
