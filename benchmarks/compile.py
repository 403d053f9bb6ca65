"""torch.compile: compiled vs eager training steps, DuDe vs LoRA vs PEFT DoRA+PiSSA (issue 21).

    python -m benchmarks.compile --section smollm2   # ~8 min on an idle 2-core CPU
    python -m benchmarks.compile --section layers    # 7B-shaped single layers, ~4 min per --tokens
    python -m benchmarks.compile --section layers --input-grad   # ... with dx formed, as in a model
    python -m benchmarks.compile --section memory    # peak RSS, one child per configuration, ~5 min
    bash benchmarks/device_check.sh                  # on a lent GPU: bf16 autocast, Triton kernels

Every variant is built, compiled (inductor, ``torch.compile(model)``) and stepped once,
with dynamo's counters read around that first step (graphs, graph breaks, recompiles);
then all variants of a section are timed in interleaved rounds in one process
(harness.interleaved, one more warm-up round) and ratios are of medians from that run.
``dude-dude:fusedfn`` is the alternative compiled path: ``fused.AdapterFunction`` traced
with its zero-``g`` check off (``fused.has_zero``, a host sync that breaks the graph);
exact only while no ``g`` is zero, so a measurement, not a shipped path.
``dude-dude:frozen-m`` (only with ``--only``) is compiled DuDe with the magnitude not trained:
what is left of DuDe's cost over LoRA without the magnitude's gradient. Results go to
``results/<machine>-<device>-compile-<section>-<date>.json`` with the load average at start and end.

On a GPU (``--device cuda``) each variant's step also gets its peak of allocated memory
(``torch.cuda.max_memory_allocated`` over one step, less what was allocated before it).
``--precision bf16`` runs the forward under bf16 autocast, as ``dude train`` does on a GPU;
``--random-weights`` takes SmolLM2's shape with random weights, for a machine the model's
package cannot reach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dude import adapter_layers, fused

from . import builders, harness
from .train import make_step, peak_memory

HERE = Path(__file__).resolve().parent
EAGER = ["dude-lora", "dude-dora", "dude-pissa", "dude-dude"]
COMPILED = [f"{m}:compiled" for m in EAGER] + ["peft-dora+pissa:compiled", "dude-dude:fusedfn"]
DIAGNOSTIC = ["dude-dude:frozen-m"]
SMOLLM2 = {"kind": "smollm2", "batch": 4, "seq": 128}
LAYERS = [(4096, 4096), (11008, 4096)]


def _dynamo_counts() -> dict:
    c = torch._dynamo.utils.counters
    return {"graphs": c["stats"]["unique_graphs"], "graph_breaks": sum(c["graph_break"].values()),
            "frames": c["frames"]["total"], "recompile_limit_hits": sum(c["recompile_limit"].values()) if
            "recompile_limit" in c else 0}


class _Own(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**batch)


def build(base, batch, targets, name: str, r: int, alpha: float, precision: str = "fp32"):
    """``(step, dynamo counts of its first, compiling step or None)``."""
    method, _, variant = name.partition(":")
    torch.manual_seed(0)
    model = builders.adapt(base, method, r=r, alpha=alpha, targets=targets)
    if variant == "frozen-m":
        for layer in adapter_layers(model).values():
            layer.magnitude.requires_grad_(False)
    if not variant:
        return make_step(model, batch, precision=precision), None
    torch._dynamo.utils.counters.clear()
    # fusedfn: a wrapper of its own, so dynamo traces afresh (the layers' instance ``forward``
    # is not guarded on; with the model's own code it reused dude-dora's compiled graph)
    compiled = torch.compile(_Own(model) if variant == "fusedfn" else model)
    step = make_step(compiled, batch, precision=precision)
    model.train()
    keep = fused.has_zero
    if variant == "fusedfn":  # the fused function under compile: its zero check off while tracing
        fused.has_zero = lambda scale: False
        for layer in adapter_layers(model).values():
            layer.forward = layer.forward_fused  # the eager branch, kept under compile
    try:
        step()
    finally:
        fused.has_zero = keep
    return step, _dynamo_counts()


def time_section(spec: dict, *, r: int, alpha: float, rounds: int, only: list[str] | None = None,
                 device: str = "cpu", precision: str = "fp32", log=print) -> dict:
    base, batch, targets = builders.workload(spec, device)
    steps, counts = {}, {}
    for name in only or EAGER + COMPILED:
        log(f"  building {name}")
        steps[name], counts[name] = build(base, batch, targets, name, r, alpha, precision)
    times = harness.interleaved(steps, rounds=rounds, warmup=1, device=device, log=log)
    doc = {"times": times, "dynamo": {k: v for k, v in counts.items() if v is not None}, "ratios": ratios(times)}
    if device.startswith("cuda"):
        doc["step_peak_mib"] = {name: cuda_step_peak_mib(step) for name, step in steps.items()}
    return doc


def cuda_step_peak_mib(step) -> float:
    """MiB one step allocates on the GPU at its peak, over what was allocated before it
    (other variants' weights and optimizer states, which stay resident, are not counted)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def ratios(times: dict) -> dict:
    """The ratios the issue's targets name, of those variants that were timed: of medians,
    and paired (``harness.paired_ratio``: the median of per-round ratios, with its range)."""
    med = {k: v["median"] for k, v in times.items()}
    pairs = {"compiled dude / compiled dude-lora": ("dude-dude:compiled", "dude-lora:compiled"),
             "compiled dude / compiled dude-pissa": ("dude-dude:compiled", "dude-pissa:compiled"),
             "compiled dude / compiled peft dora+pissa": ("dude-dude:compiled", "peft-dora+pissa:compiled"),
             # DuDe does all of LoRA's work and more: this is the least its ratio to PEFT can be
             "compiled dude-lora / compiled peft dora+pissa": ("dude-lora:compiled", "peft-dora+pissa:compiled"),
             "compiled dude, magnitude frozen / compiled dude-lora": ("dude-dude:frozen-m", "dude-lora:compiled"),
             "compiled fused function / compiled formula (dude)": ("dude-dude:fusedfn", "dude-dude:compiled"),
             "compiled fused function (dude) / compiled dude-lora": ("dude-dude:fusedfn", "dude-lora:compiled")}
    pairs |= {f"compiled / eager ({m})": (f"{m}:compiled", m) for m in EAGER}
    timed = {name: (a, b) for name, (a, b) in pairs.items() if a in med and b in med}
    return {name: {"of medians": med[a] / med[b], "paired": harness.paired_ratio(times, a, b)}
            for name, (a, b) in timed.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["smollm2", "layers", "memory"], required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512],
                        help="tokens per step of the layers section (the norm's rows cost r / tokens of the base matmul)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=EAGER + COMPILED + DIAGNOSTIC,
                        help="time these variants only (more rounds in the same time)")
    parser.add_argument("--input-grad", action="store_true",
                        help="layers section: the input takes a gradient too (dx = dz W_res), as in a model")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the forward under bf16 autocast (dude train's default on a GPU)")
    parser.add_argument("--random-weights", action="store_true",
                        help="smollm2 section: SmolLM2's shape with random weights (no model package needed)")
    parser.add_argument("--batch", type=int, default=SMOLLM2["batch"], help="smollm2 section: sequences per step")
    parser.add_argument("--seq", type=int, default=SMOLLM2["seq"], help="smollm2 section: tokens per sequence")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and args.section == "memory":
        parser.error("--section memory measures peak RSS on the CPU; on cuda the timing sections record each "
                     "step's peak GPU memory")
    torch.set_num_threads(args.threads)
    env = harness.environment(args.device)
    env["precision"] = args.precision
    timing = dict(r=16, alpha=16, rounds=args.rounds, only=args.only, device=args.device,
                  precision=args.precision)
    print(f"compile benchmark {args.section} on {args.device} ({args.precision}): torch {env['torch']}, "
          f"load {env.get('loadavg_start')}", flush=True)
    doc: dict = {"env": env, "section": args.section, "rounds": args.rounds, "only": args.only}
    if args.section == "smollm2":
        spec = {**SMOLLM2, "batch": args.batch, "seq": args.seq, "random": args.random_weights}
        doc["workload"] = spec
        doc["smollm2"] = time_section(spec, **timing)
    elif args.section == "layers":
        for tokens in args.tokens:
            for out, inp in LAYERS:
                spec = {"kind": "layer", "out": out, "in": inp, "tokens": tokens, "input_grad": args.input_grad}
                dx = " input_grad" if args.input_grad else ""
                print(f"== layer {out}x{inp}, {tokens} tokens{dx}", flush=True)
                doc[f"layer {out}x{inp} r=16 tokens={tokens}{dx}"] = time_section(spec, **timing)
    else:
        doc["memory"] = {name: peak_memory(SMOLLM2, name, r=16, alpha=16, steps=2, threads=args.threads)
                         for name in ["dude-lora", "dude-lora:compiled", "dude-dude", "dude-dude:compiled"]}
    harness.write_result(doc, env, args.out, f"compile-{args.section}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
