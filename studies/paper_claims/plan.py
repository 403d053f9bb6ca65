"""The study's plan: which runs exist, their full configs, and the key each is cached under.

Three phases per task (``PHASES``):

1. ``sweep``: every method at each lr of its grid, seed 0, r=16, trained on the *fit*
   part of the task's train split and scored by response-token loss on the *validation*
   part (never the test split). Each method's best lr is the one with the lowest
   validation loss.
2. ``main``: every method at its best lr, r=16, several seeds, trained on the whole train
   split, evaluated on the held-out test split and MMLU dev.
3. ``rank``: every method at its best lr, seed 0, r in ``ranks`` (r=16 is the main run).

A run is a ``dude train`` config (``TrainConfig``); its cache key is a hash of the fully
resolved config (minus the output directory and other options that do not change the
result) plus the content of any data file it reads. Phase 2 and 3 configs exist only
once phase 1 of their (task, method) has finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dude.config import AdapterConfig
from dude.train.config import DataConfig, EvalConfig, OptimConfig, RunConfig, TrainConfig
from dude.train.options import to_dict

METHODS = ("lora", "dora", "pissa", "dude")
PHASES = ("sweep", "main", "rank")
# Options that do not change what a run computes: left out of the cache key.
VOLATILE = {"run": ("output_dir", "resume", "overwrite", "progress", "save_every", "keep_checkpoints"),
            "target": ("output_dir", "overwrite")}


@dataclass
class TaskBudget:
    """One task of the study and the budget of each of its runs."""

    task: str                       # dude.data task name
    max_length: int
    steps: int
    batch_size: int
    eval_limit: int                 # held-out examples scored after training
    mmlu_limit: int | None          # None: all 282 MMLU dev questions
    max_new_tokens: int = 160       # math answers
    val_limit: int = 64             # validation examples for the lr sweep
    val_fraction: float = 0.2       # share of the train split held out for validation
    rank_ablation: bool = True      # False: no r != StudyConfig.r runs on this task


@dataclass
class StudyConfig:
    name: str
    tasks: list[TaskBudget]
    methods: tuple[str, ...] = METHODS
    lr_grid: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ranks: list[int] = field(default_factory=lambda: [4, 16, 64])
    r: int = 16


# LoRA/DoRA start from B=0 and are usually given ~10x larger lrs than PiSSA/DuDe, whose
# factors start at the principal singular vectors (see dude.compare.config.SHARED_LR);
# each grid is centred on that prior, a factor ~3 either side.
LR_GRID = {"lora": [3e-4, 1e-3, 3e-3], "dora": [3e-4, 1e-3, 3e-3],
           "pissa": [3e-5, 1e-4, 3e-4], "dude": [3e-5, 1e-4, 3e-4]}

# Budgets for < 2 h on 2 idle cores, two one-thread runs side by side (--jobs 2): a
# social_iqa step of 4 x ~85 tokens ~2.5-5 s, a GSM step of 2 x ~250 tokens ~4-7 s; letter
# scoring ~20-40 s per 100 questions; GSM generation ~1 min for 24 problems. GSM examples
# have a median of 247 tokens with the chat template, so max_length 256 keeps the final
# "#### n" of most; 192 would cut it from most answers. Measured with --jobs 2 on an
# idle machine: ~140-170 s per run (GSM main runs with generation ~200 s): the 66 runs take ~1.6 h.
FULL = StudyConfig(
    name="full",
    tasks=[TaskBudget("bigbench_social_iqa", max_length=128, steps=40, batch_size=4, eval_limit=200,
                      mmlu_limit=150),
           TaskBudget("gsm_symbolic", max_length=256, steps=24, batch_size=2, eval_limit=24, mmlu_limit=100,
                      max_new_tokens=200)],
    lr_grid=LR_GRID,
)

QUICK = StudyConfig(
    name="quick",
    tasks=[TaskBudget("bigbench_social_iqa", max_length=128, steps=8, batch_size=2, eval_limit=24,
                      mmlu_limit=24, val_limit=16)],
    methods=("lora", "dude"),
    lr_grid={"lora": [1e-3, 3e-3], "dude": [1e-4, 3e-4]},
    seeds=[0, 1],
    ranks=[4, 16],
)


def config_key(cfg: TrainConfig | Any) -> str:
    """12 hex digits of sha256 over the resolved config and the data files it reads."""
    from dude.train.options import build

    # canonical types first (alpha 16 and 16.0 are one config), as a YAML round trip gives them
    data = to_dict(build(type(cfg), to_dict(cfg)))
    for section, names in VOLATILE.items():
        for name in names:
            data.get(section, {}).pop(name, None)
    if data.get("adapter", {}).get("method") in ("lora", "dora"):
        for name in ("svd", "svd_niter", "svd_oversample"):  # only PiSSA/DuDe factor W by SVD
            data["adapter"].pop(name, None)
    files = _data_files(data)
    for name in ("path", "eval_path"):  # the content counts, not where the study folder is
        if data.get("data", {}).get(name):
            data["data"][name] = Path(data["data"][name]).name
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def saved_key(run_dir: Path) -> str | None:
    """The key of a finished run from its saved config (to re-file runs after a key change)."""
    import yaml

    from dude.train.config import EvalCommandConfig
    from dude.train.options import build

    path = run_dir / "run-config.yaml"
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text())
    return config_key(build(EvalCommandConfig if "target" in raw else TrainConfig, raw))


def _data_files(data: dict[str, Any]) -> list[str]:
    d = data.get("data", {})
    return [p for p in (d.get("path"), d.get("eval_path")) if p]


def split_files(budget: TaskBudget, data_dir: Path) -> tuple[Path, Path]:
    """(fit, validation) JSONL files cut from the task's train split, written once.

    GSM-symbolic is cut by template (a validation template is never trained on, as the
    test split); BIG-bench by question. Both cuts are seeded and deterministic.
    """
    from dude.data import load_task

    fit, val = data_dir / f"{budget.task}-fit.jsonl", data_dir / f"{budget.task}-val.jsonl"
    if fit.is_file() and val.is_file():
        return fit, val
    train = load_task(budget.task, "train")
    key = "template_id" if budget.task == "gsm_symbolic" else "question"
    groups = sorted({str(ex[key]) for ex in train})
    random.Random(1234).shuffle(groups)
    held = set(groups[:round(len(groups) * budget.val_fraction)])
    val_rows = [ex for ex in train if str(ex[key]) in held]
    random.Random(1234).shuffle(val_rows)
    fit_rows = [ex for ex in train if str(ex[key]) not in held]
    data_dir.mkdir(parents=True, exist_ok=True)
    for path, rows in ((fit, fit_rows), (val, val_rows[:budget.val_limit])):
        fields = ("question", "choices", "answer") if "choices" in rows[0] else ("question", "answer")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in rows))
        tmp.replace(path)
    return fit, val


def train_config(study: StudyConfig, budget: TaskBudget, method: str, lr: float, seed: int, r: int,
                 phase: str, data_dir: Path) -> TrainConfig:
    """The full ``dude train`` config of one run (output_dir is set by the runner)."""
    # SVD settings pinned, so a change of the library's defaults cannot change a run silently
    adapter = AdapterConfig(method=method, r=r, alpha=r, seed=seed, svd="randomized", svd_niter=10, svd_oversample=8)
    optim = OptimConfig(steps=budget.steps, lr=lr, batch_size=budget.batch_size, warmup_ratio=0.1)
    run = RunConfig(output_dir="", seed=seed, progress=False, device="cpu")
    if phase == "sweep":
        fit, val = split_files(budget, data_dir)
        fmt = "math" if budget.task == "gsm_symbolic" else "multiple_choice"
        data = DataConfig(task="file", path=str(fit), eval_path=str(val), format=fmt, max_length=budget.max_length)
        evaluation = EvalConfig(tasks=[])  # scored by validation loss (valloss.py), not by evaluation
    else:
        data = DataConfig(task=budget.task, max_length=budget.max_length)
        evaluation = EvalConfig(tasks=["heldout", "mmlu"], limit=budget.eval_limit, mmlu_limit=budget.mmlu_limit,
                                max_new_tokens=budget.max_new_tokens, batch_size=8)
    return TrainConfig(adapter=adapter, data=data, optim=optim, run=run, eval=evaluation)


@dataclass
class RunSpec:
    """One run of the plan: its place in the study and its config."""

    phase: str
    task: str
    method: str
    lr: float
    seed: int
    r: int
    config: TrainConfig

    @property
    def key(self) -> str:
        return config_key(self.config)

    def describe(self) -> dict[str, Any]:
        return {"phase": self.phase, "task": self.task, "method": self.method, "lr": self.lr,
                "seed": self.seed, "r": self.r}


def sweep_specs(study: StudyConfig, budget: TaskBudget, data_dir: Path) -> list[RunSpec]:
    return [RunSpec("sweep", budget.task, m, lr, 0, study.r,
                    train_config(study, budget, m, lr, 0, study.r, "sweep", data_dir))
            for m in study.methods for lr in study.lr_grid[m]]


def main_specs(study: StudyConfig, budget: TaskBudget, best: dict[str, float], data_dir: Path) -> list[RunSpec]:
    """Main runs for the methods whose sweep has finished (``best``: method -> lr),
    seed-major, so every method gets seed 0 first."""
    return [RunSpec("main", budget.task, m, best[m], s, study.r,
                    train_config(study, budget, m, best[m], s, study.r, "main", data_dir))
            for s in study.seeds for m in study.methods if m in best]


def ablation_ranks(study: StudyConfig, budget: TaskBudget) -> list[int]:
    """The ranks of this task's rank-ablation runs (r=study.r is the main run's seed 0)."""
    return [r for r in study.ranks if r != study.r] if budget.rank_ablation else []


def rank_specs(study: StudyConfig, budget: TaskBudget, best: dict[str, float], data_dir: Path) -> list[RunSpec]:
    """The rank ablation (seed 0; r=study.r is the main run's seed 0)."""
    return [RunSpec("rank", budget.task, m, best[m], 0, r,
                    train_config(study, budget, m, best[m], 0, r, "rank", data_dir))
            for r in ablation_ranks(study, budget) for m in study.methods if m in best]


def base_config(budget: TaskBudget) -> Any:
    """``dude eval`` of the base model: the 'before' of retention and the held-out floor."""
    from dude.train.config import EvalCommandConfig, EvalTarget

    return EvalCommandConfig(target=EvalTarget(output_dir="", overwrite=True),
                             data=DataConfig(task=budget.task, max_length=budget.max_length),
                             eval=EvalConfig(tasks=["heldout", "mmlu"], limit=budget.eval_limit,
                                             mmlu_limit=budget.mmlu_limit, max_new_tokens=budget.max_new_tokens,
                                             batch_size=8))


def with_output(cfg: Any, out: Path) -> Any:
    if hasattr(cfg, "run"):
        return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(out)))
    return dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, output_dir=str(out)))
