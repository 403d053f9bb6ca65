"""The study's plan (v2): which runs exist, their full configs, and the key each is cached under.

One task, GSM-symbolic, cut by ``data.py`` into train / validation / in-distribution test
(new variants of the training templates) / out-of-distribution test (held-out
templates), plus the MMLU-dev explanations as retention text. Phases:

1. ``sweep``: every method at each lr of its grid, seed 0, r=16, one epoch of the training
   set; scored by validation response loss. A best lr at an edge of the grid adds the next
   lr past that edge (``sweep_grid``), up to ``max_extensions`` times, so no method's best
   lr sits at an edge.
2. ``main``: every method at its best lr, seeds ``seeds`` (seed 0 *is* the sweep run: the
   same config, so the same cache key), all test measures; greedy accuracy on the runs of
   ``budget.accuracy_seeds``.
3. ``control``: LoRA at ``k`` times the best PiSSA lr, where ``k`` matches PiSSA's first
   AdamW step (``control.py``, a ``calib`` item), seeds ``seeds``.
4. ``rank``: each of ``rank_methods`` at its best lr, seed 0, r in ``ranks`` (alpha = r), the
   in-distribution loss; at the ranks of ``rank_lr_rungs`` also at the lrs those rungs away
   (``ladder``), the validation loss picking the run that counts (an lr tuned at r=16 need
   not suit r=64).

A run is a ``dude train`` config; its key is a hash of the resolved config (minus output
options) and of the data files it reads (``config_key``).

Budget of ``FULL``: 210 training problems (3 variants x 70 templates), batch 2, 105 steps
= 1 epoch; max_length 448 (no answer cut); validation 70, in-distribution test 420,
out-of-distribution test 90, retention 141 MMLU-dev explanations, greedy accuracy on 60
per method (seed 0; cut from 180 over the 3 seeds in the main phase's first hour, when the
base model had scored 0/60 and LoRA and DoRA 1/60 each, and generating the 60 took ~10 of a
main run's ~40 minutes); rank ablation for LoRA, PiSSA and DuDe.

CPU time, measured by ``estimate.py`` on an idle machine (``estimate.json``, 2026-11-25
19:59 UTC, one thread, load average 0.7-1.3): a training step of 2 examples 4.9 (LoRA) /
5.1 (DoRA) / 4.7 (PiSSA) / 4.9 (DuDe) CPU-s, so a run of 105 steps ~8.6 CPU-min; response
loss 1.0 CPU-s per problem, greedy generation 3.7 CPU-s per problem. ``estimate.py
--from-json``: 34 training runs (2 grid extensions assumed), **~9.9 CPU-h** (sweep 2.3, main
3.75, control 0.9, rank 2.6, base 0.3), ~5 h wall with ``--jobs 2``; the rank phase was 1.6
before its r=64 lr check (3 runs and the validation loss of every rank run) was added, once
the r=64 runs at the r=16 lrs had shown PiSSA and DuDe worse than at r=16. Over the issue's ~6 h:
31 epochs of training alone are 4.4 CPU-h, and the held-out sets are as small as the
verdicts allow (>= 400 in-distribution items). Resumable at any point (the cache, and a
checkpoint every 15 steps inside a run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dude.config import AdapterConfig
from dude.train.config import DataConfig, EvalConfig, OptimConfig, RunConfig, TrainConfig
from dude.train.options import to_dict

from data import GsmCut, write_files

METHODS = ("lora", "dora", "pissa", "dude")
PHASES = ("base", "calib", "sweep", "main", "control", "rank")
LOSS_MEASURES = ("val", "id", "ood", "retention")
TEST_MEASURES = ("id", "ood", "retention")
# what each phase measures: the validation loss picks lrs (sweep); the test sets judge the claims
NEEDS = {"base": (*LOSS_MEASURES, "accuracy"), "sweep": ("val",), "main": (*TEST_MEASURES, "accuracy"),
         "control": ("id", "retention"), "rank": ("val", "id")}
# Options that do not change what a run computes: left out of the cache key.
VOLATILE = {"run": ("output_dir", "resume", "overwrite", "progress", "save_every", "keep_checkpoints"),
            "target": ("output_dir", "overwrite")}


@dataclass
class Budget:
    """What every run of the study trains on and how it is measured."""

    cut: GsmCut = field(default_factory=GsmCut)
    epochs: float = 1.0            # passes over the training set (steps = ceil(epochs * n / batch))
    steps: int | None = None       # override (plumbing checks only: below one epoch)
    batch_size: int = 4
    max_length: int = 448          # longest GSM-symbolic example with the chat template: 430 tokens
    retention_max_length: int = 768  # longest MMLU-dev question + explanation: 727 tokens (scored, never trained)
    max_new_tokens: int = 320      # longest reference answer: 296 tokens
    eval_batch: int = 8
    gen_batch: int = 16
    accuracy_limit: int | None = None          # in-distribution problems generated (None: all)
    accuracy_seeds: list[int] | None = None    # the seeds whose main runs generate (None: all)
    limits: dict[str, int] = field(default_factory=dict)  # per loss set (plumbing checks only)

    def train_steps(self, n_train: int) -> int:
        return self.steps if self.steps is not None else math.ceil(self.epochs * n_train / self.batch_size)


@dataclass
class StudyConfig:
    name: str
    budget: Budget = field(default_factory=Budget)
    methods: tuple[str, ...] = METHODS
    lr_grid: dict[str, list[float]] = field(default_factory=dict)
    max_extensions: int = 3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ranks: list[int] = field(default_factory=lambda: [4, 16, 64])
    rank_methods: tuple[str, ...] = METHODS  # trained at the other ranks (r is the main runs')
    rank_lr_rungs: dict[int, tuple[int, ...]] = field(default_factory=dict)  # rank -> more lrs, in ladder rungs
    r: int = 16
    control: tuple[str, str] | None = ("lora", "pissa")  # (trained method, method whose first step it matches)


def ladder(lr: float, step: int) -> float:
    """``step`` rungs along the half-decade ladder 1e-4, 3e-4, 1e-3, 3e-3, ... from ``lr``."""
    rung = round(2 * math.log10(lr)) + step
    return float(f"{10 ** (rung / 2):.0e}")


def sweep_grid(initial: list[float], loss_of: Callable[[float], float | None],
               max_extensions: int) -> tuple[list[float], bool]:
    """(grid, settled): the initial grid plus one rung past the edge that won, for as long
    as every lr of the grid has a validation loss (``loss_of(lr)``, None: not run yet);
    settled once the best lr is inside the grid or ``max_extensions`` rungs were added.
    A diverged run's loss is ``inf``, so it never wins."""
    grid, extensions = sorted(initial), 0
    while all(loss_of(lr) is not None for lr in grid):
        best = min(grid, key=loss_of)
        if best not in (grid[0], grid[-1]) or extensions == max_extensions:
            return grid, True
        grid = [ladder(best, -1)] + grid if best == grid[0] else grid + [ladder(best, +1)]
        extensions += 1
    return grid, False


