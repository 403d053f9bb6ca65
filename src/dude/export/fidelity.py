"""How faithful a GGUF export is to the merged model it came from.

The written file is read back by transformers' own GGUF loader (``load_gguf_checkpoint``:
gguf-py dequantisation and transformers' inverse of the q/k permutation, none of our
code), into a fresh model of the merged model's config. On a few held-out texts (GSM-Symbolic
test-template questions and answers, shipped with dude, in the chat template when the
tokenizer has one):

    KL(p || q)  = mean over every token position t of  sum_v p_t(v) (log p_t(v) - log q_t(v))
    kl_export   = KL(merged || export)
    kl_base     = KL(merged || base)        (a fine-tune only: what the fine-tune changed)
    kept        = 1 - kl_export / kl_base    (the share of the fine-tune that survived)

``kept`` is 1 for a lossless export and about 0 when the export computes the base model
again (quantisation snapped the change back onto the base grid); it goes below 0 when the
rounding costs more than the fine-tune changed.

These figures measure the written weights, computed in float32. llama.cpp also rounds the
activations of its Q8_0/BF16 dot products, so its own KL is higher for those types (on
SmolLM2, q8_0: 5.0e-3 in llama.cpp against 1.3e-3 here); for the 4/5-bit types the weight
rounding dominates and the two agree within a few percent (tests/test_gguf_export.py).
"""

from __future__ import annotations

import torch
from torch import nn

N_TEXTS = 8
MAX_TOKENS = 128


def heldout_ids(tokenizer, n: int = N_TEXTS, max_tokens: int = MAX_TOKENS) -> list[torch.Tensor]:
    """Token ids of ``n`` held-out GSM-Symbolic problems with their answers (one per test template)."""
    from ..data.gsm_symbolic import gsm_symbolic

    rows = gsm_symbolic("test", variants_per_template=1)[:n]
    out = []
    for row in rows:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = f"{row['question']}\n{row['answer']}"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:max_tokens]
        out.append(ids)
    return out


@torch.no_grad()
def log_probs(model: nn.Module, texts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[(T, V)]`` float32 log-probabilities of the next token at every position."""
    model.eval()
    device = next(model.parameters()).device
    return [torch.log_softmax(model(ids[None].to(device)).logits[0].float(), -1).cpu() for ids in texts]


@torch.no_grad()
def mean_kl(reference: list[torch.Tensor], model: nn.Module, texts: list[torch.Tensor]) -> float:
    """Mean per-token KL(reference || model) over all positions of ``texts``."""
    total, count = 0.0, 0
    for ref, other in zip(reference, log_probs(model, texts)):
        total += float((ref.exp() * (ref - other)).sum())
        count += ref.shape[0]
    return total / count


def load_gguf_as(like: nn.Module, path) -> nn.Module:
    """The GGUF file at ``path`` read by transformers into a fresh model of ``like``'s config."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(like.config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"reading the export back: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model.eval()


def measure(path, merged: nn.Module, tokenizer, base: nn.Module | None = None) -> dict:
    """The faithfulness figures of the GGUF at ``path`` (keys as in the module docstring)."""
    texts = heldout_ids(tokenizer)
    reference = log_probs(merged, texts)
    export = load_gguf_as(merged, path)
    kl_export = mean_kl(reference, export, texts)
    del export
    kl_base = mean_kl(reference, base, texts) if base is not None else None
    kept = 1.0 - kl_export / kl_base if kl_base else None
    return {"texts": len(texts), "tokens": sum(len(t) for t in texts), "kl_export": kl_export,
            "kl_base": kl_base, "kept": kept}
