"""The fused forward/backward (dude.fused) against the slow reference formula, gradients included."""

import pytest
import torch
from torch import nn

from dude import AdapterConfig, AdapterLinear, decompose

METHODS = ["lora", "dora", "pissa", "dude"]


def _layer(method, *, bias=True, dtype=torch.float32, detach_norm=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(24, 20, bias=bias).to(dtype)
    config = AdapterConfig(method=method, r=4, alpha=8, dropout=dropout, detach_norm=detach_norm)
    layer = AdapterLinear.from_linear(linear, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from init, where every method is the identity
        for p in layer.adapter_params():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
    return layer


def _reference(layer, x, dropped):
    """reference_forward, plus the dropout term g * s * (drop(x) - x) A^T B^T it leaves out."""
    ref = decompose.reference_forward(
        x, layer.residual, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, layer.magnitude, layer.detach_norm
    )
    if dropped is x:
        return ref
    extra = layer.scaling * ((dropped - x).float() @ layer.lora_A.T) @ layer.lora_B.T
    if layer.magnitude is not None:
        norm = decompose.row_norm_dense(layer.residual.float() + layer.scaling * layer.lora_B @ layer.lora_A)
        extra = extra * (layer.magnitude / (norm.detach() if layer.detach_norm else norm))
    return ref + extra


def _grads(layer, x, y):
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device)
    params = layer.adapter_params() + [x]
    return torch.autograd.grad((y.float() * weight).sum(), params)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_reference_with_gradients(method, dtype, detach_norm, dropout, bias):
    layer = _layer(method, bias=bias, dtype=dtype, detach_norm=detach_norm, dropout=dropout).train()
    assert layer.fast_path
    x = torch.randn(3, 5, 24).to(dtype).requires_grad_()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)  # the same dropout mask again
    dropped = layer.dropout(x)
    assert (dropout > 0) == (not torch.equal(dropped, x))
    ref = _reference(layer, x, dropped)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert y.dtype == dtype and y.shape == (3, 5, 20)
    torch.testing.assert_close(y.float(), ref, **tol)
    for got, want in zip(_grads(layer, x, y), _grads(layer, x, ref)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol)


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_plain_autograd_in_fp32(method):
    layer = _layer(method, dropout=0.0)
    x = torch.randn(2, 7, 24, requires_grad=True)
    fast = layer(x)
    layer.fast_path = False
    slow = layer(x)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grads(layer, x, fast), _grads(layer, x, slow)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_norm_from_extra_rows_equals_the_separate_norm(fast_path, dropout, monkeypatch):
    """Training in float32 with a detached norm, ``W_res A^T`` comes as r extra rows of the
    base matmul (``[x; A] W_res^T``, dude.norm_rows) on both paths: the same output and
    gradients, x's included, as the norm from its own product, also where g = 0."""
    layer = _layer("dude", dropout=dropout).train()
    layer.fast_path = fast_path
    with torch.no_grad():
        layer.magnitude[3] = 0.0
    x = torch.randn(3, 5, 24)
    assert layer._norm_from_rows(x)
    results = []
    for rows in (True, False):
        monkeypatch.setattr(AdapterLinear, "_norm_from_rows", lambda self, x, rows=rows: rows)
        torch.manual_seed(1)  # the same dropout mask
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        results.append((y, *_grads(layer, xi, y)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    layer.eval()
    assert not layer._norm_from_rows(x)  # eager eval: the cached norm instead
    assert not _layer("dude", dtype=torch.bfloat16).train()._norm_from_rows(x.bfloat16())  # A inexact in bf16
    assert not _layer("dude", detach_norm=False).train()._norm_from_rows(x)  # the norm's own gradient


def test_zero_magnitude_rows_keep_an_exact_gradient():
    layer = _layer("dude", bias=False)
    with torch.no_grad():
        layer.magnitude[3] = 0.0  # g = 0 on row 3: z / g is undefined there
    x = torch.randn(6, 24, requires_grad=True)
    fast = _grads(layer, x, layer(x))
    ref = _grads(layer, x, _reference(layer, x, x))
    for a, b in zip(fast, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _saved_bytes(layer, x):
    """Bytes autograd keeps for backward, not counting parameters, the input or the output."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    shared = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    shared |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    return sum(t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr() not in shared)


def test_dude_saves_what_lora_saves_plus_the_output():
    x = torch.randn(64, 24, requires_grad=True)
    lora, dude_ = _layer("lora", bias=False), _layer("dude", bias=False)
    # LoRA: h (64, r). DuDe: the same plus g and the norm (out,); its output is saved by
    # reference, not copied.
    assert _saved_bytes(lora, x) == 64 * 4 * 4
    assert _saved_bytes(dude_, x) <= _saved_bytes(lora, x) + 2 * 20 * 4
    dude_.fast_path = False
    assert _saved_bytes(dude_, x) >= 64 * 20 * 4  # plain autograd keeps a pre-scale output copy


def test_eval_forward_under_no_grad_matches():
    layer = _layer("dude").eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, _reference(layer, x, x), atol=1e-5, rtol=1e-5)
