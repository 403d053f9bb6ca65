"""Per-method aggregates of the finished runs, and the claim-by-claim verdicts.

The rule. For a claim "A is better than B" on a measure with seed means a, b, let gain =
a - b (or b - a where lower is better) and noise = twice the standard error of the gain:

- where A and B ran the same seeds (2 or more), the *paired* one, ``paired_noise``: runs of
  one seed share their data order and so their seed's own luck, which cancels in the
  per-seed difference d_s = a_s - b_s; noise = 2 std(d) / sqrt(seeds);
- otherwise the unpaired one, ``noise``: 2 sqrt(se_a^2 + se_b^2) with se = std / sqrt(seeds)
  (for accuracy the larger of that and the binomial one of items * seeds problems,
  ``binomial_se``).

The paired error became the rule after two of the three main seeds had run (the first rule
ignored the pairing the design has); the report gives the unpaired verdict beside each
comparison.

- **holds**: gain > noise;
- **does not hold**: gain < -noise (the opposite is seen), or gain + noise < margin (the
  gain, at the top of its noise band, is still below the smallest difference that counts:
  1% of B's loss, 5% of B's steps, 1 accuracy point): "no gain worth the name";
- **inconclusive**: otherwise (the noise is too wide to tell either way), or one seed only.

A claim against several methods holds when it holds against each, does not hold when it
does not hold against any; the numbers column gives each comparison.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

MARGIN = {"loss": 0.01, "steps": 0.05, "accuracy": 0.01}  # relative, relative, absolute


def window(n_steps: int) -> int:
    """Steps in the trailing mean of the training loss: a tenth of the run, at least 5."""
    return max(5, n_steps // 10)


def smoothed(losses: list[float], w: int | None = None) -> list[float]:
    w = w or window(len(losses))
    return [statistics.fmean(losses[max(0, i + 1 - w): i + 1]) for i in range(len(losses))]


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def steps_to(run: dict[str, Any], target: float | None) -> int | None:
    """First step whose trailing-mean loss is at or below ``target``; not reached: the run's
    steps + 1 (censored: "later than the run")."""
    if target is None or not run["loss"]:
        return None
    return next((s for s, v in zip(run["steps"], smoothed(run["loss"])) if v <= target), run["steps"][-1] + 1)


def _measure(run: dict[str, Any], name: str) -> float | None:
    m = run["measures"].get(name)
    return None if m is None else m["accuracy" if name == "accuracy" else "loss"]


def aggregate(runs: list[dict[str, Any]], base: dict[str, Any], target: float | None) -> dict[str, Any]:
    """Mean ± std over the runs (seeds) of one method and config."""
    ok = [r for r in runs if not r.get("diverged")]
    agg: dict[str, Any] = {"n": len(ok), "diverged": len(runs) - len(ok), "lr": runs[0]["lr"] if runs else None}
    agg["final_loss"] = mean_std([smoothed(r["loss"])[-1] if r["loss"] else None for r in ok])
    reach = [steps_to(r, target) for r in ok]
    agg["steps_to_target"] = mean_std(reach)
    agg["reached"] = sum(x is not None and x <= r["steps"][-1] for x, r in zip(reach, ok))
    by_seed = {"steps_to_target": {r["seed"]: x for r, x in zip(ok, reach) if x is not None}}
    for name in ("val", "id", "ood", "retention", "accuracy"):
        agg[name] = mean_std([_measure(r, name) for r in ok])
        by_seed[name] = {r["seed"]: _measure(r, name) for r in ok if _measure(r, name) is not None}
    agg["accuracy_n"] = max((r["measures"].get("accuracy", {}).get("n", 0) for r in ok), default=0)
    before = base.get("retention", {}).get("loss")
    by_seed["forgetting"] = {} if before is None else {s: v - before for s, v in by_seed["retention"].items()}
    agg["forgetting"] = mean_std(list(by_seed["forgetting"].values()))
    agg["by_seed"] = by_seed  # measure -> {seed: value}: the pairs of the paired rule
    agg["wall"] = mean_std([r["summary"]["wall_time_s"] for r in ok if r.get("summary")])
    agg["peak_mb"] = mean_std([r["summary"]["peak_memory_mb"] for r in ok if r.get("summary")])
    agg["params"] = next((r["summary"]["trainable_parameters"] for r in ok if r.get("summary")), None)
    return agg


def _se(stat: tuple[float | None, float | None, int], n_items: int = 0) -> float | None:
    mean, std, n = stat
    if mean is None or (std is None and not n_items):
        return None
    seed_se = std / math.sqrt(n) if std is not None else 0.0
    return max(seed_se, binomial_se(mean, n_items * n) if n_items else 0.0)


def binomial_se(p: float, items: int) -> float:
    """sqrt(p~ (1 - p~) / items) with p~ = (correct + 1) / (items + 2): 0 of 420 correct is
    not a certain 0% (the plain formula would give a standard error of 0)."""
    p_adj = (p * items + 1) / (items + 2)
    return math.sqrt(p_adj * (1 - p_adj) / items)


def noise(a: tuple, b: tuple, n_items: int = 0) -> float | None:
    """2 sqrt(se_a^2 + se_b^2): how far apart a and b must be to count (None: one seed, no items)."""
    se_a, se_b = _se(a, n_items), _se(b, n_items)
    return None if se_a is None or se_b is None else 2 * math.sqrt(se_a ** 2 + se_b ** 2)


def paired_noise(a_by_seed: dict[int, float], b_by_seed: dict[int, float]) -> float | None:
    """2 std(d) / sqrt(n) of the per-seed differences d_s = a_s - b_s; None unless both ran
    the same 2 or more seeds."""
    if set(a_by_seed) != set(b_by_seed) or len(a_by_seed) < 2:
        return None
    d = [a_by_seed[s] - b_by_seed[s] for s in sorted(a_by_seed)]
    return 2 * statistics.stdev(d) / math.sqrt(len(d))


def compare(a: tuple, b: tuple, higher_better: bool, n_items: int = 0, margin: float = 0.0,
            band: float | None = None) -> tuple[str, float | None]:
    """Verdict on "a is better than b" (see the module docstring) and a - b; ``band``: the
    paired noise where there is one, else the unpaired one is used."""
    if a[0] is None or b[0] is None:
        return "missing", None
    diff = a[0] - b[0]
    band = noise(a, b, n_items) if band is None else band
    if band is None:
        return "inconclusive", diff  # one run each, no noise estimate
    gain = diff if higher_better else -diff
    if gain > band:
        return "holds", diff
    if gain < -band or gain + band < margin:
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
    return "inconclusive" if len(known) == len(verdicts) else "missing"


def fmt(stat: tuple, spec: str = ".3f", scale: float = 1.0) -> str:
    mean, std, _ = stat
    if mean is None:
        return "-"
    return f"{mean * scale:{spec}}" + (f" ± {std * scale:{spec.lstrip('+')}}" if std is not None else "")
