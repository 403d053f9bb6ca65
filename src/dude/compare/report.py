"""The comparison's numbers: read every run's files, derive the table, plot the curves."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..train.rundir import plot_losses, read_lines
from .config import CompareConfig


def smoothed(losses: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    return [sum(losses[max(0, i + 1 - window): i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(losses))]


def steps_to(target: float, steps: list[int], curve: list[float]) -> int | None:
    """First step whose smoothed loss is at or below ``target``."""
    return next((s for s, v in zip(steps, curve) if v <= target), None)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _scores(evaluation: dict[str, Any] | None, key: str) -> dict[str, float]:
    """Eval set -> its ``key`` in an ``eval.json`` (of ``dude train``, or under "results" of
    ``dude eval``): "accuracy" for math and choice sets, "loss" (response loss) for text sets."""
    if not evaluation:
        return {}
    results = evaluation.get("results", evaluation)
    return {k: v[key] for k, v in results.items() if isinstance(v, dict) and key in v}


def build(cfg: CompareConfig, root: Path, runs: list[dict[str, Any]], base_code: int | None,
          wall_time: float) -> dict[str, Any]:
    """Everything: per-run curves, summaries and accuracies; per-method aggregates."""
    window = cfg.compare.smooth
    base_eval = _read_json(root / "base" / "eval.json") if base_code == 0 or base_code is None else None
    base = {"accuracy": _scores(base_eval, "accuracy"), "response_loss": _scores(base_eval, "loss")}
    for run in runs:
        out = root / run["name"]
        lines = read_lines(out / "metrics.jsonl")
        run["method"], _, seed = run["name"].rpartition("-seed")
        run["seed"] = int(seed)
        run["steps"] = [r["step"] for r in lines]
        run["loss"] = [r["loss"] for r in lines]
        run["smoothed"] = smoothed(run["loss"], window)
        run["summary"] = _read_json(out / "summary.json")
        evaluation = _read_json(out / "eval.json")
        run["accuracy"], run["response_loss"] = _scores(evaluation, "accuracy"), _scores(evaluation, "loss")
        finished = run["returncode"] == 0 and run["smoothed"] and run["summary"]  # trained and evaluated
        run["final_loss"] = run["smoothed"][-1] if finished else None
    finished = [r for r in runs if r["final_loss"] is not None]
    target = cfg.compare.loss_target
    if target is None and finished:
        target = max(r["final_loss"] for r in finished)
    for run in runs:
        run["steps_to_target"] = steps_to(target, run["steps"], run["smoothed"]) if run["final_loss"] else None
    methods = {m: _aggregate([r for r in runs if r["method"] == m], base, cfg) for m in cfg.compare.methods}
    return {"config": {k: v for k, v in _config(cfg).items()}, "loss_target": target, "smooth": window,
            "base_accuracy": base["accuracy"], "base_response_loss": base["response_loss"], "methods": methods, "runs": runs, "wall_time_s": round(wall_time, 1)}


def _config(cfg: CompareConfig) -> dict[str, Any]:
    from ..train.options import to_dict

    return to_dict(cfg)


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _means(ok: list[dict[str, Any]], key: str, base: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Per eval set, the mean of ``run[key]`` over the runs, and after - before where the
    base model ran that set too."""
    names = sorted({k for r in ok for k in r[key]})
    means = {k: _mean([r[key].get(k) for r in ok]) for k in names}
    return means, {k: means[k] - base[k] for k in means if k in base and means[k] is not None}


