"""``dude eval`` and ``dude export``: load a model (and an adapter), then evaluate or merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import EvalCommandConfig, ExportConfig, ModelConfig
from .rundir import write_json


def _base_path(model: ModelConfig, adapter: str | None) -> str | None:
    """``model.name_or_path``; else the base recorded in the adapter, if it is a local
    folder; else None (the built-in model)."""
    if model.name_or_path or not adapter:
        return model.name_or_path
    config = Path(adapter) / "adapter_config.json"
    if config.is_file():
        base = json.loads(config.read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            return base
    return None


def load_for(model: ModelConfig, adapter: str | None, full_precision: bool = False) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, base path): the base model with ``adapter`` loaded (dude layers;
    ``full_precision``: an adapter trained on a 4-bit base applied to the full-precision weights)."""
    from .. import load as load_adapter
    from ..hub import load_model

    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter {adapter!r} is not a directory")
    base = _base_path(model, adapter)
    lm, tokenizer = load_model(base, dtype=getattr(torch, model.dtype))
    if adapter is not None:
        load_adapter(lm, adapter, full_precision=full_precision)
    return lm, tokenizer, base


def run_eval(cfg: EvalCommandConfig) -> dict[str, Any]:
    """Evaluate and write ``<output_dir>/eval.json``; print a short table."""
    from .. import merge
    from .evaluation import evaluate_tasks, summary_table

    out = Path(cfg.target.output_dir)
    if (out / "eval.json").exists() and not cfg.target.overwrite:
        raise FileExistsError(f"{out / 'eval.json'} exists; pass --overwrite or another --output-dir")
    if not cfg.eval.tasks:
        raise ValueError("eval.tasks is empty: name at least one eval set (--tasks heldout mmlu)")
    model, tokenizer, base = load_for(cfg.model, cfg.target.adapter)
    if cfg.target.adapter is not None:
        merge(model)  # same function, faster generation
    results = evaluate_tasks(cfg.eval, cfg.data, model, tokenizer)
    report = {"model": base or "SmolLM2-135M-Instruct (built-in)", "adapter": cfg.target.adapter,
              "results": results}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", report)
    print(summary_table(results))
    return report


def run_export(cfg: ExportConfig) -> Path:
    """Adapter directory -> merged ``save_pretrained`` folder (with the tokenizer)."""
    from .. import export_merged

    model, tokenizer, _ = load_for(cfg.model, cfg.export.adapter, cfg.export.full_precision)
    path = export_merged(model, cfg.export.output_dir, tokenizer, overwrite=cfg.export.overwrite)
    print(f"exported merged model to {path}")
    return path
