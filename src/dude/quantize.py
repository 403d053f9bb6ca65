"""QPiSSA/QDuDe and QLoRA/QDoRA initialisation: the frozen part of a layer in 4 bits.

    pissa/dude:  B0, A0 = top-r factors of W (float32 SVD of the full-precision weight)
                 Q = quantize(W - s B0 A0)
                 T - 1 times (LoftQ):  B0, A0 = top-r factors of (W - deq(Q));
                                       Q = quantize(W - s B0 A0)
    lora/dora:   Q = quantize(W)

The last ``Q`` is always ``quantize(residual_weight(W, B0, A0))``, the function ``load``
calls with the saved ``B0, A0``: a reloaded model is bit-identical (bitsandbytes'
quantizer is deterministic). See docs/QDUDE.md.
"""

from __future__ import annotations

import torch

from . import decompose
from .config import AdapterConfig
from .frozen import QuantizedWeight


def principal_factors(weight: torch.Tensor, config: AdapterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B0 (out, r), A0 (r, in))`` from the top-r SVD of ``weight`` (float32 math)."""
    u, s, vh = decompose.top_singular(
        weight.detach(), config.r, randomized=config.svd == "randomized",  # top_singular: one float32 copy
        niter=config.svd_niter, oversample=config.svd_oversample, seed=config.seed,
    )
    u = u * (decompose.row_sq_norm(weight) > 0)[:, None]  # a zero row's factors: exactly zero, not SVD rounding
    return decompose.principal_factors(u, s, vh, config.scaling)


@torch.no_grad()
def quantized_split(
    weight: torch.Tensor,
    config: AdapterConfig,
    factors: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    refine: bool,
    name: str = "layer",
) -> tuple[QuantizedWeight, tuple[torch.Tensor, torch.Tensor] | None]:
    """``(Q, (B0, A0))`` for pissa/dude (``factors`` given), ``(Q, None)`` for lora/dora.

    ``refine`` runs the ``quant_iters - 1`` LoftQ alternations (at init; never on load,
    where ``factors`` are the saved final ones).
    """
    if factors is None:
        return QuantizedWeight.quantize(weight, config.quantize, name=name), None
    b0, a0 = factors
    frozen = QuantizedWeight.quantize(decompose.residual_weight(weight, b0, a0, config.scaling), config.quantize, name=name)
    for _ in range(config.quant_iters - 1 if refine else 0):
        b0, a0 = principal_factors(weight.to(torch.float32) - frozen.dense().to(torch.float32), config)
        frozen = QuantizedWeight.quantize(
            decompose.residual_weight(weight, b0, a0, config.scaling), config.quantize, name=name
        )
    return frozen, (b0, a0)
