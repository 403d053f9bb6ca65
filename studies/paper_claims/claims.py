"""Per-method aggregates of the finished runs, and the claim-by-claim verdicts.

A difference counts only when it exceeds twice its standard error. For accuracies the
standard error is the larger of the seed-to-seed one and the binomial one of the eval
set (a single seed on 60 problems cannot tell 5% from 8%); with one seed only the
binomial one is known. "does not hold" means the opposite of the claim is seen beyond
that noise; within it, the verdict is "inconclusive at this scale".
"""

from __future__ import annotations

import math
import statistics
from typing import Any

SMOOTH = 5  # steps in the trailing mean for final loss and steps-to-target


def smoothed(losses: list[float], window: int = SMOOTH) -> list[float]:
    return [statistics.fmean(losses[max(0, i + 1 - window): i + 1]) for i in range(len(losses))]


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def aggregate(runs: list[dict[str, Any]], base: dict[str, float], target: float | None) -> dict[str, Any]:
    """Mean ± std over the runs (seeds) of one method on one task."""
    finals = [smoothed(r["loss"])[-1] if r["loss"] else None for r in runs]
    reach = [next((s for s, v in zip(r["steps"], smoothed(r["loss"])) if v <= target), None)
             if target is not None and r["loss"] else None for r in runs]
    agg: dict[str, Any] = {"n": len(runs), "lr": runs[0]["lr"] if runs else None}
    agg["final_loss"] = mean_std(finals)
    agg["reached"] = sum(x is not None for x in reach)
    agg["steps_to_target"] = mean_std(reach)
    for name in ("heldout", "mmlu"):
        agg[name] = mean_std([r["accuracy"].get(name) for r in runs])
        agg[f"{name}_n"] = max((r["eval_n"].get(name, 0) for r in runs), default=0)
    agg["mmlu_delta"] = mean_std([r["accuracy"]["mmlu"] - base["mmlu"] for r in runs
                                  if "mmlu" in r["accuracy"] and "mmlu" in base])
    agg["wall"] = mean_std([r["summary"]["wall_time_s"] for r in runs])
    agg["peak_mb"] = mean_std([r["summary"]["peak_memory_mb"] for r in runs])
    agg["params"] = runs[0]["summary"]["trainable_parameters"] if runs else None
    return agg


def _se(stat: tuple[float | None, float | None, int], n_eval: int = 0) -> float | None:
    mean, std, n = stat
    if mean is None:
        return None
    seed_se = std / math.sqrt(n) if std is not None else 0.0
    binom_se = math.sqrt(max(mean * (1 - mean), 1e-12) / (n_eval * n)) if n_eval else 0.0
    se = max(seed_se, binom_se)
    return se if (std is not None or n_eval) else None


def compare(a: tuple, b: tuple, higher_better: bool, n_eval: int = 0) -> tuple[str, float | None]:
    """Verdict on 'a is better than b': holds / does not hold / inconclusive, and a - b."""
    if a[0] is None or b[0] is None:
        return "missing", None
    diff = a[0] - b[0]
    se_a, se_b = _se(a, n_eval), _se(b, n_eval)
    if se_a is None or se_b is None:
        return "inconclusive", diff  # one run each, no noise estimate
    noise = 2 * math.sqrt(se_a ** 2 + se_b ** 2)
    gain = diff if higher_better else -diff
    if gain > noise:
        return "holds", diff
    if gain < -noise:
        return "does not hold", diff
    return "inconclusive", diff


def combine(verdicts: list[str]) -> str:
    known = [v for v in verdicts if v != "missing"]
    if not known:
        return "missing"
    if "does not hold" in known:
        return "does not hold"
    if all(v == "holds" for v in known) and len(known) == len(verdicts):
        return "holds"
    return "inconclusive"


def _fmt(stat: tuple, spec: str = ".3f", pct: bool = False) -> str:
    mean, std, _ = stat
    if mean is None:
        return "-"
    k = 100 if pct else 1
    return f"{mean * k:{spec}}" + (f" ± {std * k:{spec.lstrip('+')}}" if std is not None else "")


