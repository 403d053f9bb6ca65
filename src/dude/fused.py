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

Training in float32 compute with the norm detached, ``g``'s ``W_res A^T`` is formed from
``r`` extra rows of the forward's matmul, ``[x; A] W_res^T`` (``base_with_norm_rows``),
instead of a second pass over ``W_res`` (a dense one is read again for ``r`` columns; a
4-bit one is dequantized again); dude.norm_rows is the same product for the plain path.
"""

from __future__ import annotations

import torch

from . import decompose, frozen


def adapter_matmuls(
    x: torch.Tensor,
    dropped: torch.Tensor | None,
    residual: frozen.Frozen,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g (x W_res^T + s h B^T), h)`` for 2-D ``x`` (N, in), with ``h = drop(x) A^T`` (N, r)
    and ``g = scale`` (out,), or 1 when ``None``.

    One base matmul; the update is accumulated into its output in place. ``dropped`` is
    ``drop(x)``, or ``None`` when the dropout is the identity.
    """
    return _accumulate_update(frozen.linear(x, residual), x, dropped, lora_a, lora_b, scaling, scale)


def base_with_norm_rows(x: torch.Tensor, residual: frozen.Frozen, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W_res^T (N, out), W_res A^T (out, r) float32)`` from one base matmul of ``[x; A]``.

    As a product of its own, the norm's ``W_res A^T`` reads ``W_res`` a second time (for a
    4-bit residual, dequantizes ``Q`` again); as ``r`` extra rows it costs ``r / N`` of the
    forward's matmul.
    Only where ``A`` is exact in the compute dtype (float32); the extra rows are copied out
    and the output shrunk in place, so it is a tensor of its own, not a view.
    """
    n = x.shape[0]
    full = frozen.linear(torch.cat([x, lora_a.to(x.dtype)]), residual)  # (N + r, out)
    residual_a = full[n:].to(torch.float32, copy=True).T  # (out, r)
    if torch.compiler.is_compiling():  # dynamo does not trace resize_; a view serves there
        return full[:n], residual_a
    return full.resize_(n, full.shape[1]), residual_a


def has_zero(scale: torch.Tensor) -> bool:
    """Whether ``g`` has a zero row (a host sync; under torch.compile a graph break, which is
    why the compiled path does not use ``AdapterFunction``: layer.py)."""
    return not bool((scale != 0).all())


def _accumulate_update(out, x, dropped, lora_a, lora_b, scaling, scale=None):
    """``out = g (out + s h B^T)`` in place, ``h = drop(x) A^T``, ``g = scale`` or 1; returns
    ``(out, h)``.

    A half-precision ``out`` with a float32 adapter (a bf16 model) takes the sum and the
    product in float32 and is rounded once, as PEFT does; rounding the update, the sum and
    the product each left bf16 DoRA logits up to 1.3x as far from float32 as PEFT's.
    """
    src = x if dropped is None else dropped
    h = src.to(lora_a.dtype) @ lora_a.T  # (N, r), adapter precision (float32 for half models)
    if out.dtype == lora_b.dtype:
        out.addmm_(h, lora_b.T, alpha=scaling)
        if scale is not None:
            out.mul_(scale)  # g in float32: a mixed-dtype in-place product, rounded once
        return out, h
    exact = torch.mm(h, lora_b.T).mul_(scaling).add_(out)  # (N, out) float32: base + s h B^T
    if scale is not None:
        exact.mul_(scale)
    return out.copy_(exact), h


class AdapterFunction(torch.autograd.Function):
    """Forward and backward of ``z = g * (x W_res^T + s drop(x) A^T B^T)`` on 2-D inputs.

    ``g`` is given as ``scale``, or formed here as ``m / ||W_res + s B A||_row`` (norm
    detached) from ``magnitude`` and ``||W_res||^2`` per row, its ``W_res A^T`` taken from
    the base matmul (``base_with_norm_rows``); the gradient then goes to ``magnitude``.
    """

    @staticmethod
    def forward(ctx, x, dropped, residual, lora_a, lora_b, scaling, scale, magnitude=None, residual_sq_norm=None):
        ctx.safe_norm = None
        if magnitude is None:
            base = frozen.linear(x, residual)  # (N, out)
        else:
            base, residual_a = base_with_norm_rows(x, residual, lora_a)
            norm = decompose.row_norm_factored(residual_a, residual_sq_norm, lora_a, lora_b, scaling)
            ctx.safe_norm = decompose.safe_row_norm(norm)  # (out,): g = m / safe_norm
            scale = magnitude.to(torch.float32) / ctx.safe_norm
        wants_scale_grad = ctx.needs_input_grad[6] or (magnitude is not None and ctx.needs_input_grad[7])
        # z / g is undefined on zero-g rows: keep the pre-scale output there, as autograd does
        keep_pre_scale = scale is not None and wants_scale_grad and has_zero(scale)
        out, h = _accumulate_update(base, x, dropped, lora_a, lora_b, scaling,
                                    None if keep_pre_scale else scale)  # (N, out), (N, r)
        pre_scale = out.clone() if keep_pre_scale else None
        if keep_pre_scale:
            out.mul_(scale)
        ctx.scaling, ctx.residual = scaling, residual  # a tensor, or a 4-bit frozen.QuantizedWeight
        ctx.has_dropped, ctx.has_scale, ctx.has_pre_scale = dropped is not None, scale is not None, pre_scale is not None
        ctx.wants_scale_grad, ctx.magnitude_dtype = wants_scale_grad, None if magnitude is None else magnitude.dtype
        keep_out = scale is not None and wants_scale_grad and pre_scale is None
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
        # (N, out), dL/d(pre-scale): d_out in grad's dtype for the residual, d_lora in the
        # adapter's; g in float32, and a half d_out rounded once from float32
        if grad.dtype == lora_b.dtype:
            d_out = grad if scale is None else torch.mul(grad, scale, out=torch.empty_like(grad))
            d_lora = d_out
        else:  # a bf16 model with a float32 adapter: d_lora is formed in float32, not rounded
            d_lora = grad.to(lora_b.dtype) if scale is None else grad.to(lora_b.dtype).mul_(scale)
            d_out = grad if scale is None else d_lora.to(grad.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = frozen.input_grad(d_out, ctx.residual)  # (N, in)
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
        grad_magnitude = None
        if ctx.has_scale and ctx.wants_scale_grad:
            if ctx.has_pre_scale:
                grad_scale = (grad * pre_scale).sum(0, dtype=torch.float32)
            else:
                # sum_t dz * (z / g) = sum_t (dz g) * z / g^2: d_lora is ours and used up, so
                # the product reuses its buffer instead of allocating another (N, out).
                g32 = scale.to(torch.float32)
                grad_scale = d_lora.mul_(out).sum(0, dtype=torch.float32).div_(g32 * g32)
            grad_scale = grad_scale.to(scale.dtype)
            if ctx.safe_norm is not None:  # g = m / safe_norm: what autograd of that division gives
                grad_magnitude, grad_scale = (grad_scale / ctx.safe_norm).to(ctx.magnitude_dtype), None
        return grad_x, grad_dropped, None, grad_a, grad_b, None, grad_scale, grad_magnitude, None


def adapter_forward(
    x: torch.Tensor,
    dropped: torch.Tensor | None,
    residual: frozen.Frozen,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    scale: torch.Tensor | None,
    norm_inside: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``g * (x W_res^T + s drop(x) A^T B^T)`` for ``x`` of shape (..., in); ``g = scale`` (out,)
    or 1 when ``None``. Differentiable in ``x``, ``drop(x)``, ``A``, ``B`` and ``scale``.

    ``norm_inside = (m, ||W_res||^2 per row)`` (with gradients only, ``scale`` None): ``g =
    m / ||W_res + s B A||_row`` (detached) is formed from the base matmul's extra rows."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    d2 = None if dropped is None else dropped.reshape(-1, dropped.shape[-1])
    if norm_inside is not None:
        out = AdapterFunction.apply(x2, d2, residual, lora_a, lora_b, scaling, None, *norm_inside)
    elif torch.is_grad_enabled():
        out = AdapterFunction.apply(x2, d2, residual, lora_a, lora_b, scaling, scale)
    else:  # inference: no graph, no saved tensors
        out, _ = adapter_matmuls(x2, d2, residual, lora_a, lora_b, scaling, scale)
    return out.reshape(*lead, out.shape[-1])

