"""The frozen part of an adapter layer, built from the layer it replaces.

``frozen_part`` refuses what an init cannot handle (meta, non-float or non-finite
weights, a rank above ``min(out, in)``), then gives the residual ``W - s B0 A0``
(PiSSA, DuDe) or ``W`` (LoRA, DoRA), dense or in 4 bits (quantize.py), or the codes of
a bitsandbytes ``Linear4bit`` transformers already loaded. ``AdapterLinear.from_linear``
is its one caller.
"""

from __future__ import annotations

import torch
from torch import nn

from . import decompose
from .config import AdapterConfig
from .frozen import QuantizedWeight, is_linear4bit
from .quantize import principal_factors, quantized_split


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def check_weight(weight: torch.Tensor, name: str) -> None:
    """Refuse what an init cannot handle, naming why (as torchtune and PEFT do)."""
    if weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device; load real weights before dude.apply")
    if not weight.is_floating_point():
        raise TypeError(
            f"{name}: weight dtype {weight.dtype} is not a float; dude adapts float32, bfloat16 or float16 "
            "layers (dequantize the model first)"
        )
    # in row blocks: isfinite on a whole bf16 weight builds temporaries of 2.5x its size
    if not all(bool(torch.isfinite(rows).all()) for rows in weight.split(decompose.ROW_BLOCK)):
        raise ValueError(f"{name}: weight contains NaN or inf values; refusing to decompose it")


def check_rank(config: AdapterConfig, shape: tuple[int, int], name: str) -> None:
    if config.r > min(shape):
        raise ValueError(
            f"{name}: rank r={config.r} exceeds min(out, in) = {min(shape)} of its "
            f"{tuple(shape)} weight; lower AdapterConfig.r or exclude the layer (exclude_modules)"
        )


def prequantized(linear: nn.Module, config: AdapterConfig, name: str) -> QuantizedWeight:
    """The codes of a layer transformers already loaded in 4 bits (QLoRA, QDoRA on it)."""
    state = linear.weight.quant_state
    if config.svd_init:
        raise ValueError(
            f"{name} is already 4-bit (bitsandbytes {type(linear).__name__}): method={config.method!r} needs the "
            "full-precision weight (for its SVD, and on load for the residual W - s B0 A0; packed 4-bit data is no "
            "weight to decompose). Load the model "
            f"in full precision (no load_in_4bit) and pass AdapterConfig(quantize={state.quant_type!r}): dude "
            "quantizes the residual itself (QPiSSA/QDuDe)"
        )
    if config.quantize is not None and config.quantize != state.quant_type:
        raise ValueError(
            f"{name} is already {state.quant_type} (bitsandbytes {type(linear).__name__}) but "
            f"AdapterConfig.quantize={config.quantize!r}: load the model in full precision to requantize it, "
            "or set quantize to None or to the base's type"
        )
    check_rank(config, tuple(state.shape), name)
    return QuantizedWeight.from_linear4bit(linear)


def frozen_part(
    linear: nn.Module, config: AdapterConfig, name: str, factors: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor | QuantizedWeight, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """``(frozen part, (B0, A0) or None, full-precision weight (out, in) or None)`` of a layer.

    The frozen part is ``W - s B0 A0`` (pissa/dude) or ``W`` (lora/dora), dense, or in 4 bits
    with ``config.quantize`` (quantize.py), or the codes of a bitsandbytes ``Linear4bit``.
    """
    if is_linear4bit(linear):
        return prequantized(linear, config, name), None, None
    weight = linear.weight.T if is_conv1d(linear) else linear.weight  # (out, in)
    check_weight(weight, name)
    check_rank(config, weight.shape, name)
    weight, loaded = weight.detach(), factors is not None
    if config.svd_init and not loaded:
        factors = principal_factors(weight, config)
    if config.quantize is not None:  # on load, the saved B0, A0 give the same Q: no alternation
        quantized, factors = quantized_split(weight, config, factors, refine=not loaded, name=name)
        return quantized, factors, weight
    if config.svd_init:
        return decompose.residual_weight(weight, *factors, config.scaling), factors, weight
    # LoRA/DoRA: the residual is the weight itself, shared, not copied.
    return (weight.contiguous() if is_conv1d(linear) else weight), None, weight
