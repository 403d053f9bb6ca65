"""``y = g * (base + update)`` with one rounding into a half-precision output.

    y = round(g * (base + update))            base (N, out) in bf16/fp16, g (out,) float32

Plain autograd ops round twice: ``z = base + update`` into bf16, then ``g z``. Under bf16
autocast that left a tiny Llama's DoRA logits 1.03-1.29x as far from float32 as PEFT's
(5 seeds), where PEFT rounds once. Here the sum and the product are formed in float32 and
rounded once: 0.91-1.04x (tests/test_peft_parity.py). The saved ``z`` (for
``dL/dg = sum_t dy * z``) is the half-precision one, the memory plain autograd keeps. A
float32 output takes the plain ops: there is nothing to round.
"""

from __future__ import annotations

import torch


class ScaledSum(torch.autograd.Function):
    """Forward and backward of ``g * (base + update)``, rounded once into ``base``'s dtype."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, update: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        pre_scale = base.to(torch.float32) + update.to(torch.float32)  # (..., out)
        ctx.save_for_backward(pre_scale.to(base.dtype) if ctx.needs_input_grad[2] else None, scale)
        ctx.update_dtype = update.dtype
        return (pre_scale * scale).to(base.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre_scale, scale = ctx.saved_tensors
        grad32 = grad.to(torch.float32)
        d_pre = grad32 * scale  # dL/d(base + update), (..., out)
        grad_scale = None
        if ctx.needs_input_grad[2]:  # sum over the tokens, (out,)
            grad_scale = (grad32 * pre_scale).reshape(-1, grad.shape[-1]).sum(0).to(scale.dtype)
        return d_pre.to(grad.dtype), d_pre.to(ctx.update_dtype), grad_scale


def scaled_sum(base: torch.Tensor, update: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``g * (base + update)`` in ``base``'s dtype; ``scale`` is ``g`` (out,), float32."""
    if base.dtype == torch.float32:
        return (base + update.to(base.dtype)) * scale
    return ScaledSum.apply(base, update, scale)
