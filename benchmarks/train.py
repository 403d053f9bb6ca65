"""Training step (forward + backward + AdamW step): time interleaved in one process, peak
memory in a fresh subprocess per configuration.

    python -m benchmarks.train --memory '{"kind": "smollm2", "batch": 4, "seq": 128}' dude-dude 16

prints one JSON line with the peak RSS of a child doing a few steps of one configuration.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from dude.train import optim

from . import builders, harness

ROOT = Path(__file__).resolve().parent.parent


def make_step(model: torch.nn.Module, batch: dict, lr: float = 1e-4, precision: str = "fp32") -> Callable[[], float]:
    """One optimizer step of ``model`` on ``batch``; returns the loss. ``precision``: the
    forward under ``dude train``'s own autocast for ``--precision`` (``bf16``: bf16 autocast)."""
    model.train()
    opt = torch.optim.AdamW(builders.trainable(model), lr=lr)
    device = next(iter(batch.values())).device

    def step() -> float:
        with optim.autocast(precision, device):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for tensor in batch.values():  # an input that takes a gradient (builders.layer_batch)
            tensor.grad = None
        return loss.item()

    return step


def time_steps(spec: dict, methods: list[str], *, r: int, alpha: float, rounds: int, warmup: int,
               device: str = "cpu", log=print) -> dict[str, dict]:
    """Step time of every method on the workload ``spec``, interleaved in this process."""
    base, batch, targets = builders.workload(spec, device)
    steps = {}
    for name in methods:
        torch.manual_seed(0)
        model = builders.adapt(base, name, r=r, alpha=alpha, targets=targets).to(device)
        steps[name] = make_step(model, batch)
    return harness.interleaved(steps, rounds=rounds, warmup=warmup, device=device, log=log)


# -- peak memory, one configuration per child process --------------------------------------


def saved_for_backward_mib(model: torch.nn.Module, batch: dict) -> float:
    """MiB autograd keeps for backward in one forward: unique storages, parameters and
    buffers excluded. Deterministic, unlike RSS: the activation memory a method adds."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return sum(seen.values()) / 2**20


def _child(spec: dict, name: str, r: int, alpha: float, steps: int, device: str) -> dict:
    base, batch, targets = builders.workload(spec, device)
    model = builders.adapt(base, name, r=r, alpha=alpha, targets=targets, share=False).to(device)
    del base
    step = make_step(torch.compile(model) if name.endswith(":compiled") else model, batch)
    if name.endswith(":compiled"):  # the compile itself (first step) before the peak mark is reset
        step()
    harness.release_memory()
    before = harness.rss_mib()
    reset = harness.reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    for _ in range(steps):
        step()
        harness.release_memory()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = harness.peak_rss_mib()
    return {"peak_mib": peak, "before_mib": before, "delta_mib": peak - before, "reset_ok": reset,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "saved_for_backward_mib": saved_for_backward_mib(model, batch)}


def peak_memory(spec: dict, name: str, *, r: int, alpha: float, steps: int = 3, device: str = "cpu",
                threads: int | None = None) -> dict:
    """Peak memory of ``steps`` training steps of one configuration, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.train", "--memory", json.dumps(spec), name, str(r), str(alpha),
           str(steps), device, str(threads or torch.get_num_threads())]
    # A fixed mmap threshold: large tensors are mapped and unmapped, never parked in glibc's
    # heap, so RSS follows live memory instead of the allocator's history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and sys.argv[1:2] == ["--memory"]:
    spec_, name_, r_, alpha_, steps_, device_, threads_ = sys.argv[2:9]
    torch.set_num_threads(int(threads_))
    print(json.dumps(_child(json.loads(spec_), name_, int(r_), float(alpha_), int(steps_), device_)))