def rank_runs_per_method(study: StudyConfig) -> int:
    """Rank-ablation runs of each of ``rank_methods``: one per rank other than ``r``, one per extra lr rung."""
    return len([r for r in study.ranks if r != study.r]) + sum(len(rungs) for rungs in study.rank_lr_rungs.values())


def adapter_config(method: str, r: int, seed: int) -> AdapterConfig:
    # SVD settings pinned, so a change of the library's defaults cannot change a run silently.
    # The v2 runs were computed by the library at commit dd0551a (block Krylov SVD); a8d5ddc
    # replaced it by block Lanczos (the same top-16 subspace of SmolLM2 to ~1e-3, not the same
    # bits). To add runs bit-compatibly, run this study with that library on the path:
    #   git worktree add /tmp/dude-dd0551a dd0551a && git -C /tmp/dude-dd0551a cherry-pick bb569b7
    #   PYTHONPATH=/tmp/dude-dd0551a/src python studies/paper_claims/run.py   (runs inherit it)
    # (bb569b7: the answer extraction's fix for numbers past 28 digits, a measure-only change)
    return AdapterConfig(method=method, r=r, alpha=r, seed=seed, svd="randomized", svd_niter=10, svd_oversample=8)


def data_files(study: StudyConfig, data_dir: Path) -> dict[str, Path]:
    return write_files(data_dir, study.budget.cut)


def n_train(study: StudyConfig, data_dir: Path) -> int:
    return sum(1 for x in data_files(study, data_dir)["train"].read_text().splitlines() if x.strip())


def train_config(study: StudyConfig, method: str, lr: float, seed: int, r: int, data_dir: Path) -> TrainConfig:
    """The full ``dude train`` config of one run (output_dir is set by the runner)."""
    b = study.budget
    files = data_files(study, data_dir)
    optim = OptimConfig(steps=b.train_steps(n_train(study, data_dir)), lr=lr, batch_size=b.batch_size,
                        warmup_ratio=0.1)
    run = RunConfig(output_dir="", seed=seed, progress=False, device="cpu")
    # eval_fraction 0: train on every row (the study's own files hold the validation and test sets)
    data = DataConfig(task="file", path=str(files["train"]), format="math", max_length=b.max_length,
                      eval_fraction=0.0)
    return TrainConfig(adapter=adapter_config(method, r, seed), data=data, optim=optim, run=run,
                       eval=EvalConfig(tasks=[]))  # measured by measures.py, not by dude train's eval


