"""dude's four methods against PEFT's LoRA, DoRA, PiSSA and DoRA+PiSSA, on a tiny Llama.

Singular vectors are defined up to sign, so products and outputs are compared, never factors.
The real-model version of these checks lives in test_smollm2.py.
"""

import copy

import pytest
import torch

import dude
from peft_oracle import assert_same_start, copy_adapters_to_peft, peft_model, sgd_steps
from tiny_models import move_adapters, tiny_llama, token_batch

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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_autocast_is_as_close_to_float32_as_peft(seed):
    """Under bf16 autocast (``dude train``'s default on a GPU) a moved DoRA model's logits are
    as far from its float32 logits as PEFT's are from the same float32 logits, within 15%
    (0.91-1.04x over 5 seeds). Before the norm ran in float32 and ``g`` multiplied once
    into the output (layer.py, scaled_sum.py), it was 1.25-1.55x."""
    base = tiny_llama(seed=seed)
    ours = dude.apply(copy.deepcopy(base), dude.AdapterConfig(method="dora", r=4, alpha=8, target_modules=list(TARGETS)))
    move_adapters(ours, seed=seed + 1, scale=0.2)
    peft = peft_model(copy.deepcopy(base), "dora", 4, 8, list(TARGETS))
    copy_adapters_to_peft(ours, peft)
    ids = token_batch(seed=seed)
    with torch.no_grad():
        want = ours.eval()(input_ids=ids).logits
        torch.testing.assert_close(peft.eval()(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            errors = [torch.linalg.vector_norm(m(input_ids=ids).logits.float() - want) for m in (ours, peft)]
    assert errors[0] <= 1.15 * errors[1], [e.item() for e in errors]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_bf16_model_computes_what_peft_computes(seed):
    """A bf16 model (no autocast) with its float32 adapter, eager fused path: a moved DoRA's
    logits are PEFT's, in eval and in training (same loss), where the bf16 rounding itself
    moves them by about 1% (``want``: float32). Before ``g (base + s h B^T)`` was formed in
    float32 and rounded once, as PEFT does, ours differed from PEFT's by 1.1-1.7x that."""
    base = tiny_llama(seed=seed)
    config = dude.AdapterConfig(method="dora", r=4, alpha=8, target_modules=list(TARGETS))
    moved = dude.apply(copy.deepcopy(base), config)
    move_adapters(moved, seed=seed + 1, scale=0.2)
    ours = dude.apply(copy.deepcopy(base).to(torch.bfloat16), config)
    peft = peft_model(copy.deepcopy(base).to(torch.bfloat16), "dora", 4, 8, list(TARGETS))
    copy_adapters_to_peft(moved, peft)
    with torch.no_grad():
        for mine, theirs, value in zip(dude.adapter_parameters(ours), (p for p in peft.parameters() if p.requires_grad),
                                       dude.adapter_parameters(moved)):
            assert mine.dtype == theirs.dtype == torch.float32  # float32 adapters on a bf16 model
            mine.copy_(value)
    ids = token_batch(seed=seed)
    with torch.no_grad():
        want = moved.eval()(input_ids=ids).logits
        got, peft_logits = (m.eval()(input_ids=ids).logits.float() for m in (ours, peft))
    rounding = torch.linalg.vector_norm(peft_logits - want)
    assert rounding > 1e-3 * torch.linalg.vector_norm(want)  # bf16 did move the logits
    assert torch.linalg.vector_norm(got - peft_logits) <= 0.05 * rounding
    losses = [m.train()(input_ids=ids, labels=ids).loss.item() for m in (ours, peft)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
