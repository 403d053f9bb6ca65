"""A merged llama-architecture model as the tensors of one GGUF file (gguf-py, in-process).

The map from a transformers ``LlamaForCausalLM`` to llama.cpp's layout, as llama.cpp's own
``convert_hf_to_gguf.py`` does it:

- names from ``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)``
  (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``);
- q/k rows permuted back to GGUF's rotary layout (``permute_for_gguf``; transformers undoes
  it on load, so a missing permutation shows as a model that loads and talks nonsense);
- a tied ``lm_head`` is not written (llama.cpp reuses ``token_embd``);
- 1-D tensors and norms in F32; every 2-D weight in the chosen type, except that the
  4- and 5-bit types keep the output matrix (the tied ``token_embd``) in Q8_0. llama.cpp's
  ``llama-quantize`` gives that matrix Q6_K, and Q8_0 where the row length is not a
  multiple of 256 (SmolLM2: 576); gguf-py cannot write K-quants, so Q8_0 always.
- a row that does not split into the type's blocks falls back to F16 (as the converter does).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")
SUPPORTED = "the llama architecture (LlamaForCausalLM: SmolLM/SmolLM2, Llama 2/3, TinyLlama, ...)"


def ggml_type(gguf_type: str):
    """The ``GGMLQuantizationType`` of an export type name (``"q8_0"`` -> ``Q8_0``)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[gguf_type.upper()]


def file_type(gguf_type: str):
    """``general.file_type`` of an export type (``LlamaFileType``)."""
    from gguf import LlamaFileType

    return LlamaFileType.ALL_F32 if gguf_type == "f32" else LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]


def check_type(gguf_type: str, where: str = "gguf") -> None:
    if gguf_type not in TYPES:
        raise ValueError(f"{where} must be one of {', '.join(TYPES)} (q8_0 recommended), got {gguf_type!r}")


def check_llama(model: nn.Module) -> None:
    """Refuse, in one line, a model llama.cpp's llama graph would not compute."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind != "llama":
        raise ValueError(f"GGUF export supports {SUPPORTED}; this model is {kind!r} ({type(model).__name__}): "
                         "export it without --gguf for a transformers folder")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise ValueError(f"GGUF export: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                         "(default and linear rope only)")


def permute_for_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows -> GGUF rows (llama.cpp ``convert_hf_to_gguf.py`` ``permute``).

    Per head of ``d`` rows, HF rotates the pairs ``(i, i + d/2)`` (``rotate_half``); llama.cpp
    rotates ``(2i, 2i + 1)``. So head rows ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` become
    ``[x_0, y_0, x_1, y_1, ...]``. ``n_head``: query heads for q, key/value heads for k.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{GGUF name: tensor}`` of a plain (merged) llama model, in model order, q/k permuted."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for name, tensor in model.state_dict().items():
        if (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"GGUF export: tensor {name!r} has no llama.cpp name; supported: {SUPPORTED}")
        if ".q_proj." in name:
            tensor = permute_for_gguf(tensor, n_head)
        elif ".k_proj." in name:
            tensor = permute_for_gguf(tensor, n_kv)
        out[new] = tensor.detach()
    return out


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, has_output: bool):
    """The GGML type one tensor is written in (the rules in the module docstring)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1 or name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    kind = ggml_type(gguf_type)
    is_output = name == "output.weight" or (name == "token_embd.weight" and not has_output)
    if gguf_type in LOW_BIT and is_output:
        kind = GGMLQuantizationType.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[kind][0]:
        return GGMLQuantizationType.F16
    return kind


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"GGUF export: {bad} non-finite values in {name!r}: the merged model is broken "
                             "(check the adapter; nothing was written)")


def quantize(tensors: dict[str, torch.Tensor], gguf_type: str) -> list[tuple[str, np.ndarray, object]]:
    """``[(name, bytes or floats as numpy, GGML type)]``, ready for ``GGUFWriter.add_tensor``."""
    from gguf import quants

    has_output = "output.weight" in tensors
    out = []
    for name, tensor in tensors.items():
        kind = tensor_type(name, tuple(tensor.shape), gguf_type, has_output)
        data = quants.quantize(tensor.to(torch.float32).cpu().numpy(), kind)
        out.append((name, data, kind))
    return out


def write(path, kv_source, tensors: list[tuple[str, np.ndarray, object]]) -> None:
    """Write one GGUF file: ``kv_source(writer)`` adds the metadata, then the tensors in order."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    kv_source(writer)
    for name, data, kind in tensors:
        writer.add_tensor(name, data, raw_dtype=kind)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
