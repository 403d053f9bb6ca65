"""Export a merged model as one GGUF file for llama.cpp, Ollama and LM Studio.

    import dude
    from dude.export import export_gguf
    model, tokenizer = dude.load_model(); base, _ = dude.load_model()
    dude.load(model, "runs/smoke")
    report = export_gguf(model, tokenizer, "out/", "q8_0", base=base)   # out/model-q8_0.gguf

CLI: ``dude export --adapter RUN --output-dir OUT --gguf q8_0``.

The model is merged exactly as ``dude.merge`` / ``dude export`` merge it, then written by
gguf-py (``gguf_write``) with metadata copied from the base model's own GGUF when it came as
one, or built from the config and tokenizer (``gguf_meta``). Every export measures how
faithful the file is (``fidelity``), prints it and writes it beside the file as JSON, with
an Ollama ``Modelfile``. Everything is written under temporary names and renamed into
place at the end: a refused or failed export leaves no file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

from torch import nn

from . import fidelity, gguf_meta, gguf_write
from .gguf_write import LOW_BIT, TYPES

__all__ = ["TYPES", "LowFidelityWarning", "export_gguf", "gguf_paths"]


class LowFidelityWarning(UserWarning):
    """A 4/5-bit export that keeps less than half of the fine-tune."""


def gguf_paths(directory: str | os.PathLike, gguf_type: str, name: str = "model") -> dict[str, Path]:
    """The files one export writes: the model, its faithfulness report, its Ollama Modelfile."""
    stem = Path(directory) / f"{name}-{gguf_type}"
    return {"gguf": stem.with_suffix(".gguf"), "report": stem.with_suffix(".json"),
            "modelfile": stem.with_suffix(".Modelfile")}


def _check_vocab(model: nn.Module, tokenizer, source) -> None:
    n_tokens = gguf_meta.gguf_vocab(source)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != n_tokens or len(tokenizer) > n_tokens:
        raise ValueError(f"the vocabulary changed: the model has {rows} embedding rows and the tokenizer "
                         f"{len(tokenizer)} tokens, the base GGUF {n_tokens} tokens; a GGUF export keeps the "
                         "base GGUF's tokenizer, so the vocabulary must stay as it was")


def _ordered(tensors: dict, source) -> dict:
    """The tensors in the base GGUF's order (so an unchanged base gives back its bytes)."""
    if source is None:
        return tensors
    order = gguf_meta.gguf_tensor_names(source)
    if set(order) != set(tensors):
        diff = sorted(set(order) ^ set(tensors))[:4]
        raise ValueError(f"the model's tensors differ from the base GGUF's ({diff}): not the same architecture")
    return {name: tensors[name] for name in order}


def _modelfile(gguf_file: Path, tokenizer) -> str:
    lines = [f"# ollama create NAME -f {gguf_file.with_suffix('.Modelfile').name}",
             f"FROM ./{gguf_file.name}"]  # Ollama reads the chat template stored in the file
    if tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


def _warning(report: dict) -> str | None:
    kept = report["kept"]
    if report["type"] in LOW_BIT and kept is not None and kept < 0.5:
        return (f"the {report['type']} export keeps only {kept:.0%} of the fine-tune (its rounding snaps small "
                "changes back onto the base weights); export with --gguf q8_0 to keep it")
    return None


def _stage(directory: Path, final: Path, staged: list) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    staged.append((Path(tmp), final))
    return Path(tmp)


