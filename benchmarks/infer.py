"""Inference: unmerged adapters in eval mode against LoRA, and merged models against the base.

The norm of DoRA/DuDe does not change between eval batches; the layer caches it (keyed
on tensor versions), so an unmerged eval forward costs LoRA's plus one scale per row.
Merging gives back plain ``nn.Linear`` layers, so a merged model is the base model.
"""

from __future__ import annotations

import copy

import torch

import dude

from . import builders, harness


def _moved(model: torch.nn.Module) -> torch.nn.Module:
    """Move B off zero so the unmerged update and the merge are real work, not zeros."""
    with torch.no_grad():
        for layer in dude.adapter_layers(model).values():
            layer.lora_B.add_(1e-3)
    return model


def time_inference(spec: dict, methods: list[str], *, r: int, alpha: float, rounds: int, warmup: int,
                   device: str = "cpu", log=print) -> dict[str, dict]:
    """Eval-mode forward under ``torch.inference_mode``: ``base``, each unmerged method, and
    ``merged:<method>`` for the dude methods (``dude.merge`` of a moved copy)."""
    base, batch, targets = builders.workload(spec, device)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    models = {"base": base}
    for name in methods:
        model = builders.adapt(base, name, r=r, alpha=alpha, targets=targets).to(device)
        if name.startswith("dude-"):
            _moved(model)
            models[f"merged:{name}"] = dude.merge(copy.deepcopy(model))
        models[name] = model

    def forward(model):
        model.eval()

        def run():
            with torch.inference_mode():
                model(**batch)

        return run

    return harness.interleaved({n: forward(m) for n, m in models.items()}, rounds=rounds, warmup=warmup,
                               device=device, log=log)
