"""REPORT.md from whatever runs have finished: setup, tables, plots, verdicts, what is missing."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from claims import SMOOTH, _fmt, aggregate, claims, smoothed

REPO = Path(__file__).resolve().parents[2]
COMMAND = "python studies/paper_claims/run.py"


def _by(rows: list[dict], **match: Any) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def collect(study: Any) -> dict[str, Any]:
    """Aggregates of the finished runs: sweep losses, main and rank tables per task."""
    rows = study.records()
    out: dict[str, Any] = {"sweep": {}, "main": {}, "rank": {}, "base": {}, "rows": rows}
    for budget in study.study.tasks:
        task = budget.task
        base_rows = _by(rows, phase="base", task=task)
        base = base_rows[0]["accuracy"] if base_rows else {}
        out["base"][task] = base
        out["sweep"][task] = {(r["method"], r["lr"]): r["val"]["val_loss"] for r in _by(rows, phase="sweep", task=task)}
        main = _by(rows, phase="main", task=task)
        lora = [smoothed(r["loss"])[-1] for r in _by(main, method="lora") if r["loss"]]
        target = sum(lora) / len(lora) if lora else None
        out.setdefault("target", {})[task] = target
        out["main"][task] = {m: aggregate(_by(main, method=m), base, target)
                             for m in study.study.methods if _by(main, method=m)}
        if not budget.rank_ablation:
            continue
        ranks: dict[str, dict[int, dict]] = {}
        for m in study.study.methods:
            seed0 = _by(main, method=m, seed=0)
            by_r = {r["r"]: aggregate([r], base, target) for r in _by(rows, phase="rank", task=task, method=m)}
            if seed0:
                by_r[study.study.r] = aggregate(seed0, base, target)
            if by_r:
                ranks[m] = dict(sorted(by_r.items()))
        out["rank"][task] = ranks
    return out


def plot_curves(rows: list[dict], task: str, path: Path, target: float | None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _by(rows, phase="main", task=task)
    if not main:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in ("lora", "dora", "pissa", "dude"):
        runs = [r for r in _by(main, method=method) if r["loss"]]
        if not runs:
            continue
        n = min(len(r["loss"]) for r in runs)
        curves = [smoothed(r["loss"])[:n] for r in runs]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        steps = runs[0]["steps"][:n]
        line, = ax.plot(steps, mean, label=f"{method} (lr {runs[0]['lr']:g}, {len(runs)} seeds)", linewidth=1.6)
        if len(runs) > 1:
            ax.fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                            [max(c[i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.15)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"LoRA final {target:.3f}")
    ax.set(xlabel="step", ylabel=f"training loss ({SMOOTH}-step mean)", title=f"{task}, r=16: mean over seeds (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _setup(study: Any) -> list[str]:
    s = study.study
    lines = ["## Setup", "",
             "- **Model**: SmolLM2-135M-Instruct (the built-in model, float32, CPU), adapters on all 7 linear "
             f"projections of every block, r = alpha = {s.r}, PiSSA/DuDe factors from a seeded randomized SVD.",
             "- **Optimizer**: AdamW, 10% linear warmup then cosine to 0, clip 1.0, no weight decay; the same "
             "budget for every method.",
             "- **Tasks** (response-only loss, the model's chat template):"]
    for b in s.tasks:
        split = ("variants of 70 GSM8K templates for training; held-out = variants of the 30 other templates "
                 "(no template in both)" if b.task == "gsm_symbolic" else
                 "BIG-bench task, seeded 80/20 question split; scored by the log-likelihood of the answer letter")
        lines.append(f"  - `{b.task}`: {split}. Budget: {b.steps} steps x batch {b.batch_size}, max length "
                     f"{b.max_length} tokens; held-out eval on {b.eval_limit} examples; MMLU dev "
                     f"{b.mmlu_limit or 282} questions before/after.")
    grid = "; ".join(f"{m}: {', '.join(f'{x:g}' for x in s.lr_grid[m])}" for m in s.methods)
    lines += [f"- **Learning-rate sweep** (seed 0, r={s.r}): {grid}. Trained on the *fit* part of the train "
              "split, scored by response-token loss on a *validation* part cut from the train split (by template "
              "for GSM-symbolic, by question for BIG-bench; never the test split). Each method then uses its "
              "lowest-validation-loss lr.",
              f"- **Main comparison**: the {len(s.methods)} methods at their best lr, seeds {s.seeds}; "
              f"**rank ablation**: r in {s.ranks} (alpha = r), seed 0, on "
              f"{', '.join(f'`{b.task}`' for b in s.tasks if b.rank_ablation) or 'no task'}.",
              f"- **Measures**: training loss curve; final loss = mean of the last {SMOOTH} steps; steps to reach "
              f"LoRA's final loss (first step whose {SMOOTH}-step mean is at or below LoRA's mean final loss); "
              "held-out accuracy; MMLU-dev accuracy after minus before (retention); training wall time; peak "
              "memory (RSS, per run process).",
              "- **Machine**: 2 CPU cores. Each run is its own process with one thread (`STUDY_THREADS` "
              "overrides), two runs side by side (`--jobs`), and some runs shared the machine with other jobs, "
              "so wall times are noisy: compare them only as ratios within a table.",
              "- **Cache**: `runs/<key>/`, key = sha256 of the resolved `dude train` config (minus output paths; "
              "minus SVD options for LoRA/DoRA, which do no SVD) and of the data files it reads. A change of a "
              "library default changes the key, so such runs are redone rather than mixed.", ""]
    return lines


def _sweep_table(study: Any, data: dict, task: str) -> list[str]:
    s = study.study
    sweep = data["sweep"][task]
    best = study.best_lrs(next(b for b in s.tasks if b.task == task))
    width = max(len(v) for v in s.lr_grid.values())
    lines = ["| method | " + " | ".join(f"lr #{i + 1}: val loss" for i in range(width)) + " | best lr |",
             "|---" * (2 + width) + "|"]
    for m in s.methods:
        cells = [f"{lr:g}: {sweep[(m, lr)]:.4f}" if (m, lr) in sweep else f"{lr:g}: -" for lr in s.lr_grid[m]]
        cells += [""] * (width - len(cells))
        grid = sorted(s.lr_grid[m])
        edge = m in best and len(grid) > 1 and best[m] in (grid[0], grid[-1])
        chosen = f"{best[m]:g}{' (grid edge)' if edge else ''}" if m in best else "(sweep unfinished)"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {chosen} |")
    lines += ["", "Validation loss (response tokens, lower is better) per lr. A best lr at the edge of "
                  "its grid may not be the method's optimum, and with 64 validation questions, differences of a "
                  "few thousandths may be noise."]
    floor = _guess_floor(study, data, task)
    if floor is not None:
        lines += ["", f"A model that has learned the answer format but guesses the letter uniformly scores "
                      f"sum ln(k) / response tokens = **{floor:.4f}** on this validation set; losses near it mean "
                      "the runs learned the format, not the questions."]
    return lines + [""]


def _guess_floor(study: Any, data: dict, task: str) -> float | None:
    """Validation loss of a uniform guess over each question's k letters (the other
    response tokens free): sum ln k / the validation set's response tokens. Multiple choice only."""
    val_file = study.data_dir / f"{task}-val.jsonl"
    sweeps = [r["val"] for r in _by(data["rows"], phase="sweep", task=task) if r.get("val")]
    if not val_file.is_file() or not sweeps:
        return None
    rows = [json.loads(x) for x in val_file.read_text().splitlines() if x.strip()]
    if not rows or "choices" not in rows[0] or sweeps[0].get("examples") != len(rows):
        return None
    return sum(math.log(len(r["choices"])) for r in rows) / sweeps[0]["tokens"]


