"""The verdict table: each paper claim, tested with the rule of ``claims.compare``.

``main[method]``: aggregates (``claims.aggregate``) of the main runs (best lr, all seeds);
``ranks[method][r]``: seed-0 aggregates per rank; ``control``: the LoRA-at-matched-lr runs.
"""

from __future__ import annotations

from typing import Any

from claims import MARGIN, combine, compare, fmt, noise, paired_noise

OTHERS = ("lora", "dora", "pissa")
NAMES = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "dude": "DuDe"}
# measure -> (higher is better, margin kind, number format, scale, unit)
MEASURES = {"steps_to_target": (False, "steps", ".0f", 1, "steps"),
            "id": (False, "loss", ".4f", 1, "nats/token"), "ood": (False, "loss", ".4f", 1, "nats/token"),
            "forgetting": (False, "loss", "+.4f", 1, "nats/token"), "accuracy": (True, "accuracy", ".1f", 100, "%")}


def _margin(kind: str, reference: float | None) -> float:
    if kind == "accuracy" or reference is None:
        return MARGIN[kind]
    return MARGIN[kind] * abs(reference)


def pairwise(main: dict[str, dict], claimant: str, measure: str, vs: tuple[str, ...],
             margin_of: dict[str, Any] | None = None) -> tuple[str, str]:
    """(combined verdict, numbers) of "``claimant`` is better than each of ``vs``"."""
    higher, kind, spec, scale, unit = MEASURES[measure]
    a = main.get(claimant)
    if not a or a[measure][0] is None:
        return "missing", f"{claimant} runs missing"
    verdicts, parts = [], []
    for m in vs:
        b = main.get(m)
        if not b or b[measure][0] is None:
            verdicts.append("missing")
            parts.append(f"{m} -")
            continue
        # the margin is relative to the compared method's own value (losses: its retention/held-out loss)
        ref = (margin_of or {}).get(m, b[measure][0])
        n_items = a.get("accuracy_n", 0) if measure == "accuracy" else 0
        paired = None if n_items else paired_noise(a.get("by_seed", {}).get(measure, {}),
                                                   b.get("by_seed", {}).get(measure, {}))
        v, diff = compare(a[measure], b[measure], higher, n_items, _margin(kind, ref), band=paired)
        verdicts.append(v)
        band = noise(a[measure], b[measure], n_items)
        num = spec.lstrip("+")
        if paired is not None:
            unpaired = compare(a[measure], b[measure], higher, n_items, _margin(kind, ref), band=band)[0]
            why = f", 2 SE {paired * scale:{num}} paired by seed; unpaired 2 SE {band * scale:{num}}: {unpaired}"
        else:
            why = f", 2 SE {band * scale:{num}}" if band is not None else ", one seed: no noise estimate"
        parts.append(f"{m} {fmt(b[measure], spec, scale)} ({v}: diff {diff * scale:+{num}}{why})")
    return combine(verdicts), f"{claimant} {fmt(a[measure], spec, scale)} vs " + "; ".join(parts) + f" [{unit}]"


def _row(claim: str, verdict_numbers: tuple[str, str]) -> dict[str, str]:
    return {"claim": claim, "verdict": verdict_numbers[0], "numbers": verdict_numbers[1]}


def verdict_rows(main: dict[str, dict], ranks: dict[str, dict[int, dict]], control: dict | None,
                 control_pair: tuple[str, str] | None, base: dict[str, Any]) -> list[dict[str, str]]:
    vs = tuple(m for m in OTHERS if m in main or m == "lora")
    id_loss = {m: a["id"][0] for m, a in main.items()}
    rows = [
        _row("Converges faster than LoRA: fewer steps to LoRA's final training loss (DuDe paper)",
             pairwise(main, "dude", "steps_to_target", ("lora",))),
        _row("Lower held-out loss in distribution (new variants of the training templates)",
             pairwise(main, "dude", "id", vs)),
        _row("Lower held-out loss out of distribution (held-out templates)", pairwise(main, "dude", "ood", vs)),
        _row("Forgets less: smaller rise of the MMLU-dev explanation loss (retention)",
             pairwise(main, "dude", "forgetting", vs, margin_of={m: base.get("retention", {}).get("loss")
                                                                  for m in main})),
        _row("Higher greedy accuracy in distribution", pairwise(main, "dude", "accuracy", vs)),
        _row("PiSSA init + DoRA (= DuDe) beats DoRA on math (PiSSA paper: GSM8K 77.51 vs 72.38), "
             "in-distribution loss", pairwise(main, "dude", "id", ("dora",))),
        _spread_row("More robust to seeds: smaller seed-to-seed std of the in-distribution loss",
                    {m: a["id"][1] for m, a in main.items() if a["id"][2] >= 3}, id_loss),
        _spread_row("More robust across ranks r=4,16,64: smaller range of the in-distribution loss",
                    _rank_ranges(ranks), id_loss),
    ]
    if control_pair is not None:
        trained, matched = control_pair
        both = dict(main, control=control) if control else dict(main)
        verdict, numbers = pairwise(both, matched, "id", ("control",))
        rows.append({"claim": f"{NAMES[matched]}'s difference from {NAMES[trained]} is more than its larger update "
                              f"(LoRAM control: {NAMES[trained]} at the lr factor that matches {NAMES[matched]}'s "
                              "first step), in-distribution loss",
                     "verdict": verdict, "numbers": numbers.replace("control", f"{trained}@matched lr")})
    return rows


def _rank_ranges(ranks: dict[str, dict[int, dict]]) -> dict[str, float]:
    out = {}
    for m, by_r in ranks.items():
        losses = [a["id"][0] for a in by_r.values() if a["id"][0] is not None]
        if len(losses) >= 3:
            out[m] = max(losses) - min(losses)
    return out


def _spread_row(claim: str, spread: dict[str, float | None], level: dict[str, float | None]) -> dict[str, str]:
    """DuDe's spread against the others': holds at <= half the smallest other, does not hold
    at >= twice the smallest and above the largest; between: inconclusive. A spread is a
    noisy statistic (3 seeds, 3 ranks), so the bands are wide."""
    spread = {m: v for m, v in spread.items() if v is not None}
    text = ", ".join(f"{m} {v:.4f}" for m, v in spread.items()) or "needs 3 seeds / 3 ranks per method"
    dude = spread.pop("dude", None)
    if dude is None or not spread:
        return {"claim": claim, "verdict": "missing", "numbers": text}
    if dude <= 0.5 * min(spread.values()) and min(spread.values()) > 0:
        verdict = "holds"
    elif dude >= 2 * min(spread.values()) and dude > max(spread.values()):
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return {"claim": claim, "verdict": verdict, "numbers": text + " [nats/token]"}
