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
    niter: int = 11,
    oversample: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets ``(U_r (out, r), S_r (r,), Vh_r (r, in))``, float32, of a
    float32 or half-precision matrix (the math is float32 either way).

    ``randomized`` runs a block Lanczos iteration on ``W^T W`` (say ``in <= out``; else on
    ``W W^T``) from a seeded Gaussian start, with full reorthogonalisation: the block
    Krylov method of Musco & Musco (NeurIPS 2015), the stronger sibling of Halko,
    Martinsson & Tropp's power-iterated range finder (2011, alg. 4.4). With blocks of
    ``k = r + oversample`` columns::

        K_0 = orth(W^T O)                                   (in, k), O (out, k) seeded
        Y_j = W^T W K_j                                     (in, k), one pass over W
        G[:, j] = [K_0 .. K_j]^T Y_j                        Rayleigh-Ritz blocks of W^T W
        K_j+1 = orth(Y_j - [K_0 .. K_j] G[:, j])            j < niter, twice-orthogonalised
                                                            (spent directions: fresh random)

    ``G`` (symmetric, ``K x K`` with ``K = k (niter + 1)``) is ``Q^T W^T W Q`` on the
    orthonormal basis ``Q = [K_0 .. K_niter]``, read off the recurrence: no product of ``W``
    with the whole basis. ``G = E diag(S^2) E^T`` (eigh in float32), ``V_r = Q E_r``,
    ``U_r = W V_r / S_r``. Every block is orthogonalised against all earlier ones, so late
    blocks carry new directions instead of re-converging ones: on the flat spectra of
    pretrained weights (SmolLM2's up_proj: s_1 = 15.4, s_16 = 12.56, s_17 = 12.53), where
    plain power iteration needs ~30 steps to place the top-16 subspace within 1%, 10 steps
    get there; at Llama-2-7B shapes and r=128, 11 steps keep every matrix within 0.42%
    (benchmarks/init_7b.py; the block Krylov code this replaced had 3.2% at 10).

    ``W`` is read in blocks of ``ROW_BLOCK`` rows of the long side, each converted to
    float32 once per step (``Y_j`` sums ``B^T (B K_j)`` over row blocks ``B``): no float32
    copy of a half-precision ``W``. Beside ``W`` live the basis ``min(out, in) x K``, ``G``
    and one float32 row block. The same seed gives the same factors on the same machine.
    """
    if not weight.dtype.is_floating_point:
        raise TypeError(f"top_singular expects a floating-point matrix, got {weight.dtype}")
    if not randomized:
        u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    if weight.shape[0] < weight.shape[1]:  # the basis on the smaller side: W^T = V S U^T
        v, s, uh = top_singular(weight.T, r, randomized=True, niter=niter, oversample=oversample, seed=seed)
        return uh.T, s, v.T
    basis, gram = _lanczos_basis(weight, min(r + oversample, weight.shape[1]), niter, seed)
    values, vectors = torch.linalg.eigh(gram)  # (K,), (K, K) ascending; G's lower triangle
    del gram
    top = vectors[:, -r:].flip(1)  # (K, r)
    s = values[-r:].flip(0).clamp_min(0.0).sqrt()  # (r,)
    del vectors
    v = basis @ top  # (in, r)
    u = torch.cat([rows.to(torch.float32) @ v for rows in weight.split(ROW_BLOCK)])  # (out, r) = W V_r
    # rank(W) < r: a zero singular value has no U direction, and it adds nothing to U_r S_r V_r^T
    return torch.where(s > 0, u / s, 0.0), s, v.T


def _gram_times(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``W^T W X`` (in, k) for ``X`` (in, k) float32: one pass over ``W`` in float32 row blocks."""
    out = torch.zeros_like(block)
    for rows in weight.split(ROW_BLOCK):
        rows32 = rows.to(torch.float32)  # (<= ROW_BLOCK, in), the only float32 copy of W's values
        out.addmm_(rows32.T, rows32 @ block)
    return out


def _next_block(product: torch.Tensor, basis: torch.Tensor, coef: torch.Tensor, floor: float,
                generator: torch.Generator) -> torch.Tensor:
    """An orthonormal block (in, k) orthogonal to ``basis``: ``product - basis coef``
    (``coef = basis^T product``) QR'd, then orthogonalised once more ("twice is enough":
    one pass leaves ~1e-4 of overlap on the flat spectra of pretrained weights, two ~1e-6).

    A direction whose remainder is at most ``floor`` holds nothing new (rank(W) is reached,
    or it is below float32 resolution): it restarts from a seeded random vector, which the
    second pass makes orthogonal; QR alone would return an arbitrary vector there, possibly
    inside span(``basis``), and the basis would stop being orthonormal.
    """
    block, upper = torch.linalg.qr(product - basis @ coef)
    spent = upper.diagonal().abs() <= floor  # (k,)
    if bool(spent.any()):
        fresh = torch.randn(block.shape[0], int(spent.sum()), generator=generator)
        block[:, spent] = fresh.to(block.device)
    block, _ = torch.linalg.qr(block - basis @ (basis.T @ block))
    return block


def _lanczos_basis(weight: torch.Tensor, k: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q (in, K), G = Q^T W^T W Q (K, K), its lower triangle)`` for ``W`` (out, in), ``in <= out``:
    ``niter + 1`` blocks of ``k`` columns (fewer once ``K`` reaches ``in``)."""
    n = weight.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(weight.shape[0], k, generator=generator).to(weight.device)  # (out, k)
    start = torch.zeros(n, k, device=weight.device)
    for rows, sketch_rows in zip(weight.split(ROW_BLOCK), sketch.split(ROW_BLOCK)):
        start.addmm_(rows.to(torch.float32).T, sketch_rows)  # W^T O
    width = min(k * (niter + 1), n)
    basis = torch.empty(n, width, device=weight.device)  # (in, K)
    gram = torch.zeros(width, width, device=weight.device)  # (K, K), lower triangle filled
    basis[:, :k] = _next_block(start, basis[:, :0], gram[:0, :k], 0.0, generator)
    lo, floor = 0, 0.0
    while lo < width:
        hi = min(lo + k, width)
        product = _gram_times(weight, basis[:, lo:hi])  # (in, hi - lo) = W^T W K_j
        coef = basis[:, :hi].T @ product  # (hi, k) = [K_0 .. K_j]^T W^T W K_j
        gram[lo:hi, :hi] = coef.T  # block row j of G, up to its diagonal block: G's lower triangle
        if lo == 0:  # ~ s_1^2 times float32's resolution: the size of rounding in a product
            floor = 1e-5 * float(product.norm(dim=0).max())
        if hi < width:
            nxt = min(hi + k, width)
            block = _next_block(product, basis[:, :hi], coef, floor, generator)
            basis[:, hi:nxt] = block[:, :nxt - hi]
        lo = hi
    return basis, gram


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
    """``||W||^2`` per output row, accumulated in float32: (out,). A half-precision ``W`` in
    blocks of ``ROW_BLOCK`` rows (``vector_norm(dtype=float32)`` upcasts all of its input)."""
    if weight.dtype == torch.float32:
        return torch.linalg.vector_norm(weight, dim=1).square()
    norms = [torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32) for rows in weight.split(ROW_BLOCK)]
    return torch.cat(norms).square()


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
    return torch.where(sq <= 0, 0.0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt())  # scalars: no fill


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
    return magnitude.to(torch.float32) / safe_row_norm(row_norm)


def safe_row_norm(row_norm: torch.Tensor) -> torch.Tensor:
    """``row_norm`` with its zeros as ``inf``: dividing by it gives 0 and a zero gradient both
    ways; elsewhere the plain norm (bit-identical ``m / norm``). A NaN stays NaN."""
    return torch.where(row_norm == 0, torch.inf, row_norm)


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
