"""Init: exact vs randomized top-r SVD over every adapted layer of SmolLM2, time and error.

The error is that of the principal part PiSSA and DuDe move out of the weight:
``||U S V^T (randomized) - U S V^T (exact)||_F / ||U S V^T (exact)||_F`` per layer, reported
per layer type (median and max), for ``AdapterConfig``'s defaults (niter, oversample) and
for more accurate settings. (The adapted model is exact either way: the residual takes
what the principal part leaves out. The error says how far the trained subspace is from
the top-r one.) Also reported: the largest singular-value error relative to ``s_1``, and
how much more energy the randomized rank-r approximation leaves in the residual than the
optimal one, ``||W - W_r'||_F^2 / ||W - W_r||_F^2 - 1``.
"""

from __future__ import annotations

import copy
import time

import torch

import dude
from dude import decompose
from dude.config import LLAMA_LINEAR

from . import builders, harness


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().float() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEAR}


def _errors(weights, exact, approx) -> dict:
    principal, values, excess = {}, {}, {}
    for name, w in weights.items():
        (u, s, vh), (u2, s2, vh2) = exact[name], approx[name]
        kind = name.rsplit(".", 1)[-1]
        best, got = (u * s) @ vh, (u2 * s2) @ vh2
        principal.setdefault(kind, []).append((torch.linalg.norm(got - best) / torch.linalg.norm(best)).item())
        values.setdefault(kind, []).append(((s2 - s).abs().max() / s[0]).item())
        excess.setdefault(kind, []).append((torch.linalg.norm(w - got) ** 2 / torch.linalg.norm(w - best) ** 2 - 1).item())
    as_stats = lambda d: {k: harness.stats(v) for k, v in d.items()}  # noqa: E731
    return {"principal_rel_error": as_stats(principal), "singular_value_error": as_stats(values),
            "residual_energy_excess": as_stats(excess)}


def svd_init(*, r: int, rounds: int, settings: list[tuple[int, int]] | None = None, log=print) -> dict:
    """Time all layers' SVDs: randomized at the config defaults (``rounds`` interleaved with
    the other ``settings``), exact once; then the errors of each setting against exact."""
    config = dude.AdapterConfig(method="dude", r=r, svd="randomized")
    default = (config.svd_niter, config.svd_oversample)
    settings = [default] + [s for s in (settings or []) if s != default]
    model = builders.smollm2()
    weights = _weights(model)

    def all_layers(niter: int | None, oversample: int = 0) -> dict:
        return {n: decompose.top_singular(w, r, randomized=niter is not None, niter=niter or 0,
                                          oversample=oversample, seed=config.seed) for n, w in weights.items()}

    cases = {f"randomized niter={n} oversample={o}": (lambda n=n, o=o: all_layers(n, o)) for n, o in settings}
    timing = harness.interleaved(cases, rounds=rounds, warmup=1, log=log)
    timing["randomized"] = timing[next(iter(cases))]  # the defaults, under a stable name
    t0, c0 = time.perf_counter(), time.process_time()
    exact = all_layers(None)
    timing["exact"] = {**harness.stats([time.perf_counter() - t0]), "cpu": harness.stats([time.process_time() - c0])}
    log(f"  exact SVD of {len(weights)} layers: {timing['exact']['median']:.2f}s")
    apply_times = []
    for _ in range(rounds):  # the whole of dude.apply: SVD, residual, norms, new layers
        fresh = copy.deepcopy(model)
        t0 = time.perf_counter()
        dude.apply(fresh, config)
        apply_times.append(time.perf_counter() - t0)
        del fresh
    timing["dude.apply (randomized, defaults)"] = harness.stats(apply_times)
    accuracy = {f"niter={n} oversample={o}": _errors(weights, exact, all_layers(n, o)) for n, o in settings}
    default_key = f"niter={default[0]} oversample={default[1]}"
    return {"layers": len(weights), "r": r, "niter": default[0], "oversample": default[1], "time": timing,
            "principal_rel_error": accuracy[default_key]["principal_rel_error"], "accuracy": accuracy}
