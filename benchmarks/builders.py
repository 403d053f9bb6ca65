"""Build the eight adapted models the benchmarks compare, on SmolLM2 or on one 7B-shaped layer.

Names: ``dude-lora``, ``dude-dora``, ``dude-pissa``, ``dude-dude`` (this library) and
``peft-lora``, ``peft-dora``, ``peft-pissa``, ``peft-dora+pissa`` (PEFT, the baseline;
DuDe's equivalent there is ``LoraConfig(use_dora=True, init_lora_weights="pissa")``).
All at the same rank, alpha, targets and dropout. PEFT's PiSSA uses its randomized SVD
(``pissa_niter_4``) and ours ``svd="randomized"`` for speed: the time of a training step
does not depend on the init. A ``:autograd`` suffix on a dude name selects the layer's
plain-autograd forward instead of the fused one, to show what the fused path buys.

On a 4-bit base (NF4, issue 9): ``dude-qlora``, ``dude-qdora``, ``dude-qpissa``,
``dude-qdude`` (``AdapterConfig(quantize="nf4")`` on the full-precision model) and
``peft-qlora``, ``peft-qdora`` (PEFT on the model transformers loads with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``: the same codes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import dude
from dude.config import LLAMA_LINEAR

DUDE = ["dude-lora", "dude-dora", "dude-pissa", "dude-dude"]
PEFT = ["peft-lora", "peft-dora", "peft-pissa", "peft-dora+pissa"]
ALL = DUDE + PEFT
BASE = "base"


def _shell(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``.

    Saves memory when one process holds many variants. Only safe for methods that leave
    the base weights untouched (LoRA, DoRA); PiSSA rewrites them and gets a deep copy.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def adapt(model: nn.Module, name: str, *, r: int, alpha: float, targets: list[str], dropout: float = 0.0,
          share: bool = True) -> nn.Module:
    """Return a new model: ``model`` (left untouched) with the adapter ``name`` applied."""
    if name == BASE:
        return model
    name, _, variant = name.partition(":")  # "dude-dude:autograd": the plain-autograd forward; ":ckpt": gradient checkpointing
    svd_init = name.endswith("pissa") or name in ("dude-dude", "dude-qdude")
    if name.startswith("peft-q"):
        fresh = smollm2_4bit()
    else:
        fresh = copy.deepcopy(model) if (svd_init or not share) else _shell(model)
    if name.startswith("dude-"):
        method = name.split("-", 1)[1]
        quantize = "nf4" if method.startswith("q") else None
        config = dude.AdapterConfig(method=method.removeprefix("q"), r=r, alpha=alpha, target_modules=targets,
                                    dropout=dropout, svd="randomized", quantize=quantize)
        dude.apply(fresh, config)
        if variant == "autograd":
            for layer in dude.adapter_layers(fresh).values():
                layer.fast_path = False
        if variant == "ckpt":  # "dude-dude:ckpt": activations recomputed block by block in backward
            fresh.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return fresh
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_dora="dora" in name,
        init_lora_weights="pissa_niter_4" if svd_init else True,
    )
    return get_peft_model(fresh, config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# -- the two workloads -----------------------------------------------------------------


def smollm2(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The real SmolLM2-135M-Instruct (cached safetensors), in train mode."""
    model, _ = dude.load_model(dtype=dtype)
    return model


# SmolLM2-135M-Instruct's architecture (its config.json): a step's time depends on these
# shapes, not on the weights' values.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def smollm2_shaped(seed: int = 0) -> nn.Module:
    """SmolLM2-135M's architecture with random weights: for timing on a machine that the
    model's package cannot reach (a lent GPU machine takes 64 MiB of files; the model is 94)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))


def smollm2_4bit() -> nn.Module:
    """SmolLM2 as transformers loads it in NF4 (bitsandbytes ``Linear4bit``, float32 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dude.hub import default_model_dir

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(default_model_dir(), quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)


def smollm2_batch(model: nn.Module, batch: int, seq: int, seed: int = 0, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


class OneLayer(nn.Module):
    """One linear layer of a 7B model's shape, as a model: ``loss = mean(layer(x)^2)``."""

    def __init__(self, out_features: int, in_features: int, seed: int = 0, dtype=torch.float32, device="cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)
        with torch.no_grad():  # random weights at the scale of a trained layer
            self.proj.weight.copy_(torch.randn(out_features, in_features, generator=g) / in_features**0.5)
        self.proj.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, labels=None):
        y = self.proj(x)
        return _Out(y.float().square().mean(), y)


class _Out:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


def layer_batch(model: OneLayer, tokens: int, seed: int = 0, device: str = "cpu", input_grad: bool = False) -> dict:
    """Random activations for the base ``OneLayer`` (build the batch before adapting).

    ``input_grad``: ``x`` requires a gradient, so the backward also forms ``dx = dz W_res``,
    as every adapted layer of a model does but the first block's q, k, v (their input is
    the frozen embedding's output). ``train.make_step`` clears ``x.grad`` after each step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, model.proj.in_features, generator=g)
    return {"x": x.to(device=device, dtype=model.proj.weight.dtype).requires_grad_(input_grad)}


def workload(spec: dict, device: str = "cpu"):
    """``(base_model, batch, targets)`` for a spec: ``{"kind": "smollm2", "batch", "seq"}``
    (``"random": True``: its shape with random weights) or ``{"kind": "layer", "out", "in", "tokens"}``
    (``"input_grad": True``: the backward forms ``dx`` too, as in a model)."""
    if spec["kind"] == "smollm2":
        model = (smollm2_shaped() if spec.get("random") else smollm2()).to(device)
        return model, smollm2_batch(model, spec["batch"], spec["seq"], device=device), list(LLAMA_LINEAR)
    model = OneLayer(spec["out"], spec["in"], device=device)
    batch = layer_batch(model, spec["tokens"], device=device, input_grad=spec.get("input_grad", False))
    return model, batch, ["proj"]
