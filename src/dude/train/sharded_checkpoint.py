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

from . import checkpoint

TRAINER_STATE = "trainer_state.pt"
# Only the trainable tensors; loading then lacks the frozen ones, so not strict (DCP's load
# itself fails if a trainable tensor is missing from the checkpoint).
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_state, "optim": optim_state}


def save(output_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         trainer_state: dict[str, Any], keep: int, is_main: bool) -> Path:
    """Every rank calls this (collective). Returns the final folder."""
    final = checkpoint.path_for(output_dir, step, sharded=True)
    staging = final.with_name(f".tmp-{final.name}")  # the same name on every rank
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    dcp.save(_app_state(model, optimizer), checkpoint_id=staging)
    if is_main:
        with open(staging / TRAINER_STATE, "wb") as fh:
            torch.save(trainer_state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        checkpoint.fsync_dir(staging)
        _remove(final)  # only if a step is saved twice
        os.replace(staging, final)
        checkpoint.fsync_dir(final.parent)
        if keep > 0:
            for _, old in checkpoint.list_checkpoints(output_dir)[:-keep]:
                _remove(old)
    torch.distributed.barrier()
    return final


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


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no half-deleted one keeps a valid name."""
    if not path.exists():
        return
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    if doomed.is_dir():
        shutil.rmtree(doomed)
    else:
        doomed.unlink()
