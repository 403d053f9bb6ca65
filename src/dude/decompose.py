"""Pure tensor math of the four methods: SVD init, the principal split, row norms, merging.

Every function here is free of modules and state, so the layer, the merge, the export
and the tests all call the same formula. Weights follow PyTorch's ``(out, in)`` layout.

    W = U S V^T                          (SVD in float32)
    B0 = U_r sqrt(S_r / s)               (out, r)
    A0 = sqrt(S_r / s) V_r^T             (r, in)
    W_res = W - s * B0 @ A0              (out, in), frozen
    y = g * (x W_res^T + s * drop(x) A^T B^T) + bias,   g = m / ||W_res + s B A||_row
"""

from __future__ import annotations

import torch

# Rows per block when a half-precision weight meets float32 math: bounds the float32
# temporary to ROW_BLOCK * in values instead of a full copy of the weight.
ROW_BLOCK = 1024


def top_singular(
    weight: torch.Tensor,
    r: int,
    *,
    randomized: bool = False,
    niter: int = 10,
    oversample: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets ``(U_r (out, r), S_r (r,), Vh_r (r, in))``, float32, of a
    float32 or half-precision matrix (the math is float32 either way).

    ``randomized`` builds a block Krylov subspace (Musco & Musco, NeurIPS 2015), the
    stronger sibling of the power-iterated range finder of Halko, Martinsson & Tropp
    (2011, alg. 4.4), on the smaller side of ``W`` (say ``in <= out``): a seeded Gaussian
    sketch ``O`` of ``k = r + oversample`` columns, ``niter`` power steps re-orthonormalised
    by QR, and every step's block kept, so the basis ``Q`` spans
    ``[W^T O, (W^T W) W^T O, ...]`` (``k (niter + 1)`` columns). Then Rayleigh-Ritz through
    the small Gram matrix ``G = (W Q)^T (W Q) = E diag(S^2) E^T`` (eigh in float64):
    ``V_r = Q E_r``, ``U_r = W V_r / S_r``. Pretrained weights have flat spectra (SmolLM2's
    up_proj: s_1 = 15.4, s_16 = 12.56, s_17 = 12.53), where plain power iteration needs
    ~30 steps to place the top-16 subspace within 1%; the Krylov basis gets there in ~10.

    A half-precision ``W`` is copied to float32 once (each product reading it in blocks
    was 2x slower); beside that copy lives the basis, ``min(out, in) x k (niter + 1)``,
    and ``W Q``. The same seed gives the same factors on the same machine.
    """
    if not weight.dtype.is_floating_point:
        raise TypeError(f"top_singular expects a floating-point matrix, got {weight.dtype}")
    if not randomized:
        u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    if weight.shape[0] < weight.shape[1]:  # the basis on the smaller side: W^T = V S U^T
        v, s, uh = top_singular(weight.T, r, randomized=True, niter=niter, oversample=oversample, seed=seed)
        return uh.T, s, v.T
    w32 = weight.to(torch.float32)  # (out, in): the one float32 copy of a half-precision W
    k = min(r + oversample, weight.shape[1])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(weight.shape[0], k, generator=generator).to(weight.device)  # (out, k)
    krylov = torch.empty(weight.shape[1], k * (niter + 1), device=weight.device)  # (in, k (niter + 1))
    krylov[:, :k], _ = torch.linalg.qr(w32.T @ sketch)
    for step in range(niter):
        co_block, _ = torch.linalg.qr(w32 @ krylov[:, step * k:(step + 1) * k])  # (out, k)
        krylov[:, (step + 1) * k:(step + 2) * k], _ = torch.linalg.qr(w32.T @ co_block)  # (in, k)
    basis, _ = torch.linalg.qr(krylov[:, : weight.shape[1]])  # (in, K)
    del krylov
    projected = w32 @ basis  # (out, K)
    values, vectors = torch.linalg.eigh((projected.T @ projected).to(torch.float64))  # (K,), (K, K) ascending
    del projected
    top = vectors[:, -r:].flip(1).to(torch.float32)  # (K, r)
    s = values[-r:].flip(0).clamp_min(0.0).sqrt().to(torch.float32)  # (r,)
    v = basis @ top  # (in, r)
    return (w32 @ v) / s, s, v.T


def principal_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA factors ``B0 = U_r sqrt(S_r/s)`` (out, r) and ``A0 = sqrt(S_r/s) V_r^T`` (r, in)."""
    root = torch.sqrt(s / scaling)  # (r,)
    return u * root, root[:, None] * vh


def residual_weight(weight: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor, scaling: float) -> torch.Tensor:
    """The frozen part ``W - s * B0 @ A0``, computed in float32, returned in ``weight``'s dtype
    (a half-precision ``W`` in blocks of ``ROW_BLOCK`` rows: no float32 copy of it).

    Saving and loading both call this, so a reloaded residual is bit-identical.
    """
    b32, a32 = b0.to(torch.float32), a0.to(torch.float32)
    if weight.dtype == torch.float32:
        return torch.addmm(weight, b32, a32, alpha=-scaling)
    residual = torch.empty_like(weight)
    for rows, b_rows, out in zip(weight.split(ROW_BLOCK), b32.split(ROW_BLOCK), residual.split(ROW_BLOCK)):
        out.copy_(torch.addmm(rows.to(torch.float32), b_rows, a32, alpha=-scaling))
    return residual


def times_transpose_fp32(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``weight @ factor^T`` in float32 (out, r), without a float32 copy of a half weight."""
    factor = factor.to(torch.float32)
    if weight.dtype == torch.float32:
        return weight @ factor.T
    blocks = [block.to(torch.float32) @ factor.T for block in weight.split(ROW_BLOCK)]
    return torch.cat(blocks)


def row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W||^2`` per output row, accumulated in float32: (out,)."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()


def row_norm_factored(
    residual_a: torch.Tensor,
    residual_sq_norm: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``||W_res + s B A||`` per output row, float32 (out,), without forming ``B @ A``.

        ||W_res + sBA||^2 = ||W_res||^2 + 2s rowsum((W_res A^T) * B) + s^2 rowsum((B (A A^T)) * B)

    The same O(out * in * r) work as forming ``B @ A``, but no (out, in) temporary and no
    second pass over it; ``residual_a`` is ``W_res A^T`` (out, r) in float32
    (``times_transpose_fp32``, or a 4-bit matmul for a quantized residual), and
    ``residual_sq_norm`` is ``row_sq_norm(residual)``, constant while the residual is frozen.
    """
    a32, b32 = lora_a.to(torch.float32), lora_b.to(torch.float32)
    # Both terms as one (out, r) matrix, 2s W_res A^T + s^2 B (A A^T), then one row-wise dot
    # with B: few ops, since this runs on every training forward of every layer.
    gram = a32 @ a32.T  # (r, r)
    terms = torch.addmm(residual_a, b32, gram, beta=2.0 * scaling, alpha=scaling * scaling)
    sq = torch.linalg.vecdot(terms, b32, dim=1) + residual_sq_norm  # (out,)
    # sqrt has an infinite slope at 0: a zero row (pruned, MoE) would send NaN into the
    # gradient of A and B when the norm is not detached; the tiny floor keeps it finite.
    # (NaN <= 0 is false: a NaN stays NaN, never a silent zero)
    return torch.where(sq <= 0, torch.zeros_like(sq), sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())


def row_norm_dense(weight: torch.Tensor) -> torch.Tensor:
    """Reference ``||W||`` per output row, float32 (out,)."""
    return torch.linalg.vector_norm(weight.to(torch.float32), dim=1)


def magnitude_scale(magnitude: torch.Tensor, row_norm: torch.Tensor) -> torch.Tensor:
    """DoRA's ``g = m / ||W'||_row``, float32 (out,), with ``g = 0`` where ``||W'||_row = 0``.

    A row of zeros (pruned models, unused MoE experts) has no direction: as
    ``F.normalize``, its direction is taken as the zero vector, so the row computes
    ``m * 0 = 0``, what the base computed there, instead of ``0 / 0 = NaN`` (PEFT's DoRA,
    peft#2049). The gradient is finite too: zero for ``m`` on those rows, and zero for the
    row of ``B``, so a zero row stays zero through training and merging.
    """
    # dividing by inf gives 0 and a zero gradient both ways; the rest is the plain m / norm
    # (bit-identical, and autograd saves what it saved before: the divisor)
    safe_norm = torch.where(row_norm == 0, torch.full_like(row_norm, torch.inf), row_norm)  # NaN stays NaN
    return magnitude.to(torch.float32) / safe_norm


def merged_weight(
    residual: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense weight the adapter computes, float32 (out, in).

        W' = W_res + s B A                      (LoRA, PiSSA)
        W' = m / ||W_res + s B A||_row * (...)  (DoRA, DuDe; a zero row stays zero: magnitude_scale)
    """
    dense = torch.addmm(residual.to(torch.float32), lora_b.to(torch.float32), lora_a.to(torch.float32), alpha=scaling)
    if magnitude is None:
        return dense
    return dense * magnitude_scale(magnitude, row_norm_dense(dense))[:, None]


def reference_forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
    detach_norm: bool = True,
) -> torch.Tensor:
    """The formula of DESIGN.md, written the slow and obvious way (dense ``B @ A``), in float32.

    Tests compare the layer's fast path and its gradients against this.
    """
    x32 = x.to(torch.float32)
    dense = residual.to(torch.float32) + scaling * lora_b.to(torch.float32) @ lora_a.to(torch.float32)
    out = x32 @ dense.T
    if magnitude is not None:
        norm = torch.linalg.vector_norm(dense, dim=1)
        if detach_norm:
            norm = norm.detach()
        out = out * magnitude_scale(magnitude, norm)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out
