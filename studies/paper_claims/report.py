"""REPORT.md from whatever runs have finished: verdicts, setup, tables, plots, what is missing."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from claims import aggregate, binomial_se, fmt, smoothed, window
from context import context_lines, setup_lines
from verdicts import verdict_rows

COMMAND = "python studies/paper_claims/run.py"


def _by(rows: list[dict], **match: Any) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def collect(study: Any) -> dict[str, Any]:
    """Aggregates of the finished runs: base, sweep, main, control, rank."""
    rows = study.records()
    s = study.study
    base_rows = _by(rows, phase="base")
    base = base_rows[0]["measures"] if base_rows else {}
    main = _by(rows, phase="main")
    lora = [smoothed(r["loss"])[-1] for r in _by(main, method="lora") if r["loss"] and not r["diverged"]]
    target = sum(lora) / len(lora) if lora else None
    out: dict[str, Any] = {"rows": rows, "base": base, "target": target}
    out["main"] = {m: aggregate(_by(main, method=m), base, target) for m in s.methods if _by(main, method=m)}
    control = _by(rows, phase="control")
    out["control"] = aggregate(control, base, target) if control else None
    calib = _by(rows, phase="calib")
    out["ratio"] = calib[0]["ratio"] if calib else None
    ranks: dict[str, dict[int, dict]] = {}
    tried: dict[str, dict[int, list[dict]]] = {}  # the rank runs of more than one lr, each aggregated
    for m in s.methods:
        runs = _by(rows, phase="rank", method=m)
        by_r = {}
        for r in sorted({x["r"] for x in runs}):
            at_r = [aggregate([x], base, target) for x in sorted(_by(runs, r=r), key=lambda x: x["lr"])]
            by_r[r] = min(at_r, key=_val_loss)
            if len(at_r) > 1:
                tried.setdefault(m, {})[r] = at_r
        seed0 = _by(main, method=m, seed=0)
        if seed0:
            by_r[s.r] = aggregate(seed0, base, target)
        if by_r:
            ranks[m] = dict(sorted(by_r.items()))
    out["rank"], out["rank_tried"] = ranks, tried
    return out


def _val_loss(agg: dict) -> float:
    """The validation loss that picks among a rank's lrs (inf: diverged or not measured)."""
    return math.inf if agg["val"][0] is None else agg["val"][0]


