"""SVD init at Llama-2-7B shapes: one decoder block in bf16, timed, extrapolated to 32.

    python -m benchmarks.init_7b      # ~5 min on 2 idle cores

One block is four 4096x4096 (q, k, v, o) and three 11008x4096 (gate, up; down is
4096x11008) matrices. Their spectra are SmolLM2-135M's, measured: for each projection
type the mean over 6 of its 30 blocks of ``s_i / s_1``, stretched over 4096 values by
relative index (``i / min(out, in)``, log-linear interpolation), so the top 128 of 4096
are as flat as SmolLM2's top 18 of 576 (up_proj: s_128 / s_129 = 1.0006). Singular
vectors are Haar-random; ``W = U S V^T`` is built in float32 and stored in bf16.

In one run, on the same matrices:

- ``dude.apply`` of the block (AdapterConfig method dude, r=128, alpha=128, svd randomized
  with the defaults), twice: the whole init (SVD, residual, norms), its peak RSS above the
  model, the same bits both times; its principal part is read back as ``s B0 A0``;
- ``decompose.top_singular`` alone at other ``--settings`` (niter/oversample), and
  ``torch.svd_lowrank(W, q=r, niter=4)`` (what PEFT's ``pissa_niter_4`` calls; SVD only,
  no residual), interleaved over ``--rounds``;
- the exact SVD (``torch.linalg.svd`` in float32), once per matrix.

Error: ``||P - P_exact||_F / ||P_exact||_F`` of the principal part ``P = U_r S_r V_r^T``
per matrix. "floor" is the same error between the exact SVD of the float32 ``W`` (known
by construction) and that of its bf16 copy: how far bf16 storage alone moves the split.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import dude
from dude import decompose

from . import harness

R, HIDDEN, INTERMEDIATE, BLOCKS = 128, 4096, 11008, 32
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN),
          "down_proj": (HIDDEN, INTERMEDIATE)}
SAMPLED_BLOCKS = (0, 6, 12, 18, 24, 29)


def smollm2_profiles() -> dict[str, torch.Tensor]:
    """Per projection type, the mean normalised spectrum ``s_i / s_1`` of SmolLM2's sampled blocks."""
    model, _ = dude.load_model(dtype=torch.float32)
    spectra: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in SHAPES and int(name.split(".")[2]) in SAMPLED_BLOCKS:
            s = torch.linalg.svdvals(module.weight.detach())
            spectra.setdefault(kind, []).append(s / s[0])
    return {kind: torch.stack(v).mean(0) for kind, v in spectra.items()}


def stretched(profile: torch.Tensor, n: int) -> torch.Tensor:
    """``profile`` (m,) resampled to n values by relative index, log-linear in between."""
    x_old, x_new = torch.linspace(0, 1, len(profile)), torch.linspace(0, 1, n)
    right = torch.searchsorted(x_old, x_new).clamp(1, len(profile) - 1)
    t = (x_new - x_old[right - 1]) / (x_old[right] - x_old[right - 1])
    logs = profile.log()
    return torch.exp(logs[right - 1] * (1 - t) + logs[right] * t)


