"""What 4 bits cost at init: per-layer quantization error and the initial model's logit error.

- Quantization error of the adapted SmolLM2 layers (every third block), per layer type, for QPiSSA/QDuDe at
  rank r and T LoftQ alternations, relative to QLoRA's:
  ``||W - deq(Q) - s B0 A0||_F / ||W - deq(nf4(W))||_F`` (below 1: the residual split
  loses less than quantizing the whole weight).
- Logit error of the initial adapted model against the full-precision model on real text
  (the 8 GSM8K exemplars and 24 MMLU dev questions from the lm-eval wheel, cut into
  128-token rows): mean KL(p_full || p_quantized) per token, and ``||dlogits||_F / ||logits||_F``.
  This decides ``AdapterConfig.quant_magnitude``: QDoRA/QDuDe starting at
  ``m0 = ||W||_row`` (full) or at ``||deq(Q) + s B0 A0||_row`` (quantized).
- Bytes of a frozen 11008x4096 weight in 4 bits (codes, absmax, code book, row norms) against float32.
"""

from __future__ import annotations

import copy

import torch

import dude
from dude import decompose, frozen, quantize
from dude.config import LLAMA_LINEAR
from dude.data import gsm8k_fewshot, mmlu_dev

from . import builders, harness


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEAR}


def quantization_errors(ranks: list[int], iters: list[int], quant_type: str = "nf4", every: int = 3,
                        log=print) -> dict:
    """``{f"r={r} T={t}": {layer type: stats of the error ratio}}`` over the adapted layers of
    every ``every``-th decoder block (10 of SmolLM2's 30 at 3: the SVDs of all 210 layers
    ten times over take too long on a shared 2-core machine)."""
    weights = {n: w for n, w in _weights(builders.smollm2()).items() if int(n.split(".")[2]) % every == 0}
    qlora = {n: torch.linalg.norm(w - frozen.QuantizedWeight.quantize(w, quant_type).dense()).item()
             for n, w in weights.items()}
    out = {}
    for r in ranks:
        for t in iters:
            config = dude.AdapterConfig(method="dude", r=r, alpha=r, quantize=quant_type, quant_iters=t)
            ratios: dict[str, list[float]] = {}
            for name, w in weights.items():
                q, (b0, a0) = quantize.quantized_split(w, config, quantize.principal_factors(w, config), refine=True)
                err = torch.linalg.norm(w - q.dense() - config.scaling * b0 @ a0).item()
                ratios.setdefault(name.rsplit(".", 1)[-1], []).append(err / qlora[name])
            out[f"r={r} T={t}"] = {kind: harness.stats(v) for kind, v in ratios.items()}
            log(f"  r={r} T={t}: " + ", ".join(f"{k} {s['median']:.3f}" for k, s in out[f"r={r} T={t}"].items()))
    return out


def real_text_batch(tokenizer, seq: int = 128) -> torch.Tensor:
    """Real text, no padding: GSM8K exemplars and MMLU dev questions, tokenized, cut in rows."""
    texts = [f"Question: {e['question']}\nAnswer: {e['answer']}" for e in gsm8k_fewshot()]
    texts += [e["question"] + "\n" + "\n".join(e["choices"]) for e in mmlu_dev()[:: len(mmlu_dev()) // 24][:24]]
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    rows = len(ids) // seq
    return ids[: rows * seq].view(rows, seq)


# At init, QLoRA is QDoRA with m0 = ||deq(Q)|| (g = 1), and QPiSSA is QDuDe with
# m0 = ||deq(Q) + s B0 A0||: one split per (method, T) gives both magnitudes' models.
SPLITS = {  # name of the m0 = ||W|| model, name of the g = 1 model, AdapterConfig options
    "dora T=1": ("QDoRA, m0 = ||W||", "QLoRA = QDoRA with m0 = ||deq(Q)||", dict(method="dora")),
    "dude T=1": ("QDuDe T=1, m0 = ||W||", "QPiSSA T=1 = QDuDe T=1 with m0 = ||deq(Q)+sB0A0||", dict(method="dude")),
    "dude T=5": ("QDuDe T=5, m0 = ||W||", "QPiSSA T=5 = QDuDe T=5 with m0 = ||deq(Q)+sB0A0||",
                 dict(method="dude", quant_iters=5)),
}


def _divergence(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    logp = torch.log_softmax(logits.float(), -1)
    kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
    return {"kl": kl, "rel_logprob_error": (torch.linalg.norm(logp - reference) / torch.linalg.norm(reference)).item()}


@torch.no_grad()
def initial_logit_errors(r: int = 16, quant_type: str = "nf4", log=print) -> dict:
    """The initial model of each variant against the full-precision model, on real text:
    mean KL(p_full || p_4bit) per token and the relative error of the log-probabilities."""
    model, tokenizer = dude.load_model()
    ids = real_text_batch(tokenizer)
    reference = torch.log_softmax(model(ids).logits.float(), -1)  # (rows, seq, vocab)
    out = {"tokens": ids.numel()}
    for options in SPLITS.values():
        full_name, unit_name, kw = options
        config = dude.AdapterConfig(r=r, alpha=r, quantize=quant_type, quant_magnitude="full", **kw)
        adapted = dude.apply(copy.deepcopy(model), config)
        out[full_name] = _divergence(reference, adapted(ids).logits)
        for layer in dude.adapter_layers(adapted).values():
            layer.magnitude.copy_(layer.weight_row_norm())  # m0 = ||deq(Q) + s B0 A0||: g = 1
        out[unit_name] = _divergence(reference, adapted(ids).logits)
        for name in (full_name, unit_name):
            log(f"  {name}: KL {out[name]['kl']:.4f}, relative log-prob error {out[name]['rel_logprob_error']:.4f}")
        del adapted
    return out


def frozen_bytes(out_features: int = 11008, in_features: int = 4096, quant_type: str = "nf4") -> dict:
    """Bytes a frozen weight holds in 4 bits (everything the QuantizedWeight keeps) vs float32."""
    weight = torch.randn(out_features, in_features) / in_features**0.5
    q = frozen.QuantizedWeight.quantize(weight, quant_type)
    state = q.quant_state
    tensors = {"codes": q.packed, "absmax": state.absmax, "code_book": state.code, "row_sq_norm": q.row_sq_norm}
    parts = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total, dense = sum(parts.values()), weight.numel() * 4
    return {"shape": [out_features, in_features], "parts": parts, "bytes": total, "float32_bytes": dense,
            "ratio": total / dense, "row_norm_check": torch.allclose(q.row_sq_norm, decompose.row_sq_norm(q.dense()))}
