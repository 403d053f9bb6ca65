"""dude's four methods against PEFT's LoRA, DoRA, PiSSA and DoRA+PiSSA, on a tiny Llama.

Singular vectors are defined up to sign, so products and outputs are compared, never factors.
The real-model version of these checks lives in test_smollm2.py.
"""

import pytest
import torch

import dude
from peft_oracle import copy_kaiming_a_from_peft, peft_layer_tensors, peft_model, sgd_steps
from tiny_models import tiny_llama, token_batch

TARGETS = dude.config.LLAMA_LINEAR


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_same_start_and_same_steps_as_peft(method, use_rslora):
    ids = token_batch(batch=4, length=16)
    ours = dude.apply(tiny_llama(), dude.AdapterConfig(method=method, r=4, alpha=8, use_rslora=use_rslora))
    peft = peft_model(tiny_llama(), method, r=4, alpha=8, targets=TARGETS, use_rslora=use_rslora)
    if method in ("lora", "dora"):
        copy_kaiming_a_from_peft(ours, peft)
    for name, layer in dude.adapter_layers(ours).items():
        ref = peft_layer_tensors(peft, name)
        torch.testing.assert_close(layer.residual, ref["residual"], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, ref["B"] @ ref["A"], atol=1e-5, rtol=1e-5)
        if layer.magnitude is not None:
            torch.testing.assert_close(layer.magnitude, ref["m"], atol=1e-6, rtol=1e-6)
    start = ours(ids).logits.detach()
    sgd_steps(ours, dude.adapter_parameters(ours), ids)
    sgd_steps(peft, [p for p in peft.parameters() if p.requires_grad], ids)
    ours_logits, peft_logits = ours(ids).logits.detach(), peft(ids).logits.detach()
    assert not torch.allclose(ours_logits, start, atol=1e-3)  # the steps moved the model
    rel = (ours_logits - peft_logits).abs().max() / peft_logits.abs().max()
    assert rel <= 1e-4, f"{method}: relative logit difference {rel:.2e} after 3 SGD steps"
