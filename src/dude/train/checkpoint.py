"""Training checkpoints: everything ``--resume`` needs to continue bit-exactly.

One file per checkpoint, ``<output_dir>/checkpoints/step-000040.pt``, holding the
trainable adapter tensors, the optimizer and scheduler states, the RNG states (torch,
CUDA, python, numpy) and the step (the data order is a pure function of the seed and
the step, see ``batches.py``). It is written with ``torch.save`` to a temporary file,
fsynced and renamed, so a killed run leaves either the old set or the new one; it is
read with ``torch.load(weights_only=True)``: tensors and plain containers only, no
arbitrary pickle. Under FSDP a checkpoint is a folder of shards instead,
``step-000040/`` (``sharded_checkpoint.py``); both are listed here.

Each checkpoint has a manifest of sizes and sha256 checksums (``manifest.py``), written
before the checkpoint is renamed into place. Old checkpoints are deleted only after the
new one has committed and matches its manifest read back from disk, so retention
(``run.keep_checkpoints``, 1 included) never leaves the run without a whole checkpoint.
A checkpoint that fails its check on ``--resume`` is renamed ``damaged-step-...`` (kept
for the user, never listed again). A full disk during a save raises ``WriteFailed``
(``safe_write.py``) with nothing partial left.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..safe_write import fsync_dir, guarded, tensor_bytes
from . import manifest

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
    """Atomically write checkpoint ``step`` and its manifest; then drop all but the ``keep`` newest."""
    path = path_for(output_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with guarded(path, tensor_bytes(state) + (64 << 10), [tmp]):  # + the zip and pickle headers
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        remove(path)  # only if a step is saved twice
        manifest.write_for_file(tmp, path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    retain(output_dir, path, keep)
    return path


def retain(output_dir: Path, newest: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (0: keep all), once ``newest`` has
    committed and matches its manifest on disk; a new one that does not (the disk lied)
    deletes nothing and says so."""
    if keep <= 0:
        return
    problem = manifest.check(newest)
    if problem is not None:
        print(f"warning: the checkpoint just written, {str(newest)!r}, fails its check ({problem}); "
              "older checkpoints are kept", file=sys.stderr)
        return
    for _, old in list_checkpoints(output_dir)[:-keep]:
        remove(old)


def remove(path: Path) -> None:
    """Delete a checkpoint (file or folder of shards, with its manifest) so that no
    half-deleted one keeps a valid name: it is renamed away first."""
    sidecar = path.with_name(path.name + manifest.SUFFIX)
    if path.exists():
        doomed = path.with_name(f".del-{path.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        if doomed.is_dir():
            shutil.rmtree(doomed)
        else:
            doomed.unlink()
    sidecar.unlink(missing_ok=True)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint (and its manifest) to ``damaged-<name>``, which is never
    listed again; returns the new path."""
    n, target = 0, path.with_name(f"damaged-{path.name}")
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}.{n}")
    sidecar = path.with_name(path.name + manifest.SUFFIX)
    if sidecar.is_file():
        os.replace(sidecar, target.with_name(target.name + manifest.SUFFIX))
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def set_aside_before(output_dir: Path) -> list[Path]:
    """The checkpoints an earlier ``--resume`` set aside as damaged."""
    folder = Path(output_dir) / DIRNAME
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("damaged-") and not p.name.endswith(manifest.SUFFIX))


def space_needed(trainable_bytes: int, adapter_bytes: int, start: int, steps: int, save_every: int,
                 keep: int) -> int:
    """Bytes a run still writes at its peak: the checkpoints kept at once (``keep`` + the one
    being written, or every one with ``keep`` 0), each the trainable tensors and AdamW's two
    moments (3 x ``trainable_bytes``), plus the final adapter."""
    saves = len(range(start + save_every, steps, save_every)) if save_every else 0
    at_once = saves if keep <= 0 else min(saves, keep + 1)
    return at_once * 3 * trainable_bytes + adapter_bytes


def load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or not ours
        raise ValueError(f"--resume: checkpoint {str(path)!r} cannot be read ({err}); "
                         "delete it to resume from the one before") from None
