"""Targets of issue 4 and the markdown tables, from one results document (benchmarks/run.py)."""

from __future__ import annotations

import re
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _median(section: dict | None, name: str, field: str = "median") -> float | None:
    if not section or name not in section:
        return None
    return section[name][field]


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def targets(doc: dict) -> list[dict]:
    """Each target of issue 4: the measured figure, its limit, and whether it is met."""
    step = doc["train"].get("smollm2")
    mem = {k: v["peak_mib"] for k, v in doc["memory"].get("smollm2", {}).items()}
    inf = doc["inference"].get("smollm2")
    init = doc.get("init")
    rows = [
        ("DuDe step / dude LoRA step (SmolLM2)", _ratio(_median(step, "dude-dude"), _median(step, "dude-lora")), 1.05),
        ("DuDe step / PEFT DoRA+PiSSA step (SmolLM2)",
         _ratio(_median(step, "dude-dude"), _median(step, "peft-dora+pissa")), 0.85),
        ("DuDe peak train memory / dude LoRA (SmolLM2)", _ratio(mem.get("dude-dude"), mem.get("dude-lora")), 1.03),
        ("merged DuDe inference / base", _ratio(_median(inf, "merged:dude-dude"), _median(inf, "base")), 1.02),
        ("unmerged DuDe eval inference / unmerged LoRA",
         _ratio(_median(inf, "dude-dude"), _median(inf, "dude-lora")), 1.10),
    ]
    if init:
        rows.append(("randomized SVD init, all SmolLM2 layers (s)", init["time"]["randomized"]["median"], 1.0))
        rows.append(("randomized SVD principal-part error, worst layer",
                     max(v["max"] for v in init["principal_rel_error"].values()), 0.01))
    return [{"target": t, "value": v, "limit": lim, "met": None if v is None else v <= lim} for t, v, lim in rows]


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "—" if value is None else format(value, fmt)


def _step_table(key: str, step: dict, memory: dict) -> list[str]:
    lines = [f"**Training step, {key}** (forward + backward + AdamW; seconds over interleaved rounds)", "",
             "| method | median | min | max | CPU s (median) | / dude-lora | / peft-dora+pissa | peak RSS MiB | / dude-lora "
             "| saved for backward MiB | / dude-lora |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base_t, peft_t = _median(step, "dude-lora"), _median(step, "peft-dora+pissa")
    base_m = memory.get("dude-lora", {}).get("peak_mib")
    base_s = memory.get("dude-lora", {}).get("saved_for_backward_mib")
    for name in dict.fromkeys(list(step) + list(memory)):
        s = step.get(name)
        m = memory.get(name, {}).get("peak_mib")
        saved = memory.get(name, {}).get("saved_for_backward_mib")
        lines.append(
            f"| {name} | {_f(s and s['median'])} | {_f(s and s['min'])} | {_f(s and s['max'])} | "
            f"{_f(s and s['cpu']['median'])} | {_f(_ratio(s and s['median'], base_t), '.2f')} | "
            f"{_f(_ratio(s and s['median'], peft_t), '.2f')} | {_f(m, '.0f')} | {_f(_ratio(m, base_m), '.3f')} | "
            f"{_f(saved, '.0f')} | {_f(_ratio(saved, base_s), '.2f')} |")
    return lines + [""]


def markdown(doc: dict) -> str:
    env = doc["env"]
    out = [f"Run `{doc['mode']}` on {env['machine']} ({env['processor']}, {env['cpu_count']} CPUs, "
           f"{env['threads']} threads, device {env['device']}), {env['date']}; torch {env['torch']}, "
           f"transformers {env['transformers']}, peft {env['peft']}, dude at {env.get('git')}; load average at start "
           f"{_f(env.get('loadavg_start', [None])[0], '.1f')}, at end {_f((env.get('loadavg_end') or [None])[0], '.1f')}.",
           "", "| target | measured | limit | met |", "|---|---:|---:|:---:|"]
    for t in doc["targets"]:
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        out.append(f"| {t['target']} | {_f(t['value'])} | {t['limit']} | {met} |")
    out.append("")
    keys = dict.fromkeys(list(doc["train"]) + list(doc["memory"]))
    for key in keys:
        out += _step_table(key, doc["train"].get(key, {}), doc["memory"].get(key, {}))
    for key, inf in doc["inference"].items():
        out += [f"**Inference, {key}** (eval forward, batch 4x128, `inference_mode`)", "",
                "| model | median s | min | max | / base | / dude-lora |", "|---|---:|---:|---:|---:|---:|"]
        for name, s in inf.items():
            out.append(f"| {name} | {_f(s['median'])} | {_f(s['min'])} | {_f(s['max'])} | "
                       f"{_f(_ratio(s['median'], _median(inf, 'base')), '.2f')} | "
                       f"{_f(_ratio(s['median'], _median(inf, 'dude-lora')), '.2f')} |")
        out.append("")
    init = doc.get("init")
    if init:
        t = init["time"]
        out += [f"**Init**, top-{init['r']} SVD of all {init['layers']} adapted SmolLM2 layers "
                f"(randomized: niter={init['niter']}, oversample={init['oversample']})", "",
                "| | median s | min | max |", "|---|---:|---:|---:|"]
        out += [f"| {k} | {_f(v['median'])} | {_f(v['min'])} | {_f(v['max'])} |" for k, v in t.items()
                if k != "randomized"]
        for setting, acc in init["accuracy"].items():
            out += ["", f"Randomized SVD at {setting}: error per layer type, median / max", "",
                    "| layer type | principal part, rel. Frobenius | singular values, / s_1 | residual energy excess |",
                    "|---|---:|---:|---:|"]
            out += [f"| {k} | {v['median']:.1e} / {v['max']:.1e} | "
                    f"{acc['singular_value_error'][k]['median']:.1e} / {acc['singular_value_error'][k]['max']:.1e} | "
                    f"{acc['residual_energy_excess'][k]['median']:.1e} / {acc['residual_energy_excess'][k]['max']:.1e} |"
                    for k, v in acc["principal_rel_error"].items()]
        out.append("")
    return "\n".join(out)


def update_readme(readme: Path, table: str, source: Path, *, start: str = START, end: str = END,
                  by: str = "benchmarks/run.py") -> None:
    """Replace the text between the result markers of the README (appending them if absent)."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{start}\n_Generated by `{by}` from `{source}`._\n\n{table}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
