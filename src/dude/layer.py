"""One adapter layer for LoRA, DoRA, PiSSA and DuDe."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import decompose, frozen, fused, norm_rows
from .scaled_sum import scaled_sum
from .build import frozen_part, is_conv1d
from .config import AdapterConfig
from .frozen import QuantizedWeight


class AdapterLinear(nn.Module):
    """DuDe (arXiv:2505.14367), and LoRA, DoRA, PiSSA as the other corners of one layer.

        y = g * (x W_res^T + s * (drop(x) A^T) B^T) + bias
        g = m / ||W_res + s B A||_row          (DoRA, DuDe; norm detached by default)
        g = 1                                   (LoRA, PiSSA)

    ``residual`` is the frozen part: ``W - s B0 A0`` with ``B0, A0`` the top-r singular
    factors (PiSSA, DuDe), or ``W`` itself (LoRA, DoRA, where ``B0 = 0``). It is named for
    what it is, so a stock checkpoint cannot be loaded into it by accident; with
    ``config.quantize`` it is a 4-bit ``frozen.QuantizedWeight`` (QLoRA, QDoRA, QPiSSA,
    QDuDe), and every use of it goes through ``frozen``'s functions. ``lora_A``
    (r, in), ``lora_B`` (out, r) and ``magnitude`` (out,) train; they are kept in
    float32 when the base is half precision (as PEFT's ``autocast_adapter_dtype``).
    ``lora_A0``/``lora_B0`` keep the initial factors of PiSSA and DuDe for exact export.

    The norm never forms ``B @ A``: see ``decompose.row_norm_factored``. Its ``W_res A^T``
    comes from ``r`` extra rows of the base matmul when no gradient flows through the norm
    and the compute is float32 (``_norm_from_rows``, dude.norm_rows). In eval mode with
    a detached norm, ``g`` is cached across batches until a parameter changes (tracked by
    tensor version counters, and dropped on every ``train()``/``eval()`` switch).

    ``forward`` runs ``fused.AdapterFunction`` (one base matmul, the update accumulated in
    place, the output saved instead of a pre-scale copy); ``fast_path = False`` on the class
    or an instance selects ``forward_autograd``, the same formula by plain autograd ops,
    which is also used under autocast and under ``torch.compile``. There the compiler fuses
    the elementwise passes itself, and the caches stay out of the graph: the eval-mode norm
    is recomputed on every call and ``||W_res||^2`` is a buffer read as is, so nothing is
    guarded on data pointers or versions (tests/test_compile.py checks both paths agree).
    """

    fast_path = True
    # Eager mode recomputes ||W_res||^2 when W_res's storage changes (an in-place write).
    # FSDP2 all-gathers W_res into new storage on every forward without changing it:
    # distributed.wrap turns the check off there, and the buffer computed before sharding holds
    # (with your own fully_shard, set it False on every dude.adapter_layers(model) layer).
    recheck_residual = True

    def __init__(
        self,
        residual: torch.Tensor,
        bias: torch.Tensor | None,
        config: AdapterConfig,
        *,
        fan_in_fan_out: bool = False,
        origin: type | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = residual.shape
        self.in_features, self.out_features = in_features, out_features
        self.r, self.scaling = config.r, config.scaling
        self.detach_norm = config.detach_norm
        self.fan_in_fan_out = fan_in_fan_out  # True for Conv1D: merge gives back (in, out)
        self.origin = origin or nn.Linear
        adapter_dtype = torch.float32 if residual.dtype in (torch.float16, torch.bfloat16) else residual.dtype
        factory = dict(device=residual.device, dtype=adapter_dtype)
        # A 4-bit QuantizedWeight is a submodule; a dense residual a frozen parameter.
        self.residual = residual if isinstance(residual, QuantizedWeight) else nn.Parameter(residual, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.lora_A = nn.Parameter(torch.zeros(config.r, in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **factory))  # (out, r)
        self.magnitude = nn.Parameter(torch.ones(out_features, **factory)) if config.magnitude else None
        if config.svd_init:
            self.register_buffer("lora_A0", torch.zeros(config.r, in_features, **factory))
            self.register_buffer("lora_B0", torch.zeros(out_features, config.r, **factory))
        else:
            self.lora_A0 = self.lora_B0 = None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._norm_cache: tuple | None = None
        if not isinstance(self.residual, QuantizedWeight):  # a quantized one keeps its own
            self.register_buffer("residual_sq_norm", frozen.row_sq_norm(residual.detach()), persistent=False)
            self._res_sq_key = frozen.version(self.residual)
            self.register_load_state_dict_post_hook(self._refresh_residual_sq_norm)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        config: AdapterConfig,
        *,
        name: str = "layer",
        generator: torch.Generator | None = None,
        initial_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "AdapterLinear":
        """Wrap ``nn.Linear`` or ``Conv1D``, reading shapes, dtype and device from it.

        PiSSA/DuDe take ``initial_factors = (B0, A0)`` when given (loading a saved adapter:
        no SVD, bit-identical residual), else the top-r SVD of the weight. LoRA/DoRA draw
        ``A`` Kaiming-uniform (a = sqrt(5), as PEFT) from ``generator`` and set ``B = 0``.
        """
        conv1d = is_conv1d(linear)
        with torch.no_grad():
            residual, initial_factors, weight = frozen_part(linear, config, name, initial_factors)
            bias = None if linear.bias is None else linear.bias.detach()
            layer = cls(residual, bias, config, fan_in_fan_out=conv1d, origin=type(linear))
            if config.svd_init:
                b0, a0 = initial_factors
                for buf, param, value in ((layer.lora_A0, layer.lora_A, a0), (layer.lora_B0, layer.lora_B, b0)):
                    buf.copy_(value)
                    param.copy_(value)
            else:
                # Drawn on the CPU so one seeded generator serves any device.
                lora_a = torch.empty(layer.lora_A.shape, dtype=layer.lora_A.dtype)
                layer.lora_A.copy_(nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator))
            if layer.magnitude is not None and config.quantize is not None and config.quant_magnitude == "full":
                layer.magnitude.copy_(decompose.row_norm_dense(weight))  # ||W||, not ||deq(Q) + s B0 A0||
            elif layer.magnitude is not None:
                # m0 by the same function as the forward's norm: g is exactly 1 at init.
                layer.magnitude.copy_(layer.weight_row_norm())
        return layer

    # -- math ---------------------------------------------------------------------------

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable tensors of this layer."""
        return [p for p in (self.lora_A, self.lora_B, self.magnitude) if p is not None]

    def _residual_sq_norm(self) -> torch.Tensor:
        """``||W_res||^2`` per row, float32 (out,): a buffer, recomputed in eager mode when the
        residual's storage changes (an in-place write; not under FSDP2, ``recheck_residual``);
        read as is under ``torch.compile``, where a data-pointer check would break the graph,
        so a move, a cast or a load recomputes it at once (``_apply``, the load hook)."""
        if isinstance(self.residual, QuantizedWeight):
            return frozen.row_sq_norm(self.residual)
        if (self.recheck_residual and not torch.compiler.is_compiling()
                and frozen.version(self.residual) != self._res_sq_key):
            self._refresh_residual_sq_norm()
        return self.residual_sq_norm

    def _refresh_residual_sq_norm(self, *_hook_args) -> None:
        if isinstance(self.residual, QuantizedWeight) or type(self.residual.data) is not torch.Tensor:
            return  # a 4-bit weight keeps its own; an FSDP shard is read after its all-gather
        with torch.no_grad():
            self.residual_sq_norm = frozen.row_sq_norm(self.residual.detach())
        self._res_sq_key = frozen.version(self.residual)

    def _apply(self, fn, recurse=True):
        """``.to``, ``.cuda``, ``.half`` cast the float32 ``||W_res||^2`` buffer with the rest:
        it is recomputed from the moved residual instead, and the eval-mode norm is dropped
        (its key is data pointers, which a move may hand to another tensor)."""
        super()._apply(fn, recurse)
        self._refresh_residual_sq_norm()
        self._norm_cache = None
        return self

    def weight_row_norm(self) -> torch.Tensor:
        """``||W_res + s B A||`` per output row, float32 (out,); differentiable in A and B.

        Float32 under autocast too: autocast would run its matmuls in bf16, and ``g`` would
        be off by up to 0.5% per row (SmolLM2 DuDe at init, where it must be exactly 1). The
        norm is of parameters only; the activations' matmuls keep autocast."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return decompose.row_norm_factored(
                frozen.times_transpose(self.residual, self.lora_A), self._residual_sq_norm(), self.lora_A,
                self.lora_B, self.scaling,
            )

    def magnitude_scale(self) -> torch.Tensor:
        """``g = m / ||W_res + s B A||_row`` (out,), float32."""
        if not self.detach_norm:
            return decompose.magnitude_scale(self.magnitude, self.weight_row_norm())
        if self.training or torch.compiler.is_compiling():
            # No cache while training: fused optimizers (torch's fused AdamW, as HF Trainer
            # picks) update parameters without bumping their version counters. None under
            # torch.compile: its key (data pointers, versions) cannot be traced.
            with torch.no_grad():
                norm = self.weight_row_norm()
            return decompose.magnitude_scale(self.magnitude, norm)
        key = (frozen.version(self.residual), *((t.data_ptr(), t._version) for t in (self.lora_A, self.lora_B)))
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, self.weight_row_norm())
        return decompose.magnitude_scale(self.magnitude, self._norm_cache[1])

    def train(self, mode: bool = True) -> "AdapterLinear":
        """Every switch of mode drops the cached norm: whatever stepped the parameters
        in between, the first eval batch recomputes it."""
        self._norm_cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_path or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return self.forward_autograd(x)  # torch.compile: see the class docstring
        return self.forward_fused(x)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The eager path: ``fused.AdapterFunction`` (its zero-``g`` check is a host sync)."""
        dropped = self.dropout(x)
        dropped = None if dropped is x else dropped
        if torch.is_grad_enabled() and self._norm_from_rows(x):
            scale, norm_inside = None, (self.magnitude, self._residual_sq_norm())
        else:
            scale, norm_inside = (None if self.magnitude is None else self.magnitude_scale()), None  # (out,) float32
        out = fused.adapter_forward(
            x, dropped, self.residual, self.lora_A, self.lora_B, self.scaling, scale, norm_inside
        )
        return out if self.bias is None else out + self.bias

    def _norm_from_rows(self, x: torch.Tensor) -> bool:
        """Whether ``g``'s ``W_res A^T`` comes as ``r`` extra rows of the base matmul, ``[x; A]
        W_res^T`` (``norm_rows``; ``fused.base_with_norm_rows`` on the fused path), instead of
        a second pass over ``W_res`` or a second dequantization of ``Q``: a norm without
        gradient, float32 compute, in training or under torch.compile (in eager eval the
        norm is cached instead)."""
        return (self.magnitude is not None and (self.detach_norm or not torch.is_grad_enabled())
                and (self.training or torch.compiler.is_compiling()) and norm_rows.applies(self.residual, x))

    def forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        """The same function by plain autograd ops (used under autocast, and as a baseline); a
        half-precision output takes ``g`` and the sum through ``scaled_sum`` (one rounding)."""
        if self._norm_from_rows(x):  # g's W_res A^T from r extra rows of the base matmul
            base, residual_a = norm_rows.base_with_norm_rows(x, self.residual, self.lora_A)
            with torch.no_grad():
                norm = decompose.row_norm_factored(residual_a, self._residual_sq_norm(), self.lora_A,
                                                   self.lora_B, self.scaling)
            scale = decompose.magnitude_scale(self.magnitude, norm)
        else:
            base = frozen.linear(x, self.residual)  # (..., out), one base matmul even with dropout
            scale = None if self.magnitude is None else self.magnitude_scale()
        hidden = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        update = F.linear(hidden, self.lora_B * self.scaling)  # (..., out)
        if scale is None:  # a half base and a float32 update: summed in float32, rounded once
            out = (base + update).to(base.dtype)
        else:  # g in float32 and one rounding into a half output, as PEFT (scaled_sum.py)
            out = scaled_sum(base, update, scale)
        if self.bias is not None:
            out = out + self.bias
        return out

    # -- merge ----------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight this layer computes, float32 (out, in), under autocast too."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return decompose.merged_weight(frozen.dense(self.residual), self.lora_A, self.lora_B, self.scaling,
                                           self.magnitude)

    @torch.no_grad()
    def to_linear(self) -> nn.Module:
        """A plain layer of the original type (``nn.Linear`` or ``Conv1D``) computing the same function."""
        weight = self.merged_weight().to(self.residual.dtype)  # (out, in)
        has_bias = self.bias is not None
        if self.fan_in_fan_out:
            plain = self.origin(self.out_features, self.in_features)
            plain.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
            plain.bias = nn.Parameter(self.bias.clone() if has_bias else torch.zeros_like(weight[:, 0]), requires_grad=False)
            return plain.to(weight.device)
        plain = nn.Linear(self.in_features, self.out_features, bias=has_bias, device="meta")
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if has_bias:
            plain.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return plain

    def extra_repr(self) -> str:
        method = {(False, False): "lora", (False, True): "dora", (True, False): "pissa", (True, True): "dude"}[
            (self.lora_A0 is not None, self.magnitude is not None)
        ]
        return f"{self.in_features}, {self.out_features}, method={method}, r={self.r}, scaling={self.scaling:g}"
