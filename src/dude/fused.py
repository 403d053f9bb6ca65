"""The adapter forward as one autograd function that saves less than autograd would.

    z = g * (x W_res^T + s * (drop(x) A^T) B^T)         (bias added by the caller)

Plain autograd keeps, besides LoRA's own tensors, the pre-scale output ``x W'^T`` of every
DoRA/DuDe layer, one ``(tokens, out)`` tensor that nothing else needs: the gradient of
``g`` is ``sum_t dz * z / g``, computable from ``z`` itself. ``z`` is this function's
output, which the next operation usually holds anyway (SDPA keeps ``v``, SiLU keeps
``gate``, the MLP product keeps ``up``): saving it there costs no memory at all. The sums
are formed in place on one fresh ``(tokens, out)`` buffer, so a forward allocates what
LoRA's does.

Saved for backward: ``drop(x)`` (needed by ``dA``, as in LoRA), ``h = drop(x) A^T``
(tokens, r), the output ``z`` (only when ``g`` needs a gradient), and references to the
parameters. ``g`` must not be zero where it needs a gradient; ``g == 0`` rows (a zero
magnitude) keep the pre-scale output instead, exactly as autograd would.
"""

from __future__ import annotations

import torch

from . import frozen


def adapter_matmuls(
    x: torch.Tensor,
    dropped: torch.Tensor | None,
    residual: frozen.Frozen,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W_res^T + s h B^T, h)`` for 2-D ``x`` (N, in), with ``h = drop(x) A^T`` (N, r).

    One base matmul; the update is accumulated into its output in place. ``dropped`` is
    ``drop(x)``, or ``None`` when the dropout is the identity.
    """
    src = x if dropped is None else dropped
    out = frozen.linear(x, residual)  # (N, out), the only full-size allocation
    h = src.to(lora_a.dtype) @ lora_a.T  # (N, r), adapter precision (float32 for half models)
    if out.dtype == lora_b.dtype:
        out.addmm_(h, lora_b.T, alpha=scaling)
    else:  # half base, float32 adapter: the update is rounded once, onto the base output
        out.add_(torch.mm(h, lora_b.T).mul_(scaling).to(out.dtype))
    return out, h


class AdapterFunction(torch.autograd.Function):
    """Forward and backward of ``z = g * (x W_res^T + s drop(x) A^T B^T)`` on 2-D inputs."""

    @staticmethod
    def forward(ctx, x, dropped, residual, lora_a, lora_b, scaling, scale):
        out, h = adapter_matmuls(x, dropped, residual, lora_a, lora_b, scaling)  # (N, out), (N, r)
        pre_scale = None
        if scale is not None:
            if ctx.needs_input_grad[6] and not bool((scale != 0).all()):
                pre_scale = out.clone()  # z / g is undefined on these rows: keep what autograd keeps
            out.mul_(scale.to(out.dtype))
        ctx.scaling, ctx.residual = scaling, residual  # a tensor, or a 4-bit frozen.QuantizedWeight
        ctx.has_dropped, ctx.has_scale, ctx.has_pre_scale = dropped is not None, scale is not None, pre_scale is not None
        keep_out = scale is not None and ctx.needs_input_grad[6] and pre_scale is None
        ctx.save_for_backward(
            x if dropped is None else dropped, lora_a, lora_b, h, scale,
            out if keep_out else None, pre_scale,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        src, lora_a, lora_b, h, scale, out, pre_scale = ctx.saved_tensors
        s = ctx.scaling
        grad_x = grad_dropped = grad_a = grad_b = grad_scale = None
        d_out = grad if scale is None else grad * scale.to(grad.dtype)  # (N, out), dL/d(pre-scale)
        if ctx.needs_input_grad[0]:
            grad_x = frozen.input_grad(d_out, ctx.residual)  # (N, in)
        d_lora = d_out if d_out.dtype == lora_b.dtype else d_out.to(lora_b.dtype)
        d_h = torch.mm(d_lora, lora_b).mul_(s)  # (N, r)
        if ctx.needs_input_grad[3]:
            grad_a = d_h.T @ src.to(lora_a.dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(d_lora.T, h).mul_(s)  # (out, r)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d_src = (d_h @ lora_a).to(src.dtype)  # (N, in)
            if ctx.has_dropped:
                grad_dropped = d_src
            elif grad_x is None:
                grad_x = d_src
            else:
                grad_x.add_(d_src)
        if ctx.has_scale and ctx.needs_input_grad[6]:
            if ctx.has_pre_scale:
                grad_scale = (grad * pre_scale).sum(0, dtype=torch.float32)
            else:
                # sum_t dz * (z / g) = sum_t (dz g) * z / g^2: d_out is ours and used up, so
                # the product reuses its buffer instead of allocating another (N, out).
                g32 = scale.to(torch.float32)
                grad_scale = d_out.mul_(out).sum(0, dtype=torch.float32).div_(g32 * g32)
            grad_scale = grad_scale.to(scale.dtype)
        return grad_x, grad_dropped, None, grad_a, grad_b, None, grad_scale


def adapter_forward(
    x: torch.Tensor,
    dropped: torch.Tensor | None,
    residual: frozen.Frozen,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """``g * (x W_res^T + s drop(x) A^T B^T)`` for ``x`` of shape (..., in); ``g = scale`` (out,)
    or 1 when ``None``. Differentiable in ``x``, ``drop(x)``, ``A``, ``B`` and ``scale``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    d2 = None if dropped is None else dropped.reshape(-1, dropped.shape[-1])
    if torch.is_grad_enabled():
        out = AdapterFunction.apply(x2, d2, residual, lora_a, lora_b, scaling, scale)
    else:  # inference: no graph, no saved tensors
        out, _ = adapter_matmuls(x2, d2, residual, lora_a, lora_b, scaling)
        if scale is not None:
            out.mul_(scale.to(out.dtype))
    return out.reshape(*lead, out.shape[-1])
