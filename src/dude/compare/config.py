"""The config of ``dude compare``: a training config shared by all methods, plus the
comparison itself (methods, per-method learning rates, seeds, loss target)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import METHODS, AdapterConfig
from ..train.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig
from ..train.options import opt

# PiSSA and DuDe start from the principal singular factors (large, ||B0 A0|| ~ ||W||_top-r),
# so the same step moves them much further than LoRA's zero-initialised B: their paper
# recipes use ~10x smaller lrs (PiSSA 2e-5 vs LoRA 2e-4 at 7B). These defaults were
# picked on the default compare task (SmolLM2-135M, GSM-symbolic, 48 steps).
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
    base_eval: bool = opt(True, "evaluate the base model too (the 'before' of retention)")

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
        if self.smooth < 1:
            raise ValueError(f"compare.smooth must be >= 1, got {self.smooth}")


def _default_data() -> DataConfig:
    return DataConfig(max_length=192)


def _default_optim() -> OptimConfig:
    return OptimConfig(steps=48, batch_size=4, warmup_ratio=0.1, lr=2e-4)


def _default_eval() -> EvalConfig:
    return EvalConfig(tasks=["heldout", "mmlu"], limit=24, mmlu_limit=60, max_new_tokens=160, batch_size=8)


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
