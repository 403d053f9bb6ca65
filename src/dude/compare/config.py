"""The config of ``dude compare``: a training config shared by all methods, plus the
comparison itself (methods, per-method learning rates, seeds, loss target)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import METHODS, AdapterConfig
from ..train.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig
from ..train.options import opt

# One lr for every method by default, so that the curves differ only by what each method
# changes (initialisation, magnitude). PiSSA and DuDe start from the principal singular
# factors (||B0 A0|| ~ ||W||_top-r), so the same step moves them much further than LoRA's
# zero-initialised B: at a shared lr they converge faster, which is the papers' claim.
# Per-method tuned lrs are a different question, answered by studies/paper_claims (a
# sweep per method); pass them with --lrs METHOD=LR.
SHARED_LR = 1e-4


@dataclass
class CompareSpec:
    methods: list[str] = opt(list(METHODS), f"methods to compare, from {list(METHODS)}")
    lrs: dict[str, float] = opt({}, "peak lr per method (METHOD=LR); a method not listed uses optim.lr "
                                    "(empty: optim.lr for all, the default)")
    seeds: list[int] = opt([0], "one run per method and seed (seeds the data order and the init)")
    loss_target: float | None = opt(None, "loss for 'steps to target' (empty: the worst method's final "
                                          "smoothed loss, which every method reaches)")
    smooth: int = opt(5, "moving-average window (steps) for final loss and steps to target")
    base_tasks: list[str] = opt(["heldout", "mmlu"], "eval sets to run on the base model too: the 'before' of retention "
                                          "(empty: none)")

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
        unknown = sorted(set(self.base_tasks) - {"heldout", "gsm_original", "mmlu"})
        if unknown and not all(t.startswith("file:") for t in unknown):
            raise ValueError(f"compare.base_tasks: unknown eval set(s) {unknown}")
        if self.smooth < 1:
            raise ValueError(f"compare.smooth must be >= 1, got {self.smooth}")


# The no-argument budget, ~7 minutes on 2 idle cores: BIG-bench social_iqa, 40 steps of
# 4 examples (~85 tokens with the chat template; a step ~1.4 s at 2 threads), letter-scored
# held-out questions and MMLU dev questions (no generation, ~20 s each per method). The
# loss is on the answer letter only, so it starts high (~3.7) and the speed at which each
# method learns the format shows. GSM-symbolic: configs/compare_gsm.yaml.
def _default_data() -> DataConfig:
    return DataConfig(task="bigbench_social_iqa", max_length=128)


def _default_optim() -> OptimConfig:
    return OptimConfig(steps=40, batch_size=4, warmup_ratio=0.1, lr=SHARED_LR)


def _default_eval() -> EvalConfig:
    return EvalConfig(tasks=["heldout", "mmlu"], limit=100, mmlu_limit=100, batch_size=16)


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
