"""Save and load adapters in PEFT's on-disk format; export merged models.

A LoRA or DoRA adapter is written as PEFT writes it. PiSSA and DuDe are written as the
exact rank-2r adapter on the untouched base model (DESIGN.md section 2):

    B' = [B | -B0]  (out, 2r),   A' = [A ; A0]  (2r, in),   alpha' = 2 alpha (sqrt(2) alpha with rsLoRA)
    W + s B' A' = W_res + s B A

so ``peft.PeftModel.from_pretrained(stock_base, dir)`` reproduces the dude model: a
DuDe adapter is a DoRA adapter with the same magnitude, a PiSSA adapter a LoRA adapter.
The first r rows/columns are the trained factors, the last r the frozen initial ones,
so ``load`` recovers both halves exactly. The AdapterConfig rides along in the
safetensors metadata. Nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .adapter_files import check_adapter, check_for_save
from .build import is_conv1d
from .config import AdapterConfig
from .frozen import is_linear4bit
from .safe_write import fsync_dir, guarded, tensor_bytes, warn_low_space
from .patch import adapter_layers, apply, find_targets, get_config, merge

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
METADATA_KEY = "dude_config"


def _peft_config(model: nn.Module, config: AdapterConfig) -> dict:
    """The ``adapter_config.json`` PEFT reads; ranks doubled for the SVD-initialised methods."""
    factor = 2 if config.svd_init else 1
    alpha_factor = (math.sqrt(2) if config.use_rslora else 2.0) if config.svd_init else 1.0
    layers = adapter_layers(model).values()
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_name,
        "r": config.r * factor,
        "lora_alpha": config.alpha * alpha_factor,
        "use_rslora": config.use_rslora,
        "use_dora": config.magnitude,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's state-dict keys and tensors for every adapter layer."""
    tensors = {}
    for name, layer in adapter_layers(model).items():
        key = PREFIX + name
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        if layer.lora_A0 is not None:
            a = torch.cat([a, layer.lora_A0])  # (2r, in)
            b = torch.cat([b, -layer.lora_B0], dim=1)  # (out, 2r)
        tensors[key + ".lora_A.weight"] = a.contiguous().cpu()
        tensors[key + ".lora_B.weight"] = b.contiguous().cpu()
        if layer.magnitude is not None:
            tensors[key + ".lora_magnitude_vector"] = layer.magnitude.detach().contiguous().cpu()
    return tensors


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT format) to ``directory``.

    Both files are fully written under temporary names (and fsynced) before either is renamed
    into place. A failed write (a full disk) raises ``safe_write.WriteFailed`` naming the file,
    the bytes needed and free, and leaves the directory as it was.
    """
    from safetensors.torch import save_file

    config = get_config(model)
    directory = Path(directory)
    tensors = _peft_tensors(model)
    check_for_save(directory, adapter_layers(model), tensors)  # before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config.to_dict())}
    peft_json = json.dumps(_peft_config(model, config), indent=2, sort_keys=True)
    sizes = {WEIGHTS_NAME: tensor_bytes(tensors) + len(metadata[METADATA_KEY]) + (64 << 10), CONFIG_NAME: len(peft_json)}
    warn_low_space(directory, sum(sizes.values()), "the adapter's files")
    staged = []
    try:
        for name, write in (
            (WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata)),
            (CONFIG_NAME, lambda tmp: Path(tmp).write_text(peft_json)),
        ):
            with guarded(directory / name, sizes[name]):  # a full disk: WriteFailed, naming the file
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
                os.close(fd)
                staged.append((tmp, directory / name))
                write(tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
        for tmp, final in staged:
            os.replace(tmp, final)
        fsync_dir(directory)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    return directory


def _read_adapter(directory: Path) -> tuple[dict, dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} an adapter directory written by dude.save or PEFT?")
    try:
        peft_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the adapter directory is corrupt") from err
    try:
        with safe_open(weights_path, "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is truncated or corrupt ({err}); save the adapter again") from err
    return peft_config, metadata, tensors


def _config_from_files(peft_config: dict, metadata: dict[str, str]) -> AdapterConfig:
    if METADATA_KEY in metadata:
        return AdapterConfig.from_dict(json.loads(metadata[METADATA_KEY]))
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"unsupported adapter type {peft_config.get('peft_type')!r}: dude loads LoRA/DoRA adapters")
    return AdapterConfig(
        method="dora" if peft_config.get("use_dora") else "lora",
        r=int(peft_config["r"]),
        alpha=float(peft_config["lora_alpha"]),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        target_modules=peft_config["target_modules"],
        exclude_modules=peft_config.get("exclude_modules"),
    )


def _split_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": .., "B": .., "m": ..}}`` from PEFT keys."""
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"unexpected tensor {key!r} in the adapter file: not a LoRA/DoRA adapter tensor")
        modules.setdefault(key[len(PREFIX) : -len(suffix)], {})[suffixes[suffix]] = tensor
    return modules


