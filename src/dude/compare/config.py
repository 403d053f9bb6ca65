"""The config of ``dude compare``: a training config shared by all methods, plus the
comparison itself (methods, per-method learning rates, seeds, loss target)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import METHODS, AdapterConfig
from ..train.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig
from ..train.options import opt

# PiSSA and DuDe start from the principal singular factors (large, ||B0 A0|| ~ ||W||_top-r),
# so the same step moves them much further than LoRA's zero-initialised B: their paper
# recipes use smaller lrs than LoRA's usual 2e-4. A prior, not a sweep: LoRA/DoRA get a
# large lr so that 32 steps move them at all; PiSSA/DuDe 10x less. Not tuned on this
# machine (studies/paper_claims sweeps a grid around these values); override with --lrs.
DEFAULT_LRS = {"lora": 1e-3, "dora": 1e-3, "pissa": 1e-4, "dude": 1e-4}


@dataclass
class CompareSpec:
    methods: list[str] = opt(list(METHODS), f"methods to compare, from {list(METHODS)}")
    lrs: dict[str, float] = opt(dict(DEFAULT_LRS), "peak lr per method (METHOD=LR); a method not "
                                                   "listed uses optim.lr")
    seeds: list[int] = opt([0], "one run per method and seed (seeds the data order and the init)")
    loss_target: float | None = opt(None, "loss for 'steps to target' (empty: the worst method's final "
                                          "smoothed loss, which every method reaches)")
    smooth: int = opt(5, "moving-average window (steps) for final loss and steps to target")
    base_tasks: list[str] = opt(["mmlu"], "eval sets to run on the base model too: the 'before' of retention "
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


# The no-argument budget, for ~11 minutes on 2 idle cores (a LoRA step of 2 x 256 tokens
# ~3 s, DoRA/DuDe ~10-20% more; 16 held-out problems generated in one batch ~35 s; 48 MMLU
# questions ~10 s). GSM-symbolic examples have a median of 247 tokens with the chat
# template: 256 keeps the final "#### n" of most.
def _default_data() -> DataConfig:
    return DataConfig(task="gsm_symbolic", max_length=256)


def _default_optim() -> OptimConfig:
    return OptimConfig(steps=32, batch_size=2, warmup_ratio=0.1, lr=2e-4)


def _default_eval() -> EvalConfig:
    return EvalConfig(tasks=["heldout", "mmlu"], limit=16, mmlu_limit=48, max_new_tokens=160, batch_size=16)


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
