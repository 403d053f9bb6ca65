"""``dude eval`` and ``dude export``: load a model (and an adapter), then evaluate or merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from . import datafiles
from .config import DataConfig, EvalCommandConfig, ExportConfig, ModelConfig
from .options import build
from .rundir import write_json

# The data options that say which rows a run trained on, and so which it held out.
SPLIT_OPTIONS = ("task", "path", "eval_path", "eval_fraction", "split_seed", "format", "columns")


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


def run_data(adapter: str | None) -> dict[str, Any] | None:
    """The ``data`` section of the ``config.yaml`` that ``dude train`` wrote beside the
    adapter; None for an adapter folder that is not a run (``dude.save``, PEFT)."""
    path = Path(adapter) / "config.yaml" if adapter else None
    if path is None or not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{str(path)!r} is not the YAML config dude train writes: {err}") from None
    data = saved.get("data") if isinstance(saved, dict) else None
    return data if isinstance(data, dict) else None


def run_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """``dude eval``'s defaults under the given options: the data options of the run in
    ``target.adapter`` (eval set 'heldout' is then the rows that run held out)."""
    target = given.get("target")
    run = run_data(target.get("adapter") if isinstance(target, dict) else None)
    return {"data": run} if run is not None else {}


def check_run_split(cfg: EvalCommandConfig) -> None:
    """Refuse to score a run folder's 'heldout' on rows other than those it held out: data
    options that differ from the run's split, or a file run that held out nothing. A
    ``data.eval_path`` that the run did not have is taken: the user names a held-out file."""
    adapter = cfg.target.adapter
    saved = run_data(adapter)
    run = build(DataConfig, saved, "data.") if saved is not None else None
    if run is None or not {"heldout", "gsm_original", run.task} & set(cfg.eval.tasks):  # sets of the run's split
        return
    differ = [f"data.{k} is {getattr(cfg.data, k)!r} where the run has {getattr(run, k)!r}" for k in SPLIT_OPTIONS
              if getattr(cfg.data, k) != getattr(run, k) and not (k == "eval_path" and not run.eval_path)]
    if differ:
        raise ValueError(f"{'; '.join(differ)} (its config.yaml in {adapter!r}), so eval set 'heldout' would not be "
                         "the rows it held out; drop the option (dude eval reads the run's data options), or score "
                         "other data with --tasks file:<path>")
    datafiles.check(Path(adapter), "eval set 'heldout' would not be the rows it held out: restore the file, or "
                                   "score other data with --tasks file:<path>")
    if "heldout" in cfg.eval.tasks and run.task == "file" and not cfg.data.eval_path and run.eval_fraction == 0:
        raise ValueError(f"eval set 'heldout': the run in {adapter!r} trained on every row of {run.path!r} "
                         "(data.eval_fraction 0 in its config.yaml), so it has no held-out rows; name a file it "
                         "never saw with --eval-path FILE (read like its training file) or --tasks file:<path>")


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
    check_run_split(cfg)
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
    """Adapter directory -> merged ``save_pretrained`` folder (with the tokenizer), or with
    ``--gguf TYPE`` one GGUF file (``dude.export``)."""
    from .. import export_merged

    if cfg.export.gguf is not None:
        from ..export import gguf_paths, run_gguf_export

        run_gguf_export(cfg.model, cfg.export)
        return gguf_paths(cfg.export.output_dir, cfg.export.gguf)["gguf"]
    model, tokenizer, _ = load_for(cfg.model, cfg.export.adapter, cfg.export.full_precision)
    path = export_merged(model, cfg.export.output_dir, tokenizer, overwrite=cfg.export.overwrite)
    print(f"exported merged model to {path}")
    return path
