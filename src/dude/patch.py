"""Find target layers (PEFT's matching rules), swap in adapters, merge them back out."""

from __future__ import annotations

import re

import torch
from torch import nn

from .build import is_adaptable
from .config import AdapterConfig
from .layer import AdapterLinear

CONFIG_ATTR = "dude_config"  # where apply() leaves the AdapterConfig on the model


def name_matches(name: str, pattern: list[str] | str | None) -> bool:
    """PEFT semantics: a list matches a name equal to an entry or ending in ``"." + entry``;
    a string is a regex that must match the whole name."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The modules ``config`` selects, by full name, in model order. Refuses a matched
    module that is not a linear layer, and a config that matches nothing."""
    targets = {}
    for name, module in model.named_modules():
        if not name or not name_matches(name, config.target_modules) or name_matches(name, config.exclude_modules):
            continue
        if not is_adaptable(module):
            raise TypeError(
                f"target_modules matched {name!r}, a {type(module).__name__}; dude adapts nn.Linear and "
                "transformers' Conv1D only: narrow AdapterConfig.target_modules"
            )
        targets[name] = module
    if not targets:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_adaptable(m)})
        raise ValueError(
            f"AdapterConfig.target_modules={config.target_modules!r} matched no module "
            f"(exclude_modules={config.exclude_modules!r}); linear layers in this model: {leaves}"
        )
    return targets


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every adapter layer of the model, by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors, asked of the layers that own them (not matched by name)."""
    return [p for layer in adapter_layers(model).values() for p in layer.adapter_params()]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors under their ``model.state_dict()`` names (for checkpoints)."""
    ids = {id(p) for p in adapter_parameters(model)}
    return {name: p.detach() for name, p in model.named_parameters() if id(p) in ids}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors saved by ``adapter_state_dict`` back, in place; names and shapes must match."""
    own = adapter_state_dict(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"adapter state does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"adapter state {name}: shape {tuple(tensor.shape)}, model has {tuple(own[name].shape)}")
            own[name].copy_(tensor)


def apply(
    model: nn.Module,
    config: AdapterConfig,
    *,
    initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """Replace every targeted layer by an ``AdapterLinear``, in place; freeze everything else.

    ``initial_factors`` (name -> ``(B0, A0)``) skips the SVD, as when loading a saved adapter.
    Returns ``model``, which keeps its class: HF ``Trainer``, ``generate`` and friends work.
    When the adapters replace the frozen weights (pissa, dude, ``quantize``), the CPU tensors
    they leave are first copied out of a memory-mapped checkpoint (``release_checkpoint_file``).
    """
    if adapter_layers(model):
        raise ValueError(
            "this model already has dude adapters (dude.apply was called before); "
            "dude.merge it first or start from a fresh base model"
        )
    targets = find_targets(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    if config.svd_init or config.quantize is not None:  # the adapters replace the frozen weights
        release_checkpoint_file(model, targets)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    for name in list(targets):  # in order (one generator); each base layer freed once replaced,
        module = targets.pop(name)  # so the init holds one old weight at a time, not the whole base twice
        factors = None if initial_factors is None else initial_factors[name]
        layer = AdapterLinear.from_linear(module, config, name=name, generator=generator, initial_factors=factors)
        _set_submodule(model, name, layer)
        del module, layer
    setattr(model, CONFIG_ATTR, config)
    return model


def release_checkpoint_file(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Copy the CPU tensors other than the targets' weights into this process's own memory,
    before the adapters replace those weights (by a residual ``W - s B0 A0``, 4-bit codes).

    transformers maps a safetensors checkpoint into memory and its CPU tensors view the file.
    The replaced weights are freed, but the tensors left alone (embedding, norms, biases) would keep
    the whole mapping, and every page of it the init read, resident: on SmolLM2 the process
    kept 405 MiB of file pages to serve a 108 MiB embedding. With those copied, the mapping
    goes with the last replaced weight. Skipped when more is left than is replaced.
    """
    replaced = {id(module.weight): module.weight.numel() for module in targets.values()}
    outside = {id(t): t for t in (*model.parameters(), *model.buffers())  # biases of the targets too
               if id(t) not in replaced and t.device.type == "cpu"}
    if sum(t.numel() for t in outside.values()) >= sum(replaced.values()):
        return
    with torch.no_grad():
        for param in model.parameters():  # each Parameter once, kept: ties (lm_head = embedding) stay
            if id(param) in outside:
                param.data = param.data.clone()
        copies = {key: t.clone() for key, t in outside.items() if not isinstance(t, nn.Parameter)}
        for module in model.modules():  # a buffer shared by two modules stays shared
            for name, buffer in module._buffers.items():
                if buffer is not None and id(buffer) in copies:
                    module._buffers[name] = copies[id(buffer)]


def get_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not adapter_layers(model):
        raise ValueError("this model has no dude adapters: call dude.apply(model, config) or dude.load first")
    return config


def merge(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by the plain layer it computes, in place. One-way:
    the result is an ordinary model (``save_pretrained`` gives a stock checkpoint)."""
    get_config(model)
    for name, layer in adapter_layers(model).items():
        _set_submodule(model, name, layer.to_linear())
    delattr(model, CONFIG_ATTR)
    return model