def export_gguf(model: nn.Module, tokenizer, directory: str | os.PathLike, gguf_type: str = "q8_0", *,
                source_gguf: str | os.PathLike | None = None, base: nn.Module | None = None,
                overwrite: bool = False, name: str = "model") -> dict:
    """Merge ``model``'s adapters IN PLACE (if it has any) and write ``<directory>/<name>-<type>.gguf``.

    Args:
        gguf_type: f32, f16, bf16, q8_0 (default), q4_0, q4_1, q5_0 or q5_1.
        source_gguf: the base model's own GGUF; its metadata is copied (tokenizer, template, rope).
            None: metadata built from ``model.config`` and ``tokenizer`` (llama, byte-level BPE).
        base: the base model (same architecture): gives ``kl_base`` and ``kept`` (fidelity.py).
        overwrite: replace existing files of this name and type.

    Returns the report also written to ``<name>-<type>.json``: the faithfulness figures, the
    file's size, and a warning when a 4/5-bit export keeps less than half of the fine-tune.
    """
    from ..patch import adapter_layers, merge

    gguf_write.check_type(gguf_type, "the GGUF type")
    gguf_write.check_llama(model)
    directory = Path(directory)
    paths = gguf_paths(directory, gguf_type, name)
    if paths["gguf"].exists() and not overwrite:
        raise FileExistsError(f"{paths['gguf']} exists; pass --overwrite (overwrite=True) or another --output-dir")
    source = gguf_meta.read_gguf(Path(source_gguf)) if source_gguf is not None else None
    if source is not None:
        _check_vocab(model, tokenizer, source)
    if adapter_layers(model):
        merge(model)
    tensors = _ordered(gguf_write.gguf_tensors(model), source)
    gguf_write.check_finite(tensors)
    kv = (gguf_meta.copy_from_gguf(source, gguf_type) if source is not None
          else gguf_meta.build_from_model(model, tokenizer, gguf_type, name))
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        tmp = _stage(directory, paths["gguf"], staged)
        gguf_write.write(tmp, kv, gguf_write.quantize(tensors, gguf_type))
        del tensors
        report = {"file": paths["gguf"].name, "type": gguf_type, "bytes": tmp.stat().st_size,
                  "metadata": f"copied from {Path(source_gguf).name}" if source is not None else "built from config and tokenizer",
                  **fidelity.measure(tmp, model, tokenizer, base)}
        report["warning"] = _warning(report)
        _stage(directory, paths["report"], staged).write_text(json.dumps(report, indent=2) + "\n")
        _stage(directory, paths["modelfile"], staged).write_text(_modelfile(paths["gguf"], tokenizer))
        for tmp_path, final in staged:
            tmp_path.chmod(0o644)
            os.replace(tmp_path, final)
    finally:
        for tmp_path, _ in staged:
            tmp_path.unlink(missing_ok=True)
    if report["warning"]:
        warnings.warn(report["warning"], LowFidelityWarning, stacklevel=2)
    return report


def summary(report: dict) -> str:
    """One line: file, size, KL and kept share."""
    kept = "" if report["kept"] is None else f", kept {report['kept']:.1%} of the fine-tune (KL to base {report['kl_base']:.3g})"
    return (f"{report['file']}: {report['bytes'] / 2**20:.1f} MiB, mean KL per token to the merged model "
            f"{report['kl_export']:.3g} on {report['tokens']} held-out tokens{kept}")


def run_gguf_export(model_cfg, target) -> dict:
    """``dude export --gguf TYPE``: base model (for ``kept``), base + adapter merged, one GGUF."""
    from ..hub import default_gguf_path, is_default_model_dir, load_model
    from ..train.commands import load_for

    gguf_write.check_type(target.gguf, "--gguf")
    path = gguf_paths(target.output_dir, target.gguf)["gguf"]
    if path.exists() and not target.overwrite:  # before minutes of work
        raise FileExistsError(f"{path} exists; pass --overwrite or another --output-dir")
    model, tokenizer, base_path = load_for(model_cfg, target.adapter, target.full_precision)
    gguf_write.check_llama(model)
    source = default_gguf_path() if base_path is None or is_default_model_dir(base_path) else None
    base, _ = load_model(base_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowFidelityWarning)  # said once below, as a plain line
        report = export_gguf(model, tokenizer, target.output_dir, target.gguf, source_gguf=source, base=base,
                             overwrite=target.overwrite)
    print(f"wrote {path}\n{summary(report)}")
    if report["warning"]:
        print(f"dude export: warning: {report['warning']}", file=sys.stderr)
    return report
