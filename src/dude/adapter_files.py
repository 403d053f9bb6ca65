"""Checks on an adapter directory before ``dude.load`` trusts it, and a warning at save.

An adapter directory is two files that must agree: ``adapter_config.json`` (PEFT's
config), ``adapter_model.safetensors`` (the tensors, and for files written by dude the
``dude_config`` metadata). ``check_adapter`` refuses, naming the file and the field:

- another adapter type (``peft_type`` other than ``LORA``), or LoRA variants dude does
  not implement (per-layer ranks, trained bias, extra saved modules, ...);
- a PEFT PiSSA/OLoRA/... adapter saved without weight conversion, which only fits the
  residual base PEFT made, not the base model;
- config fields of the wrong type, or that disagree with the metadata or the tensors;
- tensors that are not floating point or hold NaN or inf.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig

__all__ = ["check_adapter", "check_for_save"]

# adapter_config.json fields that change what the file means, and are refused when set
UNSUPPORTED = {
    "rank_pattern": "per-layer ranks", "alpha_pattern": "per-layer alphas",
    "modules_to_save": "fully trained extra modules", "layers_to_transform": "a subset of layers",
    "lora_bias": "a trained LoRA bias", "use_qalora": "QALoRA", "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings", "target_parameters": "adapted nn.Parameters",
    "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "activated LoRA",
}
DUDE_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}


def _refuse(path: Path, field: str, problem: str) -> None:
    raise ValueError(f"{path}: field {field!r} {problem}")


def _check_config(path: Path, config: dict[str, Any], from_dude: bool) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of adapter options, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        _refuse(path, "peft_type", f"is {config.get('peft_type')!r}: dude loads LoRA and DoRA adapters "
                                   "(peft_type 'LORA') and dude's own files")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        _refuse(path, "r", f"must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        _refuse(path, "lora_alpha", f"must be a positive number, got {alpha!r}")
    for flag in ("use_dora", "use_rslora"):
        if not isinstance(config.get(flag, False), bool):
            _refuse(path, flag, f"must be true or false, got {config.get(flag)!r}")
    if not config.get("target_modules"):
        _refuse(path, "target_modules", f"must name the adapted modules, got {config.get('target_modules')!r}")
    for field, meaning in UNSUPPORTED.items():
        if config.get(field):
            _refuse(path, field, f"is set ({config[field]!r:.60}): {meaning} is not supported by dude; "
                                 "load this adapter with PEFT")
    if config.get("bias", "none") != "none":
        _refuse(path, "bias", f"is {config['bias']!r}: trained biases are not supported; only 'none'")
    init = config.get("init_lora_weights", True)
    if not from_dude and isinstance(init, str) and init.split("_")[0] in ("pissa", "olora", "corda", "eva", "loftq"):
        _refuse(path, "init_lora_weights", f"is {init!r}: PEFT saved this adapter for the residual base of its "
                                           "own init, not for the base model; save it with PEFT's "
                                           "path_initial_model_for_weight_conversion, or load it with PEFT")


def _check_metadata(path: Path, metadata: dict[str, str], key: str) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(json.loads(metadata[key]))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: metadata field {key!r} is not a valid dude AdapterConfig ({err})") from None


def _check_agreement(config_path: Path, weights_path: Path, peft: dict[str, Any], dude: AdapterConfig) -> None:
    factor = 2 if dude.svd_init else 1
    alpha = dude.alpha * ((math.sqrt(2) if dude.use_rslora else 2.0) if dude.svd_init else 1.0)
    expected = {"r": dude.r * factor, "lora_alpha": alpha, "use_dora": dude.magnitude,
                "use_rslora": dude.use_rslora}
    for field, value in expected.items():
        found = peft.get(field, False)
        same = math.isclose(found, value, rel_tol=1e-6) if field == "lora_alpha" else found == value
        if not same:
            _refuse(config_path, field, f"is {found!r}, but the metadata of {weights_path.name} (method "
                                        f"{dude.method!r}, r={dude.r}, alpha={dude.alpha:g}) means {value!r}; "
                                        "the two files come from different adapters")


def _refuse_non_finite(path: Path, key: str, tensor: torch.Tensor, verb: str) -> None:
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        _refuse(path, key, f"holds {bad} NaN or inf value(s) of {tensor.numel()}; the adapter is broken "
                           f"(a diverged training run?) and is not {verb}")


def _check_tensors(path: Path, peft: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    has_magnitude = False
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            _refuse(path, key, f"has dtype {tensor.dtype}; adapter tensors are floating point")
        _refuse_non_finite(path, key, tensor, "loaded")
        part = next((p for s, p in DUDE_SUFFIXES.items() if key.endswith(s)), None)
        rank_dim = {"A": 0, "B": 1}.get(part or "")
        if rank_dim is not None and (tensor.dim() != 2 or tensor.shape[rank_dim] != peft["r"]):
            _refuse(path, key, f"has shape {tuple(tensor.shape)}, not rank r={peft['r']} of adapter_config.json")
        has_magnitude |= part == "m"
    if has_magnitude != bool(peft.get("use_dora", False)):
        what = "holds magnitude vectors (DoRA)" if has_magnitude else "holds no magnitude vector"
        raise ValueError(f"{path} {what}, but adapter_config.json field 'use_dora' is {peft.get('use_dora')!r}")


def check_adapter(directory: Path, peft_config: Any, metadata: dict[str, str],
                  tensors: dict[str, torch.Tensor], metadata_key: str) -> None:
    """Refuse an adapter directory whose files are of another kind, disagree, or hold
    non-finite values; every message names the file and the field."""
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    from_dude = isinstance(metadata, dict) and metadata_key in metadata
    _check_config(config_path, peft_config, from_dude)
    if from_dude:
        _check_agreement(config_path, weights_path, peft_config, _check_metadata(weights_path, metadata, metadata_key))
    _check_tensors(weights_path, peft_config, tensors)


def check_for_save(directory: Path, layers: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Before anything is written: refuse NaN/inf adapter tensors (naming the tensor), and
    warn when DoRA/DuDe layers have rows of zero norm: dude computes 0 there
    (``decompose.magnitude_scale``) but PEFT's DoRA divides by zero (NaN, peft#2049)."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"cannot save the adapter to {str(directory)!r}: it exists and is not a directory")
    for key, tensor in tensors.items():
        _refuse_non_finite(Path(directory) / "adapter_model.safetensors", key, tensor, "saved")
    counts = {}
    with torch.no_grad():
        for name, layer in layers.items():
            if getattr(layer, "magnitude", None) is not None:
                zero = int((layer.weight_row_norm() == 0).sum())
                if zero:
                    counts[name] = zero
    if counts:
        first = ", ".join(f"{n} ({k})" for n, k in list(counts.items())[:3])
        warnings.warn(f"{sum(counts.values())} weight rows of zero norm in {len(counts)} DoRA/DuDe layer(s), e.g. "
                      f"{first}: dude.load and dude export give 0 on those rows, as the base model; PEFT's DoRA "
                      "gives NaN there (peft#2049), so serve this adapter with dude or as a merged model",
                      stacklevel=3)