def plot_curves(rows: list[dict], path: Path, target: float | None, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in _by(rows, phase="main") + _by(rows, phase="control") if r["loss"] and not r["diverged"]]
    if not main:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, phase in [(m, "main") for m in ("lora", "dora", "pissa", "dude")] + [("lora", "control")]:
        runs = _by(main, method=method, phase=phase)
        if not runs:
            continue
        n = min(len(r["loss"]) for r in runs)
        curves = [smoothed(r["loss"])[:n] for r in runs]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        steps = runs[0]["steps"][:n]
        kind = " (matched-lr control)" if phase == "control" else ""
        label = f"{method}{kind} lr {runs[0]['lr']:g}, {len(runs)} seeds"
        line, = ax.plot(steps, mean, label=label, linewidth=1.6, linestyle="--" if phase == "control" else "-")
        if len(runs) > 1:
            ax.fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                            [max(c[i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.15)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"LoRA final {target:.3f}")
    n_steps = max(len(r["loss"]) for r in main)
    ax.set(xlabel="step", ylabel=f"training loss ({window(n_steps)}-step mean)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def sweep_table(study: Any) -> list[str]:
    s = study.study
    grids = {m: study.sweep(m) for m in s.methods}
    width = max(len(g) for g, _ in grids.values())
    lines = ["| method | " + " | ".join(f"lr #{i + 1}: val loss" for i in range(width)) + " | best lr |",
             "|---" * (2 + width) + "|"]
    for m, (grid, best) in grids.items():
        cells = []
        for lr in grid:
            loss = study.val_loss(m, lr)
            cells.append(f"{lr:g}: " + ("-" if loss is None else "diverged" if math.isinf(loss) else f"{loss:.4f}"))
        cells += [""] * (width - len(cells))
        edge = best is not None and len(grid) > 1 and best in (grid[0], grid[-1])
        extra = len(grid) - len(s.lr_grid[m])
        note = "(sweep unfinished)" if best is None else f"{best:g}" + (
            f" (still at the grid edge after {extra} extensions)" if edge else "")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {note} |")
    return lines + ["", f"Validation response loss (seed 0, r={s.r}, lower is better). Initial grids: "
                    + "; ".join(f"{m} {', '.join(f'{x:g}' for x in s.lr_grid[m])}" for m in s.methods)
                    + f". A best lr at an edge adds the next half-decade rung past it (at most {s.max_extensions} "
                    "times), so every chosen lr has a worse lr on both sides.", ""]


def _acc(a: dict) -> str:
    mean, _, n = a["accuracy"]
    if mean is None:
        return "-"
    items = a.get("accuracy_n", 0) * max(n, 1)
    binom = binomial_se(mean, items) if items else 0.0
    return f"{fmt(a['accuracy'], '.1f', 100)} (binom. SE {binom * 100:.1f})"


def main_table(data: dict, r: int) -> list[str]:
    target = data["target"]
    head = ("| method | lr | seeds | final train loss | steps to " + (f"{target:.3f}" if target else "LoRA final")
            + " | ID loss | OOD loss | retention loss | forgetting | ID accuracy % | train s | peak MB | "
              "trainable params |")
    lines = [head, "|---" * 13 + "|"]
    base = data["base"]
    if base:
        cells = [fmt((base[k]["loss"], None, 1), ".4f") if k in base else "-" for k in ("id", "ood", "retention")]
        acc = base.get("accuracy")
        acc_text = "-" if not acc else f"{acc['accuracy'] * 100:.1f} (n={acc['n']})"
        lines.append(f"| base model | - | - | - | - | {' | '.join(cells)} | 0 | {acc_text} | - | - | 0 |")
    rows = list(data["main"].items()) + ([("lora @ matched lr (control)", data["control"])] if data["control"] else [])
    for m, a in rows:
        reach = f"{fmt(a['steps_to_target'], '.0f')} ({a['reached']}/{a['n']} reached)"
        diverged = f" (+{a['diverged']} diverged)" if a["diverged"] else ""
        lines.append(f"| {m} | {a['lr']:g} | {a['n']}{diverged} | "
                     f"{fmt(a['final_loss'])} | {reach} | {fmt(a['id'], '.4f')} | "
                     f"{fmt(a['ood'], '.4f')} | {fmt(a['retention'], '.4f')} | {fmt(a['forgetting'], '+.4f')} | "
                     f"{_acc(a)} | {fmt(a['wall'], '.0f')} | {fmt(a['peak_mb'], '.0f')} | "
                     f"{a['params'] or 0:,} |")
    return lines + ["", f"Mean ± std over seeds (r={r}). Losses: response tokens only, nats/token. Forgetting = "
                    "retention loss after - before (the base model's); > 0 is forgetting. Steps: first step whose "
                    "trailing-mean training loss reaches LoRA's mean final loss (not reached: steps + 1).", ""]


def rank_table(data: dict) -> list[str]:
    ranks = data["rank"]
    rs = sorted({r for by_r in ranks.values() for r in by_r})
    lines = ["| method | " + " | ".join(f"r={r}: ID / OOD loss / forgetting" for r in rs) + " |",
             "|---" * (1 + len(rs)) + "|"]
    for m, by_r in ranks.items():
        cells = [(f"{fmt(by_r[r]['id'], '.4f')} / {fmt(by_r[r]['ood'], '.4f')} / {fmt(by_r[r]['forgetting'], '+.4f')}")
                 if r in by_r else "-" for r in rs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Seed 0, alpha = r (so the scale s = 1 at every r), each method at its r=16 best lr or, where "
              "more lrs ran at a rank (below), the one of lower validation loss.", ""]
    gaps = [f"r={r} {ranks['dude'][r]['id'][0] - ranks['lora'][r]['id'][0]:+.4f}" for r in rs
            if "dude" in ranks and "lora" in ranks and r in ranks["dude"] and r in ranks["lora"]]
    if gaps:
        lines += [f"DuDe - LoRA, in-distribution loss, at each rank: {', '.join(gaps)} (one seed each; the main "
                  "comparison's seed-to-seed noise is in its table).", ""]
    tried = data.get("rank_tried", {})
    if tried:
        n = max(len(aggs) for by_r in tried.values() for aggs in by_r.values())
        lines += ["Learning rates tried at a rank (validation loss / in-distribution loss; * = the run that counts):", "",
                  "| method | r | " + " | ".join(f"lr #{i + 1}" for i in range(n)) + " |", "|---" * (2 + n) + "|"]
        for m, by_r in tried.items():
            for r, aggs in by_r.items():
                cells = [f"{a['lr']:g}: {fmt(a['val'], '.4f')} / {fmt(a['id'], '.4f')}"
                         + ("*" if a["lr"] == ranks[m][r]["lr"] else "") for a in aggs]
                lines.append(f"| {m} | {r} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def control_lines(study: Any, data: dict) -> list[str]:
    pair = study.study.control
    if pair is None:
        return []
    ratio = data["ratio"]
    if not ratio:
        return ["The first-step update ratio has not been computed yet.", ""]
    lines = [f"One AdamW step on the same batch changes the effective weights by sum ||dW||_F = "
             f"{ratio['norms'][pair[1]]:.4g} for {pair[1]} and {ratio['norms'][pair[0]]:.4g} for {pair[0]} "
             f"(same lr): k = **{ratio['ratio']:.3g}**. The control trains {pair[0]} at k x the best {pair[1]} lr."]
    c, tuned, matched = data["control"], data["main"].get(pair[0]), data["main"].get(pair[1])
    if c and tuned and matched:
        lines.append(f"In-distribution loss: {pair[0]} at matched lr {c['lr']:g}: {fmt(c['id'], '.4f')}; "
                     f"{pair[1]} (tuned): {fmt(matched['id'], '.4f')}; {pair[0]} (tuned, lr {tuned['lr']:g}): "
                     f"{fmt(tuned['id'], '.4f')}. If the matched-lr {pair[0]} sits at {pair[1]}'s value, the update "
                     f"size explains the difference; if it sits at tuned {pair[0]}'s or beyond, it does not (see the "
                     "last verdict row).")
        lines.append(f"Forgetting (retention loss rise, the same question for the other measure): {pair[0]} at "
                     f"matched lr {fmt(c['forgetting'], '+.4f')}; {pair[1]} (tuned) {fmt(matched['forgetting'], '+.4f')}; "
                     f"{pair[0]} (tuned) {fmt(tuned['forgetting'], '+.4f')}.")
    return lines + [""]


def write_report(study: Any, path: Path) -> None:
    data = collect(study)
    s = study.study
    missing = study.missing()
    suffix = "" if s.name == "full" else f" --{s.name}"
    unique = {r["key"]: r for r in data["rows"]}.values()
    wall = sum(r.get("process_seconds", 0) for r in unique) / 3600
    cpu = sum(r.get("cpu_seconds", 0) for r in unique) / 3600
    timed = sum("cpu_seconds" in r for r in unique)
    cpu_note = "" if timed == len(unique) else f" (CPU time recorded for {timed} of {len(unique)} items)"
    out = [f"# Paper claims at 135M scale, v2 ({s.name} study)", "",
           f"Generated by `{COMMAND}{suffix}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the "
           f"finished runs in `runs/` (each cached by a hash of its resolved config). Finished items: "
           f"**{cpu:.2f} CPU-hours**{cpu_note} (their processes' user + system time), {wall:.2f} h of process "
           "wall time (one thread each, `--jobs` side by side).", ""]
    n_missing = sum(m.get("count", 1) for m in missing)
    status = (f"**Status: incomplete: {n_missing} runs missing** (listed at the end). Rerunning `{COMMAND}{suffix}` "
              "resumes: finished runs are skipped." if missing else "**Status: complete.**")
    out += [status, ""]
    if s.name != "full":
        out += [f"The `{s.name}` subset checks the plumbing end to end (every phase, measure and report section) "
                "on a few steps and a dozen examples per set: its numbers are not evidence.", ""]
    elif (path.parent / "REPORT-quick.md").is_file():
        out += ["The plumbing check (`--quick`: LoRA vs DuDe, 4 steps, 12 examples per set) is in "
                "[REPORT-quick.md](REPORT-quick.md).", ""]
    rows = verdict_rows(data["main"], data["rank"], data["control"], s.control, data["base"])
    out += ["## Verdicts", "", "| claim | verdict | numbers (DuDe first; each comparison with its own verdict) |",
            "|---|---|---|"] + [f"| {r['claim']} | **{r['verdict']}** | {r['numbers']} |" for r in rows]
    out += ["", "Rule: a difference counts when it exceeds twice its standard error: of the per-seed differences "
            "where both methods ran the same seeds (runs of one seed share their data order: *paired by seed*), "
            "else seed-to-seed (for accuracy the binomial error where larger). The paired error became the rule after "
            "two of the three main seeds had run; each comparison gives the unpaired verdict beside it. With 3 seeds, 2 SE "
            "is looser than a t-test (4.3 SE at 2 degrees of freedom); the numbers column gives every band, so a "
            "stricter reader can apply their own. *does not hold* = the opposite beyond that noise, or a gain that even at "
            "the top of its noise band stays below 1% of the other method's loss (5% of its steps, 1 accuracy "
            "point); *inconclusive* = the noise is too wide to tell; *missing* = runs not finished.", ""]
    out += setup_lines(study) + ["## Learning-rate sweep", ""] + sweep_table(study)
    out += ["## Main comparison", ""] + (main_table(data, s.r) if data["main"] else ["No main runs finished yet.", ""])
    name = f"{s.name}-gsm_symbolic-loss.png"
    if plot_curves(data["rows"], path.parent / "plots" / name, data["target"], f"GSM-symbolic, r={s.r}: mean over "
                   "seeds (band: min-max)"):
        out += [f"![training loss curves](plots/{name})", ""]
    out += ["## Control: is it only the update size? (LoRAM, arXiv:2507.06558)", ""] + control_lines(study, data)
    out += ["## Rank ablation", ""] + (rank_table(data) if data["rank"] else ["No runs yet.", ""])
    out += context_lines()
    if missing:
        out += ["## Missing runs", "", "| phase | method | lr | seed | r | key / note |", "|---|---|---|---|---|---|"]
        out += [f"| {m.get('phase')} | {m.get('method', '-')} | {m.get('lr', '-')} | {m.get('seed', '-')} | "
                f"{m.get('r', '-')} | {m.get('key', m.get('note', ''))} |" for m in missing] + [""]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("\n".join(out))
    os.replace(tmp, path)