def _haar(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, upper = torch.linalg.qr(torch.randn(rows, cols, generator=generator))  # (rows, cols)
    return q * torch.sign(torch.diagonal(upper))


def build_block(profiles: dict[str, torch.Tensor], seed: int = 0) -> tuple[nn.Module, dict]:
    """The block (bf16 ``nn.Linear`` layers named like Llama's) and, per matrix, the
    float32 principal part known by construction."""
    generator = torch.Generator().manual_seed(seed)
    block, truth = nn.Module(), {}
    block.self_attn, block.mlp = nn.Module(), nn.Module()
    for kind, (out, inp) in SHAPES.items():
        s = stretched(profiles[kind], min(out, inp))  # (n,)
        u, v = _haar(out, min(out, inp), generator), _haar(inp, min(out, inp), generator)
        linear = nn.Linear(inp, out, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_((u * s) @ v.T)
        truth[kind] = (u[:, :R].clone(), s[:R].clone(), v[:, :R].T.clone())
        del u, v
        setattr(block.mlp if kind in ("gate_proj", "up_proj", "down_proj") else block.self_attn, kind, linear)
    return block, truth


def _part(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    return (u * s) @ vh  # (out, in)


def _error(approx: tuple, exact: tuple) -> float:
    best = _part(*exact)
    return (torch.linalg.norm(_part(*approx) - best) / torch.linalg.norm(best)).item()


def _next_value(profile: torch.Tensor, weight: torch.Tensor) -> float:
    """s_{r+1} of the built matrix, normalised as its ``truth`` values are (s_1 = 1)."""
    return stretched(profile, min(weight.shape))[R].item()


def _init_block(block: nn.Module, config: dude.AdapterConfig, log=print) -> tuple[float, float, dict]:
    """dude.apply on a copy: (seconds, peak RSS MiB above the copied model, per matrix the
    principal part's factors ``(s B0, A0)`` as ``(U S, 1, Vh)``-like triplets)."""
    fresh = copy.deepcopy(block)
    harness.release_memory()
    harness.reset_peak_rss()
    before = harness.rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    dude.apply(fresh, config)
    seconds = time.perf_counter() - t0
    peak = harness.peak_rss_mib() - before
    harness.release_memory()
    log(f"  dude.apply of the block: {seconds:.1f}s wall, {time.process_time() - c0:.1f}s CPU; peak RSS "
        f"+{peak:.0f} MiB above the model before, +{harness.peak_rss_mib() - harness.rss_mib():.0f} above it after")
    factors = {n.rsplit(".", 1)[-1]: (m.scaling * m.lora_B0.float(), torch.ones(()), m.lora_A0.float())
               for n, m in dude.adapter_layers(fresh).items()}
    del fresh
    harness.release_memory()
    return seconds, peak, factors


def run(rounds: int, settings: list[tuple[int, int]], log=print) -> dict:
    """The block's init by dude.apply (twice), then ``rounds`` interleaved rounds of
    top_singular at each of ``settings`` and of svd_lowrank, then the exact SVD."""
    torch.manual_seed(0)
    profiles = smollm2_profiles()
    block, truth = build_block(profiles)
    weights = {n.rsplit(".", 1)[-1]: m.weight.detach() for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    config = dude.AdapterConfig(method="dude", r=R, alpha=float(R), svd="randomized")
    default = f"dude niter={config.svd_niter} oversample={config.svd_oversample} (dude.apply)"
    log(f"block built; {default}")
    init_times, peaks, applied = [], [], []
    for _ in range(2):
        seconds, peak, factors = _init_block(block, config, log)
        init_times.append(seconds), peaks.append(peak), applied.append(factors)
    reproducible = all(torch.equal(a, b) for k in applied[0] for a, b in zip(applied[0][k], applied[1][k]))
    found: dict[str, dict] = {default: applied[0]}
    cases = {}
    for niter, oversample in settings:
        name = f"dude niter={niter} oversample={oversample}"
        found[name] = {}
        cases[name] = lambda niter=niter, oversample=oversample, out=found[name]: out.update(
            {kind: decompose.top_singular(w, R, randomized=True, niter=niter, oversample=oversample, seed=0)
             for kind, w in weights.items()})
    found["pissa_niter_4"] = {}
    cases["pissa_niter_4"] = lambda out=found["pissa_niter_4"]: out.update(
        {kind: _lowrank(w) for kind, w in weights.items()})
    timing = harness.interleaved(cases, rounds=rounds, warmup=0, log=log)
    timing[default] = harness.stats(init_times)
    exact, exact_seconds, exact_cpu = {}, {}, {}
    for kind, w in weights.items():
        t0, c0 = time.perf_counter(), time.process_time()
        exact[kind] = decompose.top_singular(w, R)
        exact_seconds[kind] = time.perf_counter() - t0
        exact_cpu[kind] = time.process_time() - c0
        errors = ", ".join(f"{name} {_error(f[kind], exact[kind]):.2%}" for name, f in found.items())
        log(f"  exact SVD {kind} {tuple(w.shape)}: {exact_seconds[kind]:.1f}s wall, {exact_cpu[kind]:.1f}s CPU; "
            f"errors: {errors}; bf16 floor {_error(truth[kind], exact[kind]):.2%}")
    block_exact = sum(exact_seconds.values())
    rows = {kind: {"shape": list(weights[kind].shape), "exact_s": round(exact_seconds[kind], 2),
                   "s_r_over_s_r1": round(truth[kind][1][R - 1].item() / _next_value(profiles[kind], weights[kind]), 6),
                   "error_floor_bf16": _error(truth[kind], exact[kind]),
                   "error": {name: _error(f[kind], exact[kind]) for name, f in found.items()}} for kind in weights}
    per_block = {name: timing[name]["median"] for name in found}
    return {
        "r": R, "threads": torch.get_num_threads(), "default": default, "matrices": rows, "time": timing,
        "block_s": {**per_block, "exact": block_exact}, "exact_cpu_s": exact_cpu,
        "model_7b_min": {**{n: BLOCKS * t / 60 for n, t in per_block.items()}, "exact": BLOCKS * block_exact / 60},
        "ratio_to_exact": {n: t / block_exact for n, t in per_block.items()},
        "ratio_to_pissa_niter_4": {n: t / per_block["pissa_niter_4"] for n, t in per_block.items()},
        "max_error": {n: max(row["error"][n] for row in rows.values()) for n in found},
        "peak_rss_above_model_mib": peaks, "largest_layer_fp32_mib": max(w.numel() for w in weights.values()) * 4 / 2**20,
        "bit_reproducible": reproducible,
    }


def _lowrank(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, v = torch.svd_lowrank(w.to(torch.float32), q=R, niter=4)  # PEFT's pissa_niter_4
    return u, s, v.T


def table(result: dict) -> str:
    names = list(result["max_error"])
    lines = ["| matrix | shape | s_r/s_r+1 | exact s | " + " | ".join(f"error {n}" for n in names) + " | bf16 floor |",
             "|---" * (len(names) + 5) + "|"]
    for kind, row in result["matrices"].items():
        errors = " | ".join(f"{row['error'][n]:.2%}" for n in names)
        lines.append(f"| {kind} | {row['shape'][0]}x{row['shape'][1]} | {row['s_r_over_s_r1']:.4f} | "
                     f"{row['exact_s']:.1f} | {errors} | {row['error_floor_bf16']:.2%} |")
    lines += ["", "| init | block s | 32 blocks, min | / exact | / pissa_niter_4 | worst error |", "|---|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {result['block_s'][n]:.1f} | {result['model_7b_min'][n]:.1f} | "
                     f"{result['ratio_to_exact'][n]:.3f} | {result['ratio_to_pissa_niter_4'][n]:.2f} | "
                     f"{result['max_error'][n]:.2%} |")
    lines += [f"| exact | {result['block_s']['exact']:.1f} | {result['model_7b_min']['exact']:.1f} | 1 | | 0 |", "",
              f"peak RSS above the model during dude.apply: {max(result['peak_rss_above_model_mib']):.0f} MiB "
              f"(one float32 copy of the largest layer: {result['largest_layer_fp32_mib']:.0f} MiB); "
              f"same bits twice: {result['bit_reproducible']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--settings", nargs="*", default=["4/8", "10/8"], help="other niter/oversample to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log file as it comes
    torch.set_num_threads(args.threads)
    env = harness.environment("cpu")
    settings = [tuple(int(x) for x in setting.split("/")) for setting in args.settings]
    result = {"environment": env, **run(args.rounds, settings)}
    result["environment"]["loadavg_end"] = os.getloadavg()
    text = table(result)
    print(text)
    now = datetime.now(timezone.utc)
    path = Path(__file__).parent / "results" / f"vm-cpu-init-7b-{now:%Y%m%d-%H%M}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**result, "table": text}, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