def _check_shapes(name: str, parts: dict[str, torch.Tensor], module: nn.Module, config: AdapterConfig) -> None:
    if is_linear4bit(module):
        out_features, in_features = module.weight.quant_state.shape
    else:
        out_features, in_features = (module.weight.T if is_conv1d(module) else module.weight).shape
    rank = config.r * (2 if config.svd_init else 1)
    expected = {"A": (rank, in_features), "B": (out_features, rank)}
    if config.magnitude:
        expected["m"] = (out_features,)
    if set(parts) != set(expected):
        raise ValueError(f"adapter file: layer {name} has tensors {sorted(parts)}, expected {sorted(expected)}")
    for part, shape in expected.items():
        if tuple(parts[part].shape) != shape:
            raise ValueError(
                f"adapter was saved for a different base model: layer {name} {part} has shape "
                f"{tuple(parts[part].shape)}, this model needs {shape}"
            )


def load(model: nn.Module, directory: str | os.PathLike, *, full_precision: bool = False) -> nn.Module:
    """Read an adapter directory (``dude.save`` or PEFT LoRA/DoRA) into ``model``, in place.

    The layers come back trainable; for PiSSA and DuDe the trained and the frozen
    initial factors are recovered exactly, and the residual is recomputed bit-identically.
    An adapter trained on a 4-bit base (``AdapterConfig.quantize``) rebuilds the same
    quantized model from the full-precision ``model``; ``full_precision=True`` applies it
    to the full-precision weights instead (``W + s B' A'``, the model to deploy and merge).
    """
    directory = Path(directory)
    peft_config, metadata, tensors = _read_adapter(directory)
    check_adapter(directory, peft_config, metadata, tensors, METADATA_KEY)
    config = _config_from_files(peft_config, metadata)
    if full_precision:
        config = dataclasses.replace(config, quantize=None)
    modules = _split_tensors(tensors)
    targets = find_targets(model, config)
    if set(targets) != set(modules):
        missing, extra = sorted(set(targets) - set(modules)), sorted(set(modules) - set(targets))
        raise ValueError(
            f"adapter does not fit this model: layers selected but absent from the file {missing[:5]}, "
            f"layers in the file but not in the model {extra[:5]}"
        )
    for name, module in targets.items():  # model order: the first misfit layer is named
        _check_shapes(name, modules[name], module, config)
    r = config.r
    initial = {n: (-p["B"][:, r:], p["A"][r:]) for n, p in modules.items()} if config.svd_init else None
    apply(model, config, initial_factors=initial)
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            parts = modules[name]
            layer.lora_A.copy_(parts["A"][:r])
            layer.lora_B.copy_(parts["B"][:, :r])
            if layer.magnitude is not None:
                layer.magnitude.copy_(parts["m"])
    return model


def export_merged(
    model: nn.Module, directory: str | os.PathLike, tokenizer=None, *, overwrite: bool = False
) -> Path:
    """Merge ``model``'s adapters IN PLACE (one-way) and ``save_pretrained`` it to ``directory``.

    The folder is written under a temporary name and renamed into place when complete; a
    failed write (a full disk) raises ``safe_write.WriteFailed`` and leaves no partial folder.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    merge(model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    needed = tensor_bytes(dict(model.state_dict())) + (32 << 20)  # the weights, and the tokenizer's files
    warn_low_space(directory.parent, needed, "the merged model's files")
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    with guarded(directory, needed, [staging]):  # a full disk: WriteFailed, no partial folder left
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    return directory
