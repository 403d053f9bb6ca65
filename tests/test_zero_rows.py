"""Weight rows of zeros (pruned models, unused MoE experts) under DoRA and DuDe.

``g = m / ||W'||`` is 0/0 there. dude defines ``g = 0`` on zero-norm rows
(``decompose.magnitude_scale``): the row computes 0, what the base computes, its
gradients are 0, and it stays zero through training, saving, loading and merging.
PEFT's DoRA returns NaN on such rows (peft#2049); the test pins that down so the
documented difference is checked, not assumed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from tiny_models import token_batch, tiny_llama

import dude
from dude import decompose

ROWS = [3, 17, 40]


def _pruned(seed: int = 0):
    model = tiny_llama(seed)
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.up_proj.weight[ROWS] = 0.0
            block.self_attn.q_proj.weight[ROWS[:2]] = 0.0
        model.model.layers[1].mlp.gate_proj.weight.zero_()  # a whole matrix of zeros (rank 0)
    return model


def test_magnitude_scale_is_zero_on_zero_rows_with_finite_gradients():
    magnitude = torch.tensor([2.0, 0.0, 3.0], requires_grad=True)
    norm = torch.tensor([4.0, 0.0, 0.0], requires_grad=True)
    g = decompose.magnitude_scale(magnitude, norm)
    assert g.tolist() == [0.5, 0.0, 0.0]
    g.sum().backward()
    assert magnitude.grad.tolist() == [0.25, 0.0, 0.0] and norm.grad.tolist() == [-0.125, 0.0, 0.0]
    weight = torch.randn(4, 6)
    weight[1] = 0
    a, b = torch.randn(2, 6, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
    norm = decompose.row_norm_factored(weight @ a.T, decompose.row_sq_norm(weight), a, b, 0.5)
    assert norm[1] == 0 and torch.allclose(norm, decompose.row_norm_dense(weight))
    norm.sum().backward()  # the slope of sqrt at 0 must not reach A and B as NaN
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    with torch.no_grad():  # a NaN is never mistaken for a zero row
        b[2, 0] = float("nan")
        norm = decompose.row_norm_factored(weight @ a.T, decompose.row_sq_norm(weight), a, b, 0.5)
    assert torch.isnan(norm[2]) and torch.isnan(decompose.magnitude_scale(torch.ones(4), norm)[2])


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "full-grad"])
@pytest.mark.parametrize("method", ["dora", "dude"])
def test_zero_rows_through_apply_training_save_load_and_merge(tmp_path, method, detach_norm):
    ids = token_batch()
    base_logits = _pruned()(ids).logits.detach()
    config = dude.AdapterConfig(method=method, r=4, alpha=8, target_modules=dude.config.LLAMA_LINEAR,
                                detach_norm=detach_norm)
    model = dude.apply(_pruned(), config)
    start = model(ids).logits.detach()
    assert torch.isfinite(start).all()
    torch.testing.assert_close(start, base_logits, atol=1e-5, rtol=1e-5)  # apply: still the base model

    model.train()
    optimizer = torch.optim.AdamW(dude.adapter_parameters(model), lr=1e-2)
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in dude.adapter_parameters(model))
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = model(ids).logits.detach()
    assert torch.isfinite(trained).all() and not torch.allclose(trained, base_logits, atol=1e-3)
    up = model.model.layers[0].mlp.up_proj
    assert (up.magnitude[ROWS] == 0).all() and (up.lora_B[ROWS] == 0).all()  # a zero row stays zero
    assert (up.merged_weight()[ROWS] == 0).all()

    with pytest.warns(UserWarning, match=r"zero norm .* PEFT's DoRA gives NaN there \(peft#2049\)"):
        dude.save(model, tmp_path)
    reloaded = dude.load(_pruned(), tmp_path).eval()  # eval as ``trained``: training forms g's W_res A^T with x
    assert torch.equal(reloaded(ids).logits, trained)

    merged = dude.merge(reloaded)
    torch.testing.assert_close(merged(ids).logits, trained, atol=1e-5, rtol=1e-5)
    assert (merged.model.layers[0].mlp.up_proj.weight[ROWS] == 0).all()

    # PEFT reads the same file: equal on every other row, NaN on the zero rows (peft#2049)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(_pruned(), tmp_path).eval()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    ours = up(x).detach()
    theirs = peft.base_model.model.model.layers[0].mlp.up_proj(x).detach()
    others = [i for i in range(ours.shape[1]) if i not in ROWS]
    torch.testing.assert_close(theirs[:, others], ours[:, others], atol=1e-5, rtol=1e-5)
    assert torch.isnan(theirs[:, ROWS]).all() and (ours[:, ROWS] == 0).all()


@pytest.mark.parametrize("method", ["dora", "dude"])
def test_zero_rows_of_a_4bit_frozen_part_train_finite(method):
    model = dude.apply(_pruned(), dude.AdapterConfig(method=method, r=4, alpha=8, quantize="nf4"))
    up = model.model.layers[0].mlp.up_proj
    assert (up.weight_row_norm()[ROWS] == 0).all() and (up.magnitude_scale()[ROWS] == 0).all()
    model.train()
    optimizer = torch.optim.AdamW(dude.adapter_parameters(model), lr=1e-2)
    ids = token_batch()
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in dude.adapter_parameters(model))
    assert (up.magnitude[ROWS] == 0).all() and (up.lora_B[ROWS] == 0).all()