def _aggregate(runs: list[dict[str, Any]], base: dict[str, dict[str, float]], cfg: CompareConfig) -> dict[str, Any]:
    ok = [r for r in runs if r["final_loss"] is not None]
    accuracy, deltas = _means(ok, "accuracy", base["accuracy"])
    response_loss, loss_deltas = _means(ok, "response_loss", base["response_loss"])
    retention = deltas.get("mmlu")  # "retention" is MMLU's accuracy change
    summaries = [r["summary"] for r in ok]
    errors = [r.get("error") or "no metrics" for r in runs if r["final_loss"] is None]
    return {
        "lr": cfg.compare.lrs.get(runs[0]["method"], cfg.optim.lr) if runs else None,
        "runs": len(runs), "failed": len(runs) - len(ok), "error": errors[0] if errors else None,
        "final_loss": _mean([r["final_loss"] for r in ok]),
        "final_loss_std": statistics.stdev([r["final_loss"] for r in ok]) if len(ok) > 1 else None,
        "steps_to_target": _mean([r["steps_to_target"] for r in ok]),
        "accuracy": accuracy,
        "mmlu_before": base["accuracy"].get("mmlu"), "mmlu_after": accuracy.get("mmlu"), "retention": retention,
        "accuracy_change": deltas,
        "response_loss": response_loss, "response_loss_change": loss_deltas,
        "train_wall_time_s": _mean([s["wall_time_s"] for s in summaries]),
        "peak_memory_mb": _mean([s["peak_memory_mb"] for s in summaries]),
        "trainable_parameters": summaries[0]["trainable_parameters"] if summaries else None,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _label(name: str, task: str) -> str:
    """A column title for eval set ``name`` of a comparison trained on ``task``."""
    if name == "heldout_variants":
        return "in-distribution"  # new variants of the trained templates
    if name == "heldout":
        return "out-of-distribution" if task == "gsm_symbolic" else "held-out"
    return {"mmlu_explanations": "MMLU text", "mmlu": "MMLU", "gsm_original": "GSM8K originals"}.get(name, name)


def _columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    """``(eval set, key)`` of every score some method or the base has: response losses first
    (the measure that separates the methods), then accuracies, in ``eval.tasks`` order."""
    cfg = result["config"]
    order = list(dict.fromkeys([*cfg["eval"]["tasks"], *cfg["compare"]["base_tasks"]]))
    have = {key: {n for m in result["methods"].values() for n in m[key]} | set(result[f"base_{key}"])
            for key in ("response_loss", "accuracy")}
    return [(n, key) for key in ("response_loss", "accuracy") for n in order if n in have[key]]


def table(result: dict[str, Any]) -> str:
    """A Markdown table, one row per method: training loss, steps to the target, each held-out
    score with its change from the base model, time and memory; a failed method's reason."""
    target, task = result["loss_target"], result["config"]["data"]["task"]
    columns = _columns(result)
    header = ["method", "lr", "final train loss", f"steps to {_fmt(target, '.3f')}"]
    for name, key in columns:
        base = result[f"base_{key}"].get(name)
        title = f"{_label(name, task)} {'loss' if key == 'response_loss' else 'acc'}"
        header.append(title + (f" (base {base:.3f})" if base is not None else ""))
    header += ["train time s", "peak MB"]
    rows = [header, ["---"] * len(header)]
    for method, m in result["methods"].items():
        if m["final_loss"] is None:
            reason = m.get("error") or "no metrics"
            rows.append([method, _fmt(m["lr"], "g"), f"failed: {_short(reason)}"] + ["-"] * (len(header) - 3))
            continue
        std = f" ± {m['final_loss_std']:.3f}" if m["final_loss_std"] is not None else ""
        row = [method, _fmt(m["lr"], "g"), f"{m['final_loss']:.3f}{std}", _fmt(m["steps_to_target"], ".0f")]
        for name, key in columns:
            change = m[f"{key}_change"].get(name)
            row.append(_fmt(m[key].get(name), ".3f") + (f" ({change:+.3f})" if change is not None else ""))
        rows.append(row + [_fmt(m["train_wall_time_s"], ".0f"), _fmt(m["peak_memory_mb"], ".0f")])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\nfinal train loss: mean of the last {result['smooth']} steps; steps to target: first step whose "
            f"{result['smooth']}-step mean reaches it; held-out scores: response loss (nats/token) or accuracy, "
            f"(change from the base model); total wall time {result['wall_time_s']:.0f} s")
    if result.get("base_error"):
        note += f"\nthe base evaluation failed: {_short(result['base_error'])}"
    return "\n".join(lines) + note


def _short(reason: str, width: int = 90) -> str:
    """A reason that fits a table cell (compare.json keeps it whole)."""
    reason = reason.replace("|", "/")
    return reason if len(reason) <= width else reason[:width - 3] + "..."


def plot(result: dict[str, Any], path: Path) -> None:
    curves = {}
    for method in result["methods"]:
        runs = [r for r in result["runs"] if r["method"] == method and r["steps"]]
        if not runs:
            continue
        n = min(len(r["steps"]) for r in runs)
        mean = [statistics.fmean(r["smoothed"][i] for r in runs) for i in range(n)]
        curves[f"{method} (lr {result['methods'][method]['lr']:g})"] = (runs[0]["steps"][:n], mean)
    cfg = result["config"]
    plot_losses(path, curves, f"{cfg['compare']['smooth']}-step mean training loss, r={cfg['adapter']['r']}, "
                              f"{cfg['data']['task']}", result["loss_target"])
