"""Process group, device and model wrapping for single- and multi-process training.

Launched by ``torchrun`` or ``accelerate launch`` (they set ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR``), training joins a process group: NCCL on GPUs, gloo on
CPU. Strategies (``run.strategy``; accelerate's FSDP config file selects ``fsdp``):

- ``ddp`` (default): every rank holds the whole model; only the adapter tensors are
  trainable, so DDP all-reduces just their gradients (a few MB).
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2, torch >= 2.6) on each decoder
  layer and on the root, which shards the frozen base weights too: the option for a 7B
  model that does not fit on one GPU. FSDP2 handles a mix of frozen and trainable
  parameters in one unit, and runs on GPUs (NCCL) and CPUs (gloo) alike. A 4-bit base
  (``AdapterConfig.quantize``) keeps its codes in buffers, which FSDP does not shard:
  every rank holds the whole 4-bit base, and FSDP shards the rest. Its parameters
  become DTensor shards, so the optimizer is built after ``wrap``; checkpoints are
  sharded (``torch.distributed.checkpoint``, see ``sharded_checkpoint.py``), the final
  adapter is gathered (``gathered``) and written by rank 0.
"""

from __future__ import annotations

import datetime
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..patch import adapter_layers

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # in a process group (several processes, or FSDP under a launcher)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", strategy: str = "ddp") -> Dist:
    """Join the process group if launched by torchrun / accelerate with several processes,
    or with one under ``fsdp`` (a one-GPU sharded run exercises the multi-GPU code); pick
    the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device is 'cuda' but torch sees no GPU; use --device cpu or auto")
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(dev)
    enabled = world_size > 1 or (strategy == "fsdp" and "WORLD_SIZE" in os.environ)
    if enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))  # rank 0 evaluates alone
    return Dist(rank, world_size, local_rank, dev, enabled)


def launched_rank() -> int:
    """This process's rank as torchrun / accelerate set it (0 without a launcher). Known
    before the process group is joined: what is printed once per run, rank 0 prints."""
    return int(os.environ.get("RANK", "0"))


def quiet_replica(d: Dist) -> None:
    """On ranks other than 0, no progress bars of transformers / datasets (loading weights,
    reading files): one per rank otherwise. Warnings and errors still print on every rank."""
    if d.is_main:
        return
    import datasets
    from transformers.utils import logging

    logging.disable_progress_bar()
    datasets.disable_progress_bars()


def launcher_strategy(strategy: str) -> str:
    """``fsdp`` when ``accelerate launch`` runs with its own FSDP config file (which reaches
    the processes as ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables), else ``strategy``.
    dude shards each decoder layer and the root with FSDP2 whatever the wrap policy says;
    what it cannot honour is refused."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return strategy
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"accelerate's FSDP config has fsdp_version {version}; dude shards with FSDP2: "
                         "set fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ValueError("accelerate's FSDP config sets fsdp_offload_params: true, which dude does not do; set it false")
    return "fsdp"


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def mean_across(d: Dist, value: float) -> float:
    """The mean of a float over ranks (for logging)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() / d.world_size


def any_across(d: Dist, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (to stop all ranks together)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)], device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() > 0


def from_main(d: Dist, compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result (picklable) on every rank: a decision taken once
    (which checkpoint to resume, whether the folder lock was had) that all ranks follow."""
    if not d.enabled:
        return compute()
    box = [compute() if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_across(d: Dist, value: int) -> int:
    """The largest of an int over ranks (a signal number one rank received: every rank acts on it)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """The model as trained: itself alone, under DDP, or sharded with FSDP2 (in place: the
    parameters become shards, so build the optimizer on them afterwards)."""
    if not d.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        # Buffers (a 4-bit base's codes, B0/A0) are built alike on every rank from the same
        # weights and seed: no broadcast of them before every forward. torch 2.13 deprecates
        # the flag, but its replacement still syncs them at init (its own warning says to keep
        # it until init_sync_buffers exists); silenced, as every rank printed it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in adapter_layers(model).values():
            layer.recheck_residual = False  # the all-gathers move W_res, they do not change it
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(model)
        return model
    raise ValueError(f"run.strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def is_sharded(d: Dist, strategy: str) -> bool:
    """Whether training runs under FSDP (one process never shards)."""
    return d.enabled and strategy == "fsdp"


@contextmanager
def accumulating(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes that reduce gradients across ranks only if ``sync`` (the last
    micro-batch of a step): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``."""
    if sync or not (hasattr(wrapped, "no_sync") or hasattr(wrapped, "set_requires_gradient_sync")):
        yield
    elif hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Under FSDP2, every sharded module unsharded (full parameters) for the duration;
    a no-op otherwise. Every rank must enter it (all-gathers)."""
    sharded = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
