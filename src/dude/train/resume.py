"""``--resume``: the newest checkpoint back into a freshly built run, on the same number
of processes or another.

What decides a run's result is its global batch ``G = batch_size x grad_accum x processes``
and the data order, a pure function of (seed, step, G) (``batches.py``): step ``s`` trains
on positions ``[s*G, (s+1)*G)`` of the example stream, in micro-batches of ``batch_size``,
however the processes share them out. So a checkpoint resumes on another number of
processes when ``G`` is kept by changing ``optim.grad_accum`` (2 processes x 1 -> 1 process
x 2, and back): every later step sees the same examples, and the result is the
uninterrupted run's up to the order of the gradient sum. A different ``G`` is refused: it
would be another run, not this one continued. What cannot continue on another number of
processes is each rank's RNG stream (dropout): those are reseeded from (seed, rank, step),
so with ``adapter.dropout > 0`` the resumed run matches in distribution, not in bits.

The checkpoint resumed is the newest that matches its manifest (``manifest.py``): a newer
one that does not is renamed ``damaged-...`` and named in a warning. A run that had
checkpoints and has no whole one left is refused; it never starts over silently.

Both checkpoint formats resume on any number of processes: a one-file checkpoint (one
process, DDP) holds the whole adapter and optimizer; a folder of shards (FSDP) is
resharded by ``torch.distributed.checkpoint`` on load. The format follows the strategy, so
an FSDP run resumes under FSDP (``torchrun --nproc-per-node 1`` for one process).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .. import patch
from . import checkpoint, distributed, manifest, sharded_checkpoint
from .config import TrainConfig


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Examples per optimizer step over all processes."""
    return cfg.optim.batch_size * cfg.optim.grad_accum * world_size


def resume(cfg: TrainConfig, d: distributed.Dist, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LambdaLR) -> int:
    """Load the newest checkpoint of ``cfg.run.output_dir`` in place; returns its step (0: none)."""
    out = Path(cfg.run.output_dir)
    chosen = distributed.from_main(d, lambda: _newest_whole(out))  # rank 0 checks, every rank loads it
    if isinstance(chosen, str):
        raise ValueError(chosen)
    if chosen is None:
        if d.is_main:
            print(f"--resume: no checkpoint in {out}/checkpoints; starting from step 0")
        return 0
    step, path = chosen
    sharded = distributed.is_sharded(d, cfg.run.strategy)
    if path.is_dir() and not sharded:
        raise ValueError(f"--resume: {str(path)!r} was written with FSDP (a folder of shards); resume it with "
                         "run.strategy fsdp under torchrun or accelerate, with any number of processes "
                         "(for one: torchrun --nproc-per-node 1, which starts FSDP's process group)")
    if sharded and not path.is_dir():
        raise ValueError(f"--resume: {str(path)!r} was written without FSDP (one file); resume it with "
                         "run.strategy ddp, with any number of processes")
    if sharded:
        saved = sharded_checkpoint.load(path, model, optimizer)
    else:
        saved = checkpoint.load(path)
    processes = len(saved["rng"])  # one RNG state per rank that wrote it
    _check_global_batch(cfg, d.world_size, processes, _saved_global_batch(saved, out, cfg, processes))
    if not sharded:
        patch.load_adapter_state_dict(model, saved["adapter"])
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if processes == d.world_size:
        checkpoint.set_rng_state(saved["rng"][d.rank])
    else:  # the per-rank random streams cannot continue on another number of ranks
        checkpoint.seed_everything(cfg.run.seed + d.rank + 1_000_003 * step)
        if d.is_main:
            print(f"--resume: {processes} process(es) wrote this checkpoint, {d.world_size} continue it with "
                  f"optim.grad_accum {cfg.optim.grad_accum}: the same global batch and data order; dropout "
                  "draws from new random streams (bit-exact continuation needs the same number of processes)")
    if d.is_main:
        print(f"--resume: continuing from {path} (step {step} of {cfg.optim.steps})")
    return step


def _newest_whole(out: Path) -> tuple[int, Path] | str | None:
    """(step, path) of the newest checkpoint that matches its manifest; the newer ones that
    do not are set aside (``damaged-...``), each named in a warning. None: the run has no
    checkpoint (it starts from step 0). A message (str) when it had some and none is whole:
    the run must not start over silently."""
    found = checkpoint.list_checkpoints(out)
    damaged = checkpoint.set_aside_before(out)
    for step, path in reversed(found):
        problem = manifest.check(path)
        if problem == "no manifest" and not path.is_dir():  # written before manifests: it must load
            try:
                checkpoint.load(path)
                problem = None
            except ValueError:
                problem = "no manifest, and it cannot be read"
        elif problem == "no manifest":
            problem = None  # a folder of shards from before manifests: DCP's .metadata commits it
        if problem is None:
            return step, path
        moved = checkpoint.set_aside(path)
        damaged.append(moved)
        print(f"--resume: warning: checkpoint {str(path)!r} is damaged ({problem}); set aside as "
              f"{moved.name!r}, trying the one before", file=sys.stderr, flush=True)
    if damaged:
        return (f"--resume: no checkpoint in {str(out / checkpoint.DIRNAME)!r} is whole (damaged, set aside: "
                f"{', '.join(p.name for p in damaged)}); restore one, or start over with --overwrite")
    return None


def _saved_global_batch(saved: dict[str, Any], out: Path, cfg: TrainConfig, processes: int) -> int:
    if "global_batch" in saved:
        return int(saved["global_batch"])
    # A checkpoint from before the global batch was recorded: grad_accum could not change on
    # resume then, so the run's config.yaml (rewritten only after this check) holds its value.
    accum = yaml.safe_load((out / "config.yaml").read_text())["optim"]["grad_accum"]
    return cfg.optim.batch_size * accum * processes


def _check_global_batch(cfg: TrainConfig, world_size: int, saved_processes: int, saved: int) -> None:
    """Refuse a resume whose global batch differs from the checkpoint's (it would train
    another run), naming the optim.grad_accum that keeps it, if one does."""
    now = global_batch(cfg, world_size)
    if now == saved:
        return
    per_accum = cfg.optim.batch_size * world_size
    fix = (f"resume with --grad-accum {saved // per_accum} to keep it" if saved % per_accum == 0 else
           f"no optim.grad_accum keeps it with {world_size} process(es): use a number of processes that divides "
           f"{saved // cfg.optim.batch_size}")
    raise ValueError(f"--resume: the checkpoint was written with a global batch of {saved} examples per step "
                     f"({saved_processes} process(es), optim.batch_size {cfg.optim.batch_size}); "
                     f"{world_size} process(es) with optim.grad_accum {cfg.optim.grad_accum} give {now}: {fix} "
                     "(the global batch and the data order decide the result)")
