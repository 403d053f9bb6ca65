"""Run every benchmark, print the table, write benchmarks/results/<machine>-<date>.json and
update the table in benchmarks/README.md.

    python benchmarks/run.py            # full run (~15 min on an idle 2-core CPU)
    python benchmarks/run.py --quick    # the headline figures only, under 5 minutes
    python benchmarks/run.py --device cuda

Step times are interleaved rounds in one process (see harness.interleaved); peak memory
comes from a fresh child process per configuration (peak RSS on CPU, max allocated on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import builders, harness, infer, init_svd, report, train

HERE = Path(__file__).resolve().parent
SMOLLM2 = {"kind": "smollm2", "batch": 4, "seq": 128}
KEY = ["dude-lora", "dude-dude", "peft-lora", "peft-dora+pissa"]

PLANS = {
    "full": {
        "train_methods": builders.ALL + ["dude-lora:autograd", "dude-dude:autograd"],
        "memory_methods": builders.ALL + ["dude-dude:autograd", "dude-lora:ckpt", "dude-dude:ckpt"],
        "rounds": 7, "memory_steps": 3,
        "layers": [(4096, 4096, 16), (4096, 4096, 64), (11008, 4096, 16), (11008, 4096, 64)],
        "layer_methods": builders.ALL, "layer_tokens": 512, "layer_rounds": 5,
        "infer_methods": builders.DUDE + ["peft-lora", "peft-dora", "peft-dora+pissa"], "infer_rounds": 7,
        "init_rounds": 5, "svd_settings": [(8, 48), (16, 48), (16, 112)],
    },
    "quick": {
        "train_methods": KEY,
        "memory_methods": ["dude-lora", "dude-dude", "dude-dude:autograd", "peft-dora+pissa"],
        "rounds": 3, "memory_steps": 2,
        "layers": [(4096, 4096, 16)], "layer_methods": ["dude-lora", "dude-dude", "peft-dora+pissa"],
        "layer_tokens": 256, "layer_rounds": 3,
        "infer_methods": ["dude-lora", "dude-dude"], "infer_rounds": 3, "init_rounds": 2,
        "svd_settings": [(16, 48)],
    },
}


def log(msg: str) -> None:
    print(msg, flush=True)


def layer_spec(out: int, inp: int, tokens: int) -> dict:
    return {"kind": "layer", "out": out, "in": inp, "tokens": tokens}


def run(plan: dict, *, r: int, alpha: float, device: str, threads: int, sections: set[str]) -> dict:
    results: dict = {"train": {}, "memory": {}, "inference": {}, "init": None}
    if "train" in sections:
        log(f"== training step, SmolLM2-135M, batch 4x128, r={r}")
        results["train"]["smollm2"] = train.time_steps(
            SMOLLM2, plan["train_methods"], r=r, alpha=alpha, rounds=plan["rounds"], warmup=1, device=device, log=log)
        for out, inp, rank in plan["layers"]:
            key = f"layer {out}x{inp} r={rank} tokens={plan['layer_tokens']}"
            log(f"== training step, {key}")
            results["train"][key] = train.time_steps(
                layer_spec(out, inp, plan["layer_tokens"]), plan["layer_methods"], r=rank, alpha=rank,
                rounds=plan["layer_rounds"], warmup=1, device=device, log=log)
    if "memory" in sections:
        log("== peak training memory, one fresh process per configuration")
        jobs = [("smollm2", SMOLLM2, m, r, alpha) for m in plan["memory_methods"]]
        jobs += [(f"layer {o}x{i} r={k} tokens={plan['layer_tokens']}", layer_spec(o, i, plan["layer_tokens"]),
                  m, k, float(k)) for o, i, k in plan["layers"] for m in plan["layer_methods"]]
        for key, spec, name, rank, a in jobs:
            mem = train.peak_memory(spec, name, r=rank, alpha=a, steps=plan["memory_steps"], device=device,
                                    threads=threads)
            results["memory"].setdefault(key, {})[name] = mem
            log(f"  {key} {name}: peak {mem['peak_mib']:.0f} MiB (+{mem['delta_mib']:.0f} over start)")
    if "inference" in sections:
        log("== inference, SmolLM2-135M eval forward, batch 4x128")
        results["inference"]["smollm2"] = infer.time_inference(
            SMOLLM2, plan["infer_methods"], r=r, alpha=alpha, rounds=plan["infer_rounds"], warmup=1,
            device=device, log=log)
    if "init" in sections:
        log("== init: exact vs randomized SVD over every SmolLM2 layer")
        results["init"] = init_svd.svd_init(r=r, rounds=plan["init_rounds"], settings=plan["svd_settings"], log=log)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="headline figures only (under 5 minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--only", default="train,memory,inference,init", help="comma-separated sections")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--from-json", type=Path, help="re-render the table (and README) from a results file")
    args = parser.parse_args(argv)
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        doc["targets"] = report.targets(doc)
        table = report.markdown(doc)
        print(table)
        if not args.no_readme:
            report.update_readme(HERE / "README.md", table, args.from_json.resolve().relative_to(HERE))
        return 0

    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    env = harness.environment(args.device)
    log(f"dude benchmarks ({mode}): torch {env['torch']}, peft {env['peft']}, {env['threads']} threads, "
        f"device {args.device}, load {env.get('loadavg_start')}")
    results = run(PLANS[mode], r=args.r, alpha=args.alpha, device=args.device, threads=args.threads,
                  sections=set(args.only.split(",")))
    env["loadavg_end"] = harness.environment(args.device).get("loadavg_start")
    doc = {"env": env, "mode": mode, "settings": {"r": args.r, "alpha": args.alpha, "smollm2": SMOLLM2,
                                                  "plan": PLANS[mode]}, **results}
    doc["targets"] = report.targets(doc)
    table = report.markdown(doc)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    path = args.out / f"{env['machine']}-{args.device}-{mode}-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1))
    log(f"wrote {path}")
    if not args.no_readme:
        report.update_readme(HERE / "README.md", table, path.relative_to(HERE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
