"""One adapter layer for LoRA, DoRA, PiSSA and DuDe."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import decompose, fused
from .config import AdapterConfig


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_weight(weight: torch.Tensor, name: str) -> None:
    """Refuse what an init cannot handle, naming why (as torchtune and PEFT do)."""
    if weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device; load real weights before dude.apply")
    if not weight.is_floating_point():
        raise TypeError(
            f"{name}: weight dtype {weight.dtype} is not a float; dude adapts float32, bfloat16 or float16 "
            "layers (dequantize the model first)"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN or inf values; refusing to decompose it")


class AdapterLinear(nn.Module):
    """DuDe (arXiv:2505.14367), and LoRA, DoRA, PiSSA as the other corners of one layer.

        y = g * (x W_res^T + s * (drop(x) A^T) B^T) + bias
        g = m / ||W_res + s B A||_row          (DoRA, DuDe; norm detached by default)
        g = 1                                   (LoRA, PiSSA)

    ``residual`` is the frozen part: ``W - s B0 A0`` with ``B0, A0`` the top-r singular
    factors (PiSSA, DuDe), or ``W`` itself (LoRA, DoRA, where ``B0 = 0``). It is named for
    what it is, so a stock checkpoint cannot be loaded into it by accident. ``lora_A``
    (r, in), ``lora_B`` (out, r) and ``magnitude`` (out,) train; they are kept in
    float32 when the base is half precision (as PEFT's ``autocast_adapter_dtype``).
    ``lora_A0``/``lora_B0`` keep the initial factors of PiSSA and DuDe for exact export.

    The norm never forms ``B @ A``: see ``decompose.row_norm_factored``. In eval mode with
    a detached norm, ``g`` is cached across batches until a parameter changes (tracked by
    tensor version counters, and dropped on every ``train()``/``eval()`` switch).

    ``forward`` runs ``fused.AdapterFunction`` (one base matmul, the update accumulated in
    place, the output saved instead of a pre-scale copy); ``fast_path = False`` on the class
    or an instance selects ``forward_autograd``, the same formula by plain autograd ops,
    which is also used under autocast.
    """

    fast_path = True

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
        self.residual = nn.Parameter(residual, requires_grad=False)
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
        self._res_sq_cache: tuple | None = None

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
        weight = linear.weight.T if conv1d else linear.weight  # (out, in)
        _check_weight(weight, name)
        if config.r > min(weight.shape):
            raise ValueError(
                f"{name}: rank r={config.r} exceeds min(out, in) = {min(weight.shape)} of its "
                f"{tuple(weight.shape)} weight; lower AdapterConfig.r or exclude the layer (exclude_modules)"
            )
        with torch.no_grad():
            if config.svd_init:
                if initial_factors is None:
                    u, s, vh = decompose.top_singular(
                        weight.detach().to(torch.float32), config.r, randomized=config.svd == "randomized",
                        niter=config.svd_niter, oversample=config.svd_oversample, seed=config.seed,
                    )
                    initial_factors = decompose.principal_factors(u, s, vh, config.scaling)
                b0, a0 = initial_factors
                residual = decompose.residual_weight(weight.detach(), b0, a0, config.scaling)
            else:
                # LoRA/DoRA: the residual is the weight itself, shared, not copied.
                residual = weight.detach().contiguous() if conv1d else weight.detach()
            bias = None if linear.bias is None else linear.bias.detach()
            layer = cls(residual, bias, config, fan_in_fan_out=conv1d, origin=type(linear))
            if config.svd_init:
                for buf, param, value in ((layer.lora_A0, layer.lora_A, a0), (layer.lora_B0, layer.lora_B, b0)):
                    buf.copy_(value)
                    param.copy_(value)
            else:
                # Drawn on the CPU so one seeded generator serves any device.
                lora_a = torch.empty(layer.lora_A.shape, dtype=layer.lora_A.dtype)
                layer.lora_A.copy_(nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator))
            if layer.magnitude is not None:
                # m0 by the same function as the forward's norm: g is exactly 1 at init.
                layer.magnitude.copy_(layer.weight_row_norm())
        return layer

    # -- math ---------------------------------------------------------------------------

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable tensors of this layer."""
        return [p for p in (self.lora_A, self.lora_B, self.magnitude) if p is not None]

    def _residual_sq_norm(self) -> torch.Tensor:
        key = (self.residual.data_ptr(), self.residual._version)
        if self._res_sq_cache is None or self._res_sq_cache[0] != key:
            with torch.no_grad():
                self._res_sq_cache = (key, decompose.row_sq_norm(self.residual))
        return self._res_sq_cache[1]

    def weight_row_norm(self) -> torch.Tensor:
        """``||W_res + s B A||`` per output row, float32 (out,); differentiable in A and B."""
        return decompose.row_norm_factored(
            self.residual, self._residual_sq_norm(), self.lora_A, self.lora_B, self.scaling
        )

    def magnitude_scale(self) -> torch.Tensor:
        """``g = m / ||W_res + s B A||_row`` (out,), float32."""
        if not self.detach_norm:
            return self.magnitude.to(torch.float32) / self.weight_row_norm()
        if self.training:
            # No cache while training: fused optimizers (torch's fused AdamW, as HF Trainer
            # picks) update parameters without bumping their version counters.
            with torch.no_grad():
                norm = self.weight_row_norm()
            return self.magnitude.to(torch.float32) / norm
        key = tuple((t.data_ptr(), t._version) for t in (self.residual, self.lora_A, self.lora_B))
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, self.weight_row_norm())
        return self.magnitude.to(torch.float32) / self._norm_cache[1]

    def train(self, mode: bool = True) -> "AdapterLinear":
        """Every switch of mode drops the cached norm: whatever stepped the parameters
        in between, the first eval batch recomputes it."""
        self._norm_cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast_path or torch.is_autocast_enabled(x.device.type):
            return self.forward_autograd(x)
        dropped = self.dropout(x)
        scale = None if self.magnitude is None else self.magnitude_scale()  # (out,) float32
        out = fused.adapter_forward(
            x, None if dropped is x else dropped, self.residual, self.lora_A, self.lora_B, self.scaling, scale
        )
        return out if self.bias is None else out + self.bias

    def forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        """The same function by plain autograd ops (used under autocast, and as a baseline)."""
        base = F.linear(x, self.residual)  # (..., out), one base matmul even with dropout
        hidden = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        update = F.linear(hidden, self.lora_B * self.scaling)  # (..., out)
        out = base + update.to(base.dtype)
        if self.magnitude is not None:
            out = out * self.magnitude_scale().to(out.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out

    # -- merge ----------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight this layer computes, float32 (out, in)."""
        return decompose.merged_weight(self.residual, self.lora_A, self.lora_B, self.scaling, self.magnitude)

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
