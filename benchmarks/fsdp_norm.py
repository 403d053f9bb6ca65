"""FSDP2's all-gathers and the cached ``||W_res||^2``: a DuDe training step with the eager
storage check on (before) and off (after, what ``distributed.wrap`` sets).

    python -m benchmarks.fsdp_norm    # SmolLM2, one process (gloo), ~3 min

FSDP2 all-gathers each block's ``W_res`` into new storage on every forward. The layer's eager
check (``AdapterLinear.recheck_residual``) took that for a write and recomputed
``||W_res||^2``, one pass over every frozen weight per step. The same model, wrapped once,
is stepped in interleaved rounds with the check switched per step; each step's count of
recomputations is kept. Results go to ``results/<machine>-cpu-fsdp-norm-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from dude import adapter_layers, frozen
from dude.train import distributed

from . import builders, harness
from .train import make_step

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = harness.environment("cpu")
    print(f"fsdp norm benchmark: torch {env['torch']}, load {env.get('loadavg_start')}", flush=True)
    base, batch, targets = builders.workload({"kind": "smollm2", "batch": 4, "seq": 128})
    model = builders.adapt(base, "dude-dude", r=16, alpha=16, targets=targets)
    recomputed = {True: [], False: []}
    row_sq_norm = frozen.row_sq_norm

    def counting(weight):
        recomputed[counting.check].append(1)
        return row_sq_norm(weight)

    frozen.row_sq_norm = counting
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
        try:
            step = make_step(distributed.wrap(model, distributed.Dist(enabled=True), "fsdp"), batch)
            layers = list(adapter_layers(model).values())

            def with_check(on: bool):
                def run() -> None:
                    counting.check = on
                    for layer in layers:
                        layer.recheck_residual = on
                    step()
                return run

            times = harness.interleaved({"check on (before)": with_check(True), "buffer kept (after)": with_check(False)},
                                        rounds=args.rounds, warmup=1, log=print)
        finally:
            dist.destroy_process_group()
            frozen.row_sq_norm = row_sq_norm
    steps = args.rounds + 1  # the warm-up round counts too
    doc = {"env": env, "layers": len(layers), "rounds": args.rounds, "times": times,
           "recomputed per step": {"check on (before)": len(recomputed[True]) / steps,
                                   "buffer kept (after)": len(recomputed[False]) / steps},
           "after / before": {"of medians": harness.ratio(times, "buffer kept (after)", "check on (before)"),
                              "paired": harness.paired_ratio(times, "buffer kept (after)", "check on (before)")}}
    harness.write_result(doc, env, args.out, "fsdp-norm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