def measures_of(study: StudyConfig, phase: str, seed: int = 0) -> list[str]:
    """The measures a run of ``phase`` and ``seed`` needs: ``NEEDS[phase]``, accuracy only on
    ``budget.accuracy_seeds``."""
    seeds = study.budget.accuracy_seeds
    return [m for m in NEEDS[phase] if m != "accuracy" or seeds is None or seed in seeds]


def measure_request(study: StudyConfig, data_dir: Path, phase: str, seed: int = 0) -> dict[str, Any]:
    """What ``measures.py`` computes for a run of ``phase`` and ``seed`` (written into the run folder)."""
    b = study.budget
    return {"measures": measures_of(study, phase, seed),
            "files": {k: str(v) for k, v in data_files(study, data_dir).items()},
            "max_length": b.max_length, "retention_max_length": b.retention_max_length,
            "eval_batch": b.eval_batch, "gen_batch": b.gen_batch,
            "max_new_tokens": b.max_new_tokens, "accuracy_limit": b.accuracy_limit, "limits": b.limits}


def calib_request(study: StudyConfig, data_dir: Path) -> dict[str, Any]:
    """The first-step update ratio's inputs (``control.py``); its key hashes them and the data."""
    base, matched = study.control
    return {"base": base, "matched_to": matched, "r": study.r, "seed": 0, "batch_size": study.budget.batch_size,
            "max_length": study.budget.max_length, "train_file": str(data_files(study, data_dir)["train"])}


def base_key(study: StudyConfig, data_dir: Path) -> str:
    """The base model's measures depend on the measure request (files, limits) only."""
    request = measure_request(study, data_dir, "base")
    return _hash({k: v for k, v in request.items() if k != "files"}, request["files"].values(), "base")


def calib_key(study: StudyConfig, data_dir: Path) -> str:
    request = calib_request(study, data_dir)
    return _hash({k: v for k, v in request.items() if k != "train_file"}, [request["train_file"]], "calib")


def _hash(data: dict[str, Any], files: Any, salt: str = "") -> str:
    digest = hashlib.sha256((salt + json.dumps(data, sort_keys=True)).encode())
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


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
    d = data.get("data", {})
    files = [p for p in (d.get("path"), d.get("eval_path")) if p]
    for name in ("path", "eval_path"):  # the content counts, not where the study folder is
        if d.get(name):
            d[name] = Path(d[name]).name
    return _hash(data, files)


def saved_key(run_dir: Path) -> str | None:
    """The key of a finished run from its saved config (to re-file runs after a key change)."""
    import yaml

    from dude.train.options import build

    path = run_dir / "run-config.yaml"
    if not path.is_file():
        return None
    return config_key(build(TrainConfig, yaml.safe_load(path.read_text())))


def with_output(cfg: TrainConfig, out: Path) -> TrainConfig:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(out)))


# Initial grids: LoRA/DoRA start from B=0 and take ~10x the lr of PiSSA/DuDe, whose factors
# start at the principal singular vectors; v1 (24 steps) found the best at the top edge of
# 3e-4..3e-3 (LoRA/DoRA) and 3e-5..3e-4 (PiSSA/DuDe), so the v2 grids start one rung higher.
# sweep_grid extends a grid whose best is at an edge.
LR_GRID = {"lora": [1e-3, 3e-3, 1e-2], "dora": [1e-3, 3e-3, 1e-2],
           "pissa": [1e-4, 3e-4, 1e-3], "dude": [1e-4, 3e-4, 1e-3]}

FULL = StudyConfig(name="full", lr_grid=LR_GRID, budget=Budget(
    cut=GsmCut(train_per=3, val_per=1, id_per=6, ood_per=3), batch_size=2, accuracy_limit=60,
    accuracy_seeds=[0], limits={"retention": 141}),  # a seeded half of the 282 MMLU-dev explanations
    # r=64 at the r=16 lrs left PiSSA and DuDe worse than at r=16 (ID 0.529, 0.521 vs 0.444)
    # while LoRA improved (0.444 vs 0.479): one rung lower for every rank method tells an lr
    # that does not transfer from a rank that does not help (added after those runs).
    rank_methods=("lora", "pissa", "dude"), rank_lr_rungs={64: (-1,)})

# A plumbing check: LoRA vs DuDe (control matched to DuDe), a few steps, small eval sets.
QUICK = StudyConfig(
    name="quick",
    budget=Budget(cut=GsmCut(train_per=1, val_per=1, id_per=1, ood_per=1), steps=4, batch_size=2,
                  accuracy_limit=4, max_new_tokens=200, limits={"val": 12, "id": 12, "ood": 12, "retention": 12}),
    methods=("lora", "dude"), lr_grid={"lora": [1e-3, 3e-3], "dude": [1e-4, 3e-4]}, max_extensions=1,
    seeds=[0, 1], ranks=[4, 16], control=("lora", "dude"),
)