def claims(methods: dict[str, dict[str, dict]], ranks: dict[str, dict[str, dict[int, dict]]]) -> list[dict]:
    """Verdict rows. ``methods[task][method]`` main-phase aggregates; ``ranks[task][method][r]``."""
    rows = []
    others = ("lora", "dora", "pissa")

    def pairwise(task: str, key: str, higher: bool, vs: tuple[str, ...], pct: bool = True) -> tuple[str, str]:
        agg = methods.get(task, {})
        d = agg.get("dude")
        if not d:
            return "missing", "DuDe main runs missing"
        parts, verdicts = [], []
        for m in vs:
            if m not in agg:
                verdicts.append("missing")
                continue
            n_eval = agg[m].get(f"{key}_n", 0) if key in ("heldout", "mmlu") else 0
            v, diff = compare(d[key], agg[m][key], higher, n_eval)
            verdicts.append(v)
            parts.append(f"{m} {_fmt(agg[m][key], '.1f' if pct else '.3f', pct)}")
        text = f"DuDe {_fmt(d[key], '.1f' if pct else '.3f', pct)} vs " + ", ".join(parts)
        return combine(verdicts), text

    for task in methods:
        v, text = pairwise(task, "final_loss", False, ("lora",), pct=False)
        agg = methods[task]
        if "dude" in agg and "lora" in agg:
            d = agg["dude"]
            text += (f"; steps to LoRA's final loss: DuDe {_fmt(d['steps_to_target'], '.0f')} "
                     f"(reached in {d['reached']}/{d['n']} seeds) vs LoRA {_fmt(agg['lora']['steps_to_target'], '.0f')}")
        rows.append({"claim": f"Converges faster than LoRA (train loss, {task})", "verdict": v, "numbers": text})
    kind = {"gsm_symbolic": "math (GSM-symbolic held-out templates)"}
    for task in methods:
        v, text = pairwise(task, "heldout", True, others)
        label = kind.get(task, f"the multiple-choice task ({task}; our stand-in for the paper's knowledge/MMLU "
                               "training claim)")
        rows.append({"claim": f"Higher held-out accuracy on {label} than LoRA, DoRA, PiSSA", "verdict": v,
                     "numbers": text + " (% correct)"})
    if "gsm_symbolic" in methods:
        v, text = pairwise("gsm_symbolic", "heldout", True, ("dora",))
        rows.append({"claim": "PiSSA-init + DoRA (=DuDe) beats DoRA on math (PiSSA paper: 77.51 vs 72.38)",
                     "verdict": v, "numbers": text + " (% correct)"})
    for task in methods:
        v, text = pairwise(task, "mmlu_delta", True, others)
        rows.append({"claim": f"Preserves pretrained knowledge better (MMLU-dev change after {task})",
                     "verdict": v, "numbers": text + " (points)"})
    rows.append(_robust_seeds(methods))
    rows.append(_robust_ranks(ranks))
    return rows


def _spread_verdict(dude: float | None, rest: dict[str, float]) -> str:
    if dude is None or not rest:
        return "missing"
    if dude <= 0.5 * min(rest.values()):
        return "holds"
    if dude >= 2 * min(rest.values()) and dude > max(rest.values()):
        return "does not hold"
    return "inconclusive"


def _robust_seeds(methods: dict[str, dict[str, dict]]) -> dict:
    verdicts, parts = [], []
    for task, agg in methods.items():
        # a std from fewer than 3 seeds is itself too noisy to rank methods by
        stds = {m: a["heldout"][1] for m, a in agg.items() if a["heldout"][1] is not None and a["heldout"][2] >= 3}
        if "dude" not in stds:
            verdicts.append("missing")
            continue
        verdicts.append(_spread_verdict(stds.pop("dude"), stds))
        parts.append(f"{task}: seed std of held-out acc " + ", ".join(
            f"{m} {a['heldout'][1] * 100:.1f}" for m, a in agg.items() if a["heldout"][1] is not None))
    return {"claim": "More robust to seeds (smaller seed-to-seed std of held-out accuracy)",
            "verdict": combine(verdicts), "numbers": "; ".join(parts) or "needs >= 3 seeds per method"}


def _robust_ranks(ranks: dict[str, dict[str, dict[int, dict]]]) -> dict:
    verdicts, parts = [], []
    for task, per_method in ranks.items():
        spread = {}
        for m, by_r in per_method.items():
            accs = [a["heldout"][0] for a in by_r.values() if a["heldout"][0] is not None]
            if len(accs) >= 3:
                spread[m] = max(accs) - min(accs)
        if "dude" not in spread:
            verdicts.append("missing")
            continue
        parts.append(f"{task}: range of held-out acc over r " + ", ".join(f"{m} {v * 100:.1f}" for m, v in spread.items()))
        verdicts.append(_spread_verdict(spread.pop("dude"), spread))
    return {"claim": "More robust across ranks r=4,16,64 (smaller spread of held-out accuracy)",
            "verdict": combine(verdicts), "numbers": "; ".join(parts) or "needs r=4,16,64 runs"}
