"""Measure the unit costs of the study on this machine and estimate its total CPU time.

    python studies/paper_claims/estimate.py   # writes estimate.json
    python studies/paper_claims/estimate.py --from-json                   # the study's CPU hours from it

One thread, like the study's runs. CPU seconds (``time.process_time``) are measured beside
wall seconds: on a machine shared with other jobs, CPU time is the stable number, and with
``--jobs 2`` on 2 cores the study's wall time is about its CPU time / 2 when nothing else runs.
Units: one training step (batch of the study's training set) per method, response-loss
tokens per second, and greedy generation of one batch of in-distribution problems.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def step_costs(rows: list[dict], budget, methods=("lora", "dora", "pissa", "dude"), steps: int = 3) -> dict:
    import dude
    from dude.data import build_sft_examples, collate_sft

    from plan import adapter_config

    out = {}
    for method in methods:
        model, tokenizer = dude.load_model()
        dude.apply(model, adapter_config(method, 16, 0))
        model.train()
        opt = torch.optim.AdamW(dude.adapter_parameters(model), lr=1e-5)
        examples = build_sft_examples(tokenizer, rows, budget.max_length)
        times = []
        for s in range(steps + 1):  # the first step warms up: not counted
            batch = collate_sft(examples[s * budget.batch_size:(s + 1) * budget.batch_size], tokenizer.pad_token_id)

            def step() -> None:
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
            times.append(_timed(step))
        out[method] = {"wall_s": sum(t[0] for t in times[1:]) / steps, "cpu_s": sum(t[1] for t in times[1:]) / steps}
    return out


def eval_costs(files: dict, budget, n_loss: int = 32, n_gen: int = 16) -> dict:
    import dude
    from dude.evaluate.math import evaluate_math

    from measures import read_jsonl
    from valloss import response_loss

    model, tokenizer = dude.load_model()
    rows = read_jsonl(files["id"], max(n_loss, n_gen))
    result = {}
    wall, cpu = _timed(lambda: result.update(response_loss(model, tokenizer, rows[:n_loss], budget.max_length,
                                                           budget.eval_batch)))
    gen: dict = {}
    gwall, gcpu = _timed(lambda: gen.update(evaluate_math(model, tokenizer, rows[:n_gen], budget.gen_batch,
                                                          budget.max_new_tokens)))
    return {"loss_tokens": result["tokens"], "loss_examples": n_loss, "loss_wall_s": wall, "loss_cpu_s": cpu,
            "gen_examples": n_gen, "gen_wall_s": gwall, "gen_cpu_s": gcpu}


def study_cpu_hours(units: dict, study, n_train: int, sizes: dict[str, int], extensions: int = 2) -> dict:
    """CPU hours of ``study`` from measured unit costs: training steps per method, loss
    evaluation per example, generation per problem. ``extensions``: extra sweep runs
    expected from grid extensions (each a full run of an average method)."""
    from plan import measures_of, rank_runs_per_method

    steps = study.budget.train_steps(n_train)
    scale = study.budget.batch_size / units.get("batch_size", study.budget.batch_size)  # cost ~ examples per step
    step = {m: units["steps"][m]["cpu_s"] * scale for m in units["steps"]}
    per_loss = units["eval"]["loss_cpu_s"] / units["eval"]["loss_examples"]
    per_gen = units["eval"]["gen_cpu_s"] / units["eval"]["gen_examples"]
    n_acc = min(sizes["id"], study.budget.accuracy_limit or 10 ** 9)

    def measures(phase: str, seed: int = 0) -> float:
        wanted = measures_of(study, phase, seed)
        return sum(sizes[m] * per_loss for m in wanted if m != "accuracy") + n_acc * per_gen * ("accuracy" in wanted)

    mean_step = sum(step.values()) / len(step)
    n_grid = sum(len(g) for g in study.lr_grid.values())
    n_rank = rank_runs_per_method(study)
    parts = {
        "sweep": sum(len(study.lr_grid[m]) * (steps * step[m] + measures("sweep")) for m in study.methods)
        + extensions * (steps * mean_step + measures("sweep")),
        "main": sum(sum(steps * step[m] * (seed != 0) + measures("main", seed) for seed in study.seeds)
                    for m in study.methods),  # seed 0 is the sweep run: its training is counted there
        "control": len(study.seeds) * (steps * step["lora"] + measures("control")),
        "rank": sum(n_rank * (steps * step[m] + measures("rank")) for m in study.rank_methods),  # r=64 ~ r=16
        "base": measures("base"),
    }
    hours = {k: round(v / 3600, 2) for k, v in parts.items()}
    return {"train_steps": steps, "runs": n_grid + extensions + len(study.methods) * (len(study.seeds) - 1)
            + len(study.rank_methods) * n_rank + len(study.seeds), "cpu_hours": hours, "total_cpu_hours": round(sum(parts.values()) / 3600, 2)}


def main() -> None:
    torch.set_num_threads(1)
    from measures import read_jsonl
    from plan import FULL, data_files, n_train

    files = data_files(FULL, HERE / "data")
    if sys.argv[1:] == ["--from-json"]:  # recompute the estimate from the saved unit costs
        units = json.loads((HERE / "estimate.json").read_text())
        sizes = {k: min(len(read_jsonl(p)), FULL.budget.limits.get(k, 10 ** 9)) for k, p in files.items()}
        print(json.dumps(study_cpu_hours(units, FULL, n_train(FULL, HERE / "data"), sizes), indent=1))
        return
    load_before = os.getloadavg()
    steps = step_costs(read_jsonl(files["train"], 16), FULL.budget)
    evals = eval_costs(files, FULL.budget)
    result = {"load_average_before": load_before, "load_average_after": os.getloadavg(), "threads": 1,
              "batch_size": FULL.budget.batch_size,
              "steps": steps, "eval": evals, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (HERE / "estimate.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
