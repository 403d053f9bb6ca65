"""Training checkpoints under FSDP: sharded, written by every rank with
``torch.distributed.checkpoint`` (DCP), as atomic as the one-file ones of ``checkpoint.py``.

One directory per checkpoint, ``<output_dir>/checkpoints/step-000040/``, holding

- DCP's files: the trainable adapter shards and the AdamW state of every rank
  (``get_state_dict(..., ignore_frozen_params=True)``: the frozen base, 7B weights at
  paper scale, is never written; it is reloaded from the model folder);
- ``trainer_state.pt``: the step, the scheduler and every rank's RNG states, written by
  rank 0 with ``torch.save`` and read with ``torch.load(weights_only=True)``.

Every rank writes into ``.tmp-step-000040/``; after DCP's collective save returns (its
coordinator writes ``.metadata`` once all ranks' files are written and fsynced), rank 0
adds the trainer state, fsyncs and renames the folder into place. Old checkpoints are
renamed away before they are deleted. So a killed run leaves the old set or the new one.
Rank 0 writes ``manifest.json`` (size and sha256 of every file) into the staging folder
before the rename; ``--resume`` checks it (``manifest.py``).
The ranks must share the output directory's filesystem (one machine, or a shared mount).
DCP reshards on load, so another number of ranks can resume it (``resume.py`` says when
that is the same run); the same number continues the same RNG streams, to the bit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..safe_write import WriteFailed, failure, is_write_error, tensor_bytes
from . import checkpoint, manifest

TRAINER_STATE = "trainer_state.pt"
# Only the trainable tensors; loading then lacks the frozen ones, so not strict (DCP's load
# itself fails if a trainable tensor is missing from the checkpoint).
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_state, "optim": optim_state}


def save(output_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict[str, Any], keep: int, is_main: bool) -> Path:
    """Every rank calls this (collective). Returns the final folder. A write that fails on
    any rank (a full disk) raises ``WriteFailed`` on every rank, with the staging folder gone."""
    final = checkpoint.path_for(output_dir, step, sharded=True)
    staging = final.with_name(f".tmp-{final.name}")  # the same name on every rank
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    app = _app_state(model, optimizer)
    needed = tensor_bytes(app) + tensor_bytes(trainer_state)  # this rank's shards
    error: Exception | None = None
    try:
        dcp.save(app, checkpoint_id=staging)  # DCP gathers every rank's write error on every rank
        if is_main:
            _commit(staging, final, trainer_state)
    except Exception as err:
        error = err
    if _any(error is not None):  # every rank learns that one failed, then all raise
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        torch.distributed.barrier()
        if isinstance(error, WriteFailed) or (error is not None and not is_write_error(error)):
            raise error
        raise failure(final, needed, error or OSError("another rank could not write its part"))
    if is_main:
        checkpoint.retain(output_dir, final, keep)
    torch.distributed.barrier()
    return final


def _commit(staging: Path, final: Path, trainer_state: dict[str, Any]) -> None:
    """Rank 0, after every rank's shards are written: the trainer state, the manifest, and
    the rename that commits the folder."""
    with open(staging / TRAINER_STATE, "wb") as fh:
        torch.save(trainer_state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    manifest.write_for_folder(staging)
    checkpoint.fsync_dir(staging)
    checkpoint.remove(final)  # only if a step is saved twice
    os.replace(staging, final)
    checkpoint.fsync_dir(final.parent)


def _any(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any."""
    t = torch.tensor([float(flag)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() > 0


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank calls this: the model's and optimizer's shards back in place; returns
    the trainer state (step, scheduler, RNG states)."""
    try:
        trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        state = _app_state(model, optimizer)
        dcp.load(state, checkpoint_id=path)
    except Exception as err:  # truncated, corrupt, not ours, or another model's
        raise ValueError(f"--resume: sharded checkpoint {str(path)!r} cannot be read ({err}); "
                         "delete it to resume from the one before") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_OPTIONS)
    return trainer_state
