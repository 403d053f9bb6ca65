"""The frozen part of an adapter layer: a plain tensor, or a bitsandbytes 4-bit weight.

The layer, the fused autograd function and the merge ask four things of the frozen
weight ``W`` (out, in), and only through the functions of this module:

    linear(x, W)          x @ W^T                 (..., out)   the base matmul
    input_grad(d, W)      d @ W                   (N, in)      its backward
    times_transpose(W, A) W @ A^T in float32      (out, r)     the factored row norm
    dense(W)              W in float32            (out, in)    merge, export

plus ``row_sq_norm(W)`` (``||W||^2`` per row, computed once: W never changes).

A ``QuantizedWeight`` holds ``Q``, bitsandbytes' packed NF4/FP4 codes of ``W`` with their
per-block absmax (block size 64), and answers the same questions with bitsandbytes'
own kernels, ``deq(Q)`` in place of ``W``: no dense dequantized copy stays resident
between calls (bitsandbytes dequantizes block by block inside its 4-bit matmul, or into
a temporary it frees). QDuDe's math is in docs/QDUDE.md.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import decompose

BLOCKSIZE = 64  # bitsandbytes' default, and transformers' for load_in_4bit


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "AdapterConfig.quantize needs bitsandbytes (pip install bitsandbytes); "
            "or leave quantize unset (full precision)"
        ) from err
    return bitsandbytes


def is_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' ``Linear4bit``, as transformers' ``load_in_4bit`` leaves it (no import needed)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(weight, "quant_state")


class QuantizedWeight(nn.Module):
    """``Q``: a frozen (out, in) weight in 4 bits, answering as the dense weight would.

    ``compute_dtype`` is the dtype the matmuls run in (``deq(Q)`` is produced in it): the
    base layer's dtype, float32 for a float32 base, bfloat16/float16 for half bases.
    """

    def __init__(self, packed: torch.Tensor, quant_state, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)  # uint8 codes, 2 per byte
        self.quant_state = quant_state  # bitsandbytes QuantState: absmax per block, code book, shape
        self.dtype = compute_dtype
        self.shape = torch.Size(quant_state.shape)  # (out, in)
        self.quant_type = quant_state.quant_type
        with torch.no_grad():  # ||deq(Q)||^2 per row, once
            self.register_buffer("row_sq_norm", decompose.row_sq_norm(self.dense()), persistent=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str, *, name: str = "layer") -> "QuantizedWeight":
        """``Q = quantize(W)`` by ``bitsandbytes.functional.quantize_4bit`` (block size 64, no
        double quantization), from ``W`` (out, in) as stored; the compute dtype is ``W``'s."""
        bnb = _bnb()
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(
                f"{name}: bitsandbytes cannot quantize a {weight.dtype} weight to {quant_type} (it takes float32, "
                "bfloat16 or float16); load the model in one of those (model.dtype) or exclude the layer "
                "(AdapterConfig.exclude_modules)"
            )
        try:
            packed, state = bnb.functional.quantize_4bit(
                weight.detach().contiguous(), blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=False
            )
        except (RuntimeError, ValueError, NotImplementedError) as err:
            raise ValueError(
                f"{name}: bitsandbytes cannot quantize this {tuple(weight.shape)} {weight.dtype} weight on "
                f"{weight.device} ({err}); exclude the layer (AdapterConfig.exclude_modules) or set quantize=None"
            ) from err
        if weight.dtype != torch.float32:
            warnings.warn(
                f"AdapterConfig.quantize={quant_type!r} on a {weight.dtype} base: deq(Q) and the base matmuls run in "
                f"{weight.dtype} (the compute dtype, as transformers' bnb_4bit_compute_dtype), the adapter factors, "
                "magnitude and row norm in float32; load the model in float32 (model.dtype) for float32 compute",
                stacklevel=2,
            )
        return cls(packed, state, weight.dtype)

    @classmethod
    def from_linear4bit(cls, module: nn.Module) -> "QuantizedWeight":
        """Share the codes of a bitsandbytes ``Linear4bit`` (transformers' ``load_in_4bit``)."""
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                "a Linear4bit whose weight bitsandbytes repacked for CPU inference (it ran in eval mode without "
                "gradients) cannot be adapted: call dude.apply before running the 4-bit model"
            )
        compute = getattr(module, "compute_dtype", None) or torch.float32
        return cls(module.weight.data, state, compute)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed.device)  # absmax and code book follow the codes
        return self

    # -- the four questions -------------------------------------------------------------

    def dense(self) -> torch.Tensor:
        """``deq(Q)`` (out, in) in the compute dtype: a temporary, for merge and tests."""
        return _bnb().functional.dequantize_4bit(self.packed, self.quant_state).to(self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x deq(Q)^T`` by bitsandbytes' 4-bit matmul, differentiable in ``x``."""
        return _bnb().matmul_4bit(x.to(self.dtype), self.packed.t(), self.quant_state)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad deq(Q)`` (N, in): the backward of ``linear`` (as bitsandbytes' own)."""
        return grad.to(self.dtype) @ self.dense()

    def times_transpose(self, factor: torch.Tensor) -> torch.Tensor:
        """``deq(Q) A^T`` (out, r) in float32, from a temporary ``deq(Q)`` (bitsandbytes' 4-bit
        matmul does the same on CPU; this one keeps float32 precision for half bases)."""
        return self.dense().to(torch.float32) @ factor.to(torch.float32).T

    def extra_repr(self) -> str:
        return f"{self.shape[0]}, {self.shape[1]}, {self.quant_type}, compute_dtype={self.dtype}"


Frozen = torch.Tensor | QuantizedWeight


def linear(x: torch.Tensor, weight: Frozen) -> torch.Tensor:
    """``x @ W^T`` (..., out)."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x)
    return F.linear(x, weight)


def input_grad(grad: torch.Tensor, weight: Frozen) -> torch.Tensor:
    """``grad @ W`` (N, in)."""
    return weight.input_grad(grad) if isinstance(weight, QuantizedWeight) else grad @ weight


def times_transpose(weight: Frozen, factor: torch.Tensor) -> torch.Tensor:
    """``W @ A^T`` in float32 (out, r), never a float32 copy of ``W``."""
    if isinstance(weight, QuantizedWeight):
        return weight.times_transpose(factor)
    return decompose.times_transpose_fp32(weight, factor)


def dense(weight: Frozen) -> torch.Tensor:
    """The dense weight ``W`` (``deq(Q)`` when quantized), in its compute dtype."""
    return weight.dense() if isinstance(weight, QuantizedWeight) else weight


def row_sq_norm(weight: Frozen) -> torch.Tensor:
    """``||W||^2`` per row, float32 (out,); kept by a quantized weight since construction."""
    return weight.row_sq_norm if isinstance(weight, QuantizedWeight) else decompose.row_sq_norm(weight)


def version(weight: Frozen) -> tuple[int, int]:
    """Changes when ``W`` does (cache keys): the data pointer and version counter of its storage."""
    tensor = weight.packed if isinstance(weight, QuantizedWeight) else weight
    return tensor.data_ptr(), tensor._version
