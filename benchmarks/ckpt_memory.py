"""Peak training memory of dude's LoRA and DuDe on SmolLM2 with and without gradient
checkpointing (a fresh process per configuration, two repeats), saved as JSON.

    python -m benchmarks.ckpt_memory          # ~3 min on 2 CPU cores

The same ``:ckpt`` rows are part of ``python benchmarks/run.py``'s full plan; this script
measures only them, without rewriting the tables of a full run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import peft
import torch
import transformers

from . import train
from .run import SMOLLM2

METHODS = ["dude-lora", "dude-dude", "dude-lora:ckpt", "dude-dude:ckpt"]
THREADS, R, STEPS = 2, 16, 3


def main() -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    out = {"date": now.isoformat(), "machine": platform.node(), "threads": THREADS, "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "workload": SMOLLM2,
           "r": R, "alpha": float(R), "steps": STEPS, "memory": {}}
    for repeat in range(2):
        for name in METHODS:
            m = train.peak_memory(SMOLLM2, name, r=R, alpha=float(R), steps=STEPS, threads=THREADS)
            out["memory"].setdefault(name, []).append(m)
            print(f"{repeat} {name}: peak {m['peak_mib']:.0f} MiB (+{m['delta_mib']:.0f} over start)", flush=True)
    for name in METHODS[1::2]:
        base = min(x["peak_mib"] for x in out["memory"][name.replace("dude-dude", "dude-lora")])
        print(f"{name} / its LoRA: {min(x['peak_mib'] for x in out['memory'][name]) / base:.3f}")
    path = Path(__file__).parent / "results" / f"vm-cpu-memory-ckpt-{now:%Y%m%d}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
