"""dude's four methods against PEFT's LoRA, DoRA, PiSSA and DoRA+PiSSA, on a tiny Llama.

Singular vectors are defined up to sign, so products and outputs are compared, never factors.
The real-model version of these checks lives in test_smollm2.py.
"""

import pytest
import torch

import dude
from peft_oracle import assert_same_start, peft_model, sgd_steps
from tiny_models import tiny_llama, token_batch

TARGETS = dude.config.LLAMA_LINEAR


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_same_start_and_same_steps_as_peft(method, use_rslora):
    ids = token_batch(batch=4, length=16)
    ours = dude.apply(tiny_llama(), dude.AdapterConfig(method=method, r=4, alpha=8, use_rslora=use_rslora))
    peft = peft_model(tiny_llama(), method, r=4, alpha=8, targets=TARGETS, use_rslora=use_rslora)
    assert_same_start(ours, peft, atol=1e-6)
    start = ours(ids).logits.detach()
    sgd_steps(ours, dude.adapter_parameters(ours), ids)
    sgd_steps(peft, [p for p in peft.parameters() if p.requires_grad], ids)
    ours_logits, peft_logits = ours(ids).logits.detach(), peft(ids).logits.detach()
    assert not torch.allclose(ours_logits, start, atol=1e-3)  # the steps moved the model
    rel = (ours_logits - peft_logits).abs().max() / peft_logits.abs().max()
    assert rel <= 1e-4, f"{method}: relative logit difference {rel:.2e} after 3 SGD steps"