def _main_table(data: dict, task: str) -> list[str]:
    main, base = data["main"][task], data["base"][task]
    target = data["target"][task]
    before = f"{base['mmlu'] * 100:.1f}" if "mmlu" in base else "-"
    chance = (" Chance on social_iqa's 3 balanced choices is 33%; MMLU's 4 choices, 25%."
              if task.startswith("bigbench") else " MMLU chance: 25%.")
    lines = [(f"Base model (no adapter): held-out {base['heldout'] * 100:.1f}%, MMLU dev {before}%." + chance)
             if "heldout" in base else "Base model eval not finished.", "",
             f"| method | lr | seeds | final train loss | steps to {('%.3f' % target) if target else 'LoRA final'} "
             "| held-out acc % | MMLU after % | MMLU change (pts) | train s | peak MB | trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, a in main.items():
        reach = f"{_fmt(a['steps_to_target'], '.0f')} ({a['reached']}/{a['n']} reached)"
        lines.append(f"| {m} | {a['lr']:g} | {a['n']} | {_fmt(a['final_loss'])} | {reach} | "
                     f"{_fmt(a['heldout'], '.1f', True)} | {_fmt(a['mmlu'], '.1f', True)} | "
                     f"{_fmt(a['mmlu_delta'], '+.1f', True)} | {_fmt(a['wall'], '.0f')} | {_fmt(a['peak_mb'], '.0f')} | "
                     f"{a['params']:,} |")
    return lines + ["", "Mean ± std over seeds.", ""]


def _rank_table(data: dict, task: str) -> list[str]:
    ranks = data["rank"][task]
    rs = sorted({r for by_r in ranks.values() for r in by_r})
    lines = ["| method | " + " | ".join(f"r={r}: loss / held-out % / MMLU change" for r in rs) + " |",
             "|---" * (1 + len(rs)) + "|"]
    for m, by_r in ranks.items():
        cells = [(f"{_fmt(by_r[r]['final_loss'])} / {_fmt(by_r[r]['heldout'], '.1f', True)} / "
                  f"{_fmt(by_r[r]['mmlu_delta'], '+.1f', True)}") if r in by_r else "-" for r in rs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + ["", "Seed 0 (r=16: the seed-0 main run).", ""]


def _context() -> list[str]:
    return ["## The papers' numbers, as context only", "",
            "| source | model | result |", "|---|---|---|",
            "| DuDe paper (arXiv:2505.14367) | 7B-scale | GSM8K 62.53 ± 1.59; MMLU up to 48.35 |",
            "| PiSSA paper (arXiv:2404.02948) | LLaMA-3-8B | GSM8K: PiSSA+DoRA 77.51 vs DoRA 72.38 |", "",
            "These are 7-8B models trained on ~100K MetaMathQA examples for hours on GPUs; ours is a 135M model "
            "trained for minutes on CPU. The absolute numbers do not compare; only the *direction* of the "
            "differences between methods is tested here, and a 135M model may behave differently from a 7B one.", ""]


def _recipes() -> list[str]:
    lines = ["## Paper-scale recipes", "",
             "Shipped in `configs/paper/` (they point at user-supplied files: a local 7B model, MetaMathQA as "
             "JSONL, GSM8K and MMLU test sets; see the comments in each file). On a GPU machine:", ""]
    for path in sorted((REPO / "configs" / "paper").glob("*.yaml")):
        command = "compare" if path.name.startswith("compare") else "train"
        lines.append(f"- `dude {command} --config configs/paper/{path.name}`")
    lines += ["", "To apply this study's fairness rule at that scale, sweep the lr per method first, e.g. "
              "`dude compare --config configs/paper/compare_llama2_7b_metamath.yaml --seeds 0 "
              "--lrs lora=2e-4 dora=2e-4 pissa=2e-5 dude=2e-5 --output-dir runs/paper/sweep1` (one call per lr "
              "column), then rerun with each method's best lr and `--seeds 0 1 2`.", ""]
    return lines


def write_report(study: Any, path: Path) -> None:
    data = collect(study)
    plots = path.parent / "plots"
    missing = study.missing()
    s = study.study
    done = len(data["rows"])
    out = [f"# Paper claims at 135M scale ({s.name} study)", "",
           f"Generated by `{COMMAND}{'' if s.name == 'full' else ' --' + s.name}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
           f"from the {done} finished runs in `runs/` (each cached by a hash of its resolved config).", ""]
    n_missing = sum(m.get("count", 1) for m in missing)
    seconds = [r["process_seconds"] for r in data["rows"] if "process_seconds" in r]
    if missing:
        pace = (f" Finished runs took {sum(seconds) / len(seconds) / 60:.1f} min each on average on this "
                f"(shared) machine." if seconds else "")
        out += [f"**Status: incomplete: {done} of {study.total_runs()} runs finished; {n_missing} missing** "
                f"(listed at the end).{pace} "
                f"Rerunning `{COMMAND}{'' if s.name == 'full' else ' --' + s.name}` resumes: finished runs are "
                "skipped.", ""]
    else:
        out += ["**Status: complete.**", ""]
    if s.name == "full" and (path.parent / "REPORT-quick.md").is_file():
        out += ["The `--quick` subset (social_iqa, LoRA vs DuDe, 8 steps, 2 seeds) is reported in "
                "[REPORT-quick.md](REPORT-quick.md); at that budget it is a plumbing check, not evidence.", ""]
    rows = claims(data["main"], data["rank"])
    out += ["## Verdicts", "", "| claim | verdict | numbers (ours) |", "|---|---|---|"]
    out += [f"| {r['claim']} | **{r['verdict']}** | {r['numbers']} |" for r in rows]
    out += ["", "A difference counts when it exceeds twice its standard error (seed-to-seed, or the binomial "
            "error of the eval set where larger); 'inconclusive' means within that noise at this scale; "
            "'missing' means the runs it needs have not finished.", ""]
    out += _setup(study)
    for budget in s.tasks:
        task = budget.task
        out += [f"## {task}", "", "### Learning-rate sweep", ""] + _sweep_table(study, data, task)
        out += ["### Main comparison (r=16)", ""] + (_main_table(data, task) if data["main"][task] else ["No main runs finished yet.", ""])
        name = f"{s.name}-{task}-loss.png"
        if plot_curves(data["rows"], task, plots / name, data["target"][task]):
            out += [f"![loss curves, {task}](plots/{name})", ""]
        if budget.rank_ablation:
            out += ["### Rank ablation", ""] + (_rank_table(data, task) if data["rank"][task] else ["No runs yet.", ""])
    out += _context() + _recipes()
    if missing:
        out += ["## Missing runs", "", "| phase | task | method | lr | seed | r | key / note |", "|---|---|---|---|---|---|---|"]
        out += [f"| {m.get('phase')} | {m.get('task')} | {m.get('method', '-')} | {m.get('lr', '-')} | "
                f"{m.get('seed', '-')} | {m.get('r', '-')} | {m.get('key', m.get('note', ''))} |" for m in missing]
        out.append("")
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("\n".join(out))
    os.replace(tmp, path)
