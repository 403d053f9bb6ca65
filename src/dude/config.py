"""The one configuration of an adapter: which method, what rank, which layers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

METHODS = ("lora", "dora", "pissa", "dude")
SVD_KINDS = ("exact", "randomized")
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit codes
QUANT_MAGNITUDES = ("full", "quantized")

# All seven projection types of a Llama-style decoder block.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AdapterConfig:
    """DuDe and the three methods it is compared with, as two switches.

    ========  ==========================  =========
    method    factor init                 magnitude
    ========  ==========================  =========
    lora      A Kaiming-uniform, B = 0    no
    pissa     top-r SVD, residual frozen  no
    dora      A Kaiming-uniform, B = 0    yes
    dude      top-r SVD, residual frozen  yes
    ========  ==========================  =========

    Args:
        method: one of ``lora``, ``dora``, ``pissa``, ``dude``.
        r: rank of the update ``B @ A``.
        alpha: scaling numerator, ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        use_rslora: rank-stabilised scaling.
        dropout: dropout probability on the adapter branch's input only.
        target_modules: a list (a module matches if its name equals an entry or ends
            with ``"." + entry``) or a string (regex full match), as in PEFT.
        exclude_modules: the same matching rules, applied after ``target_modules``.
        svd: ``exact`` (full SVD) or ``randomized`` (Halko et al., seeded).
        svd_niter: steps of the randomized (block Lanczos) SVD. Pretrained weights have
            flat spectra; 11 is the fewest that keep the principal part closer to the exact
            SVD's than bf16 storage of ``W`` alone moves it, on every matrix of a Llama-2-7B
            block at r=128 (worst 0.45%, benchmarks/init_7b.py), and within 0.1% on SmolLM2.
        svd_oversample: extra random directions per Krylov block.
        seed: seeds the randomized SVD and the Kaiming init of ``A``.
        detach_norm: treat the row norm as a constant in backward (DoRA section 4.3).
        quantize: ``nf4`` or ``fp4`` keeps the frozen part in 4 bits (bitsandbytes, block
            size 64): the residual ``W - s B0 A0`` for pissa/dude (QPiSSA, QDuDe), the weight
            itself for lora/dora (QLoRA, QDoRA). ``None``: full precision. docs/QDUDE.md.
        quant_iters: ``T``; ``T > 1`` alternates LoftQ-style for pissa/dude: the top-r factors
            of ``W - deq(Q)`` are recomputed and the residual requantized, ``T - 1`` times
            (no effect on lora/dora, whose frozen part is ``W`` itself).
        quant_magnitude: the DoRA/DuDe magnitude at init on a quantized base: ``full``,
            ``m0 = ||W||_row`` of the full-precision weight (each row keeps its original norm,
            absorbing part of the quantization error), or ``quantized``,
            ``m0 = ||deq(Q) + s B0 A0||_row`` (the model starts as the quantized model).
    """

    method: str = "dude"
    r: int = 16
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_LINEAR))
    exclude_modules: list[str] | str | None = None
    svd: str = "exact"
    svd_niter: int = 11
    svd_oversample: int = 8
    seed: int = 0
    detach_norm: bool = True
    quantize: str | None = None
    quant_iters: int = 1
    quant_magnitude: str = "full"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"AdapterConfig.method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"AdapterConfig.r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"AdapterConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.svd not in SVD_KINDS:
            raise ValueError(f"AdapterConfig.svd must be one of {SVD_KINDS}, got {self.svd!r}")
        if self.svd_niter < 0 or self.svd_oversample < 0:
            raise ValueError("AdapterConfig.svd_niter and svd_oversample must be >= 0")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
            elif value is not None and not isinstance(value, (list, str)):
                raise ValueError(f"AdapterConfig.{name} must be a list of names or a regex string")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(
                f"AdapterConfig.quantize must be one of {QUANT_TYPES} or None (full precision), got {self.quantize!r}"
            )
        if not isinstance(self.quant_iters, int) or isinstance(self.quant_iters, bool) or self.quant_iters < 1:
            raise ValueError(f"AdapterConfig.quant_iters must be an integer >= 1, got {self.quant_iters!r}")
        if self.quant_magnitude not in QUANT_MAGNITUDES:
            raise ValueError(
                f"AdapterConfig.quant_magnitude must be one of {QUANT_MAGNITUDES}, got {self.quant_magnitude!r}"
            )
        if not self.target_modules:
            raise ValueError("AdapterConfig.target_modules is empty: name at least one module")

    @property
    def scaling(self) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def svd_init(self) -> bool:
        """Factors start from the top-r singular triplets (PiSSA, DuDe)."""
        return self.method in ("pissa", "dude")

    @property
    def magnitude(self) -> bool:
        """A trainable per-row magnitude (DoRA, DuDe)."""
        return self.method in ("dora", "dude")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
