"""The norm's ``W_res A^T`` as ``r`` extra rows of the base matmul, for the plain-autograd path.

DoRA's and DuDe's detached norm needs, every training step, ``W_res A^T`` (out, r):

    ||W_res + s B A||^2_row = ||W_res||^2 + 2s rowsum((W_res A^T) * B) + s^2 rowsum((B A A^T) * B)

As a matmul of its own it reads the whole of ``W_res`` a second time for ``r`` columns: on a
7B-shaped layer that pass costs 6.7% of the base matmul, twice its ``r / N`` share of the
arithmetic (benchmarks/README.md, issue 21). Stacked under the tokens,

    [x; A] W_res^T = [x W_res^T; (W_res A^T)^T]          (N + r, out)

one pass over ``W_res`` gives both. ``BaseWithNormRows`` is that matmul as an autograd
function whose backward is the plain linear's (``dx = dy W_res``: the ``r`` rows carry
no gradient, so none is formed for them), which lets ``torch.compile`` trace it whole.
Exact only where ``A`` is exact in the compute dtype: a float32 residual, no autocast.
The product itself is ``fused.base_with_norm_rows``, which the eager fused path calls inside
its own autograd function.
"""

from __future__ import annotations

import torch

from . import frozen, fused


class BaseWithNormRows(torch.autograd.Function):
    """``(x W_res^T (N, out), W_res A^T (out, r))`` for 2-D ``x``; differentiable in ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: frozen.Frozen, lora_a: torch.Tensor):
        base, residual_a = fused.base_with_norm_rows(x, residual, lora_a)  # (N, out), (out, r)
        ctx.residual = residual
        ctx.mark_non_differentiable(residual_a)  # the norm is detached
        return base, residual_a

    @staticmethod
    def backward(ctx, grad_base: torch.Tensor, _unused: torch.Tensor):
        grad_x = frozen.input_grad(grad_base, ctx.residual) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def applies(residual: frozen.Frozen, x: torch.Tensor) -> bool:
    """Whether ``[x; A] W_res^T`` is exact: float32 compute, no autocast."""
    return residual.dtype == torch.float32 and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


def base_with_norm_rows(x: torch.Tensor, residual: frozen.Frozen, lora_a: torch.Tensor):
    """``(x W_res^T (..., out), W_res A^T (out, r) float32, detached)`` from one matmul."""
    lead = x.shape[:-1]
    base, residual_a = BaseWithNormRows.apply(x.reshape(-1, x.shape[-1]), residual, lora_a.detach())
    return base.reshape(*lead, base.shape[-1]), residual_a
