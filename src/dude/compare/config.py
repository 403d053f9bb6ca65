"""The config of ``dude compare``: a training config shared by all methods, plus the
comparison itself (methods, per-method learning rates, seeds, loss target)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import METHODS, AdapterConfig
from ..train.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig
from ..train.options import opt

# Each method at the lr that studies/paper_claims picked on validation loss for this model
# and task (SmolLM2-135M-Instruct, GSM-symbolic, r=16: a grid per method, extended until
# the best lr was inside it). LoRA and DoRA start from B = 0 and take a larger lr than
# PiSSA and DuDe, which start from the principal singular factors.
TUNED_LRS = {"lora": 3e-3, "dora": 3e-3, "pissa": 1e-3, "dude": 1e-3}
# Eval sets a comparison can also run on the base model (the "before" of each measure)
BASE_SETS = ("heldout", "heldout_variants", "gsm_original", "mmlu", "mmlu_explanations")


@dataclass
class CompareSpec:
    methods: list[str] = opt(list(METHODS), f"methods to compare, from {list(METHODS)}")
    lrs: dict[str, float] = opt(dict(TUNED_LRS), "peak lr per method (METHOD=LR); a method not listed uses "
                                                 "optim.lr (default: the lrs studies/paper_claims tuned on "
                                                 "GSM-symbolic; empty: optim.lr for all)")
    seeds: list[int] = opt([0], "one run per method and seed (seeds the data order and the init)")
    loss_target: float | None = opt(None, "loss for 'steps to target' (empty: the worst method's final "
                                          "smoothed loss, which every method reaches)")
    smooth: int = opt(5, "moving-average window (steps) for final loss and steps to target")
    base_tasks: list[str] = opt(["heldout_variants", "heldout", "mmlu_explanations"],
                                "eval sets to run on the base model too: the 'before' of each measure (empty: none)")

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"compare.methods must name methods from {list(METHODS)}, got {self.methods}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"compare.methods repeats a method: {self.methods}")
        bad = [m for m in self.lrs if m not in METHODS]
        if bad:
            raise ValueError(f"compare.lrs has unknown method(s) {bad}; methods are {list(METHODS)}")
        if any(v <= 0 for v in self.lrs.values()):
            raise ValueError(f"compare.lrs must be positive, got {self.lrs}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"compare.seeds must be distinct and not empty, got {self.seeds}")
        unknown = sorted(set(self.base_tasks) - set(BASE_SETS))
        if unknown and not all(t.startswith("file:") for t in unknown):
            raise ValueError(f"compare.base_tasks: unknown eval set(s) {unknown}; use {list(BASE_SETS)} or file:<path>")
        if self.smooth < 1:
            raise ValueError(f"compare.smooth must be >= 1, got {self.smooth}")


# The no-argument budget, ~9 minutes on 2 idle cores: GSM-symbolic (shipped), 24 steps of
# 2 worked solutions (loss on the solution), then the response loss of three held-out sets
# that need no generation (greedy GSM accuracy of a 135M model is at the floor, 0-2%):
# new variants of the trained templates (in distribution), templates never trained on (out
# of distribution), and the MMLU dev explanations (text the task does not teach: its rise
# over the base model is forgetting). studies/paper_claims found these separate the methods.
def _default_data() -> DataConfig:
    return DataConfig(task="gsm_symbolic", max_length=448)  # the longest example is 430 tokens


def _default_optim() -> OptimConfig:
    return OptimConfig(steps=24, batch_size=2, warmup_ratio=0.1, lr=1e-3)


def _default_eval() -> EvalConfig:
    return EvalConfig(tasks=["heldout_variants", "heldout", "mmlu_explanations"], math_scores=["loss"],
                      limit=24, mmlu_limit=16, loss_max_length=640, batch_size=8)


@dataclass
class CompareConfig:
    """``dude compare``. ``adapter.method`` and ``optim.lr`` are set per run from
    ``compare.methods`` and ``compare.lrs``; ``run.output_dir`` is the comparison's root."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=_default_data)
    optim: OptimConfig = field(default_factory=_default_optim)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/compare"))
    eval: EvalConfig = field(default_factory=_default_eval)
    compare: CompareSpec = field(default_factory=CompareSpec)


def compare_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """``dude compare``'s defaults under the given options.

    - An ``optim.lr`` given without ``compare.lrs`` is one lr for every method (the tuned
      per-method lrs would otherwise override it).
    - A task other than GSM-symbolic has no 'heldout_variants' set: its default held-out
      sets are its own held-out split and the MMLU explanations (forgetting).
    """
    defaults: dict[str, Any] = {}
    optim, compare, data = (given.get(k) if isinstance(given.get(k), dict) else {} for k in ("optim", "compare", "data"))
    if "lr" in optim and "lrs" not in compare:
        defaults["compare"] = {"lrs": {}}
    if data.get("task", "gsm_symbolic") != "gsm_symbolic":
        sets = ["heldout", "mmlu_explanations"]
        defaults["eval"] = {"tasks": sets}
        defaults["compare"] = {**defaults.get("compare", {}), "base_tasks": sets}
    return defaults
