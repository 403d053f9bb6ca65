"""AdapterLinear on tiny seeded layers: identity at init, the formula, merge, dtypes, refusals."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dude import AdapterConfig, AdapterLinear, decompose

METHODS = ["lora", "dora", "pissa", "dude"]


def _linear(out=12, inp=8, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias).to(dtype)


def _moved(layer: AdapterLinear, seed=1, scale=0.1) -> AdapterLinear:
    """Move every trainable tensor away from its init (at init every method is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_params():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return layer


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [True, False])
def test_identity_at_init_then_formula_after_moving(method, bias):
    linear = _linear(bias=bias)
    layer = AdapterLinear.from_linear(linear, AdapterConfig(method=method, r=3, alpha=6))
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-6, rtol=0)
    _moved(layer)
    moved = layer(x)
    assert not torch.allclose(moved, linear(x), atol=1e-3)
    ref = decompose.reference_forward(
        x, layer.residual, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, layer.magnitude
    )
    torch.testing.assert_close(moved, ref, atol=1e-6, rtol=1e-5)


def test_trainable_tensors_by_method():
    linear = _linear()
    shapes = {}
    for method in METHODS:
        layer = AdapterLinear.from_linear(linear, AdapterConfig(method=method, r=3))
        shapes[method] = [tuple(p.shape) for p in layer.adapter_params()]
        assert all(p.requires_grad for p in layer.adapter_params())
        assert not layer.residual.requires_grad and not layer.bias.requires_grad
    assert shapes["lora"] == shapes["pissa"] == [(3, 8), (12, 3)]
    assert shapes["dora"] == shapes["dude"] == [(3, 8), (12, 3), (12,)]


def test_lora_shares_the_base_weight_and_pissa_holds_the_residual():
    linear = _linear()
    lora = AdapterLinear.from_linear(linear, AdapterConfig(method="lora", r=3))
    assert lora.residual.data_ptr() == linear.weight.data_ptr()  # no copy of the base weight
    assert torch.count_nonzero(lora.lora_B) == 0
    pissa = AdapterLinear.from_linear(linear, AdapterConfig(method="pissa", r=3, alpha=3))
    principal = pissa.scaling * pissa.lora_B0 @ pissa.lora_A0
    assert not torch.allclose(pissa.residual, linear.weight, atol=1e-3)
    torch.testing.assert_close(pissa.residual + principal, linear.weight, atol=1e-6, rtol=0)


def test_magnitude_starts_at_the_row_norm_of_the_weight():
    linear = _linear()
    layer = AdapterLinear.from_linear(linear, AdapterConfig(method="dude", r=3))
    torch.testing.assert_close(layer.magnitude, decompose.row_norm_dense(linear.weight), rtol=1e-6, atol=0)
    assert torch.equal(layer.magnitude_scale(), torch.ones(12))  # same formula as the forward: exactly 1


def test_norm_cache_follows_parameter_updates():
    layer = AdapterLinear.from_linear(_linear(), AdapterConfig(method="dora", r=3)).eval()
    before = layer.magnitude_scale().clone()
    with torch.no_grad():
        layer.lora_B.add_(0.5)  # an in-place update, as an optimizer step
    after = layer.magnitude_scale()
    assert not torch.allclose(before, after)
    dense = layer.residual + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(after, layer.magnitude / decompose.row_norm_dense(dense))


def test_norm_is_fresh_after_fused_adamw_steps():
    """torch's fused AdamW (HF Trainer's default) does not bump version counters."""
    layer = AdapterLinear.from_linear(_linear(), AdapterConfig(method="dude", r=3)).eval()
    x = torch.randn(5, 8)
    layer(x)  # fills the eval cache
    optimizer = torch.optim.AdamW(layer.adapter_params(), lr=0.1, fused=True)
    layer.train()
    for _ in range(2):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        dense = layer.residual + layer.scaling * layer.lora_B @ layer.lora_A
        expected = layer.magnitude / decompose.row_norm_dense(dense)
        torch.testing.assert_close(layer.magnitude_scale(), expected)
    layer.eval()
    torch.testing.assert_close(layer.magnitude_scale(), expected)
    ref = decompose.reference_forward(x, layer.residual, layer.bias, layer.lora_A, layer.lora_B,
                                      layer.scaling, layer.magnitude)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_merge_gives_a_plain_linear_with_the_same_output(method):
    linear = _linear()
    layer = _moved(AdapterLinear.from_linear(linear, AdapterConfig(method=method, r=3, alpha=5)))
    x = torch.randn(4, 8)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and not plain.weight.requires_grad
    assert not torch.allclose(plain(x), linear(x), atol=1e-3)
    torch.testing.assert_close(plain(x), layer(x), atol=1e-6, rtol=1e-5)


def test_conv1d_layout_gpt2():
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=out, nx=in; weight (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = AdapterLinear.from_linear(conv, AdapterConfig(method="dude", r=3))
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=0)
    _moved(layer)
    merged = layer.to_linear()
    assert type(merged) is Conv1D and merged.weight.shape == (8, 12)
    assert not torch.allclose(merged(x), conv(x), atol=1e-3)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["dora", "dude"])
def test_half_precision_base(dtype, method):
    linear = _linear(dtype=dtype)
    layer = AdapterLinear.from_linear(linear, AdapterConfig(method=method, r=3))
    assert layer.residual.dtype == dtype
    assert all(p.dtype == torch.float32 for p in layer.adapter_params())  # as PEFT's autocast_adapter_dtype
    x = torch.randn(4, 8).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), linear(x).float(), atol=2e-2, rtol=2e-2)
    # the SVD ran in float32: the principal part reproduces the float32 weight closely
    if method == "dude":
        w = linear.weight.float()
        principal = layer.scaling * layer.lora_B0 @ layer.lora_A0
        ref = decompose.top_singular(w, 3)
        torch.testing.assert_close(principal, ref[0] * ref[1] @ ref[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_the_norm_is_float32_under_autocast(dtype, detach_norm):
    """bf16 autocast (dude train's default on a GPU) takes the activations' matmuls, not the
    norm's: ``g`` is exactly 1 at init under it, and a moved layer's norm is the float32 one,
    bit for bit (before, its matmuls ran in bf16 and ``g`` was off by up to 0.5%)."""
    config = AdapterConfig(method="dude", r=8, alpha=16, detach_norm=detach_norm)
    layer = AdapterLinear.from_linear(_linear(out=64, inp=48, dtype=dtype), config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        at_init = layer.magnitude_scale()
    assert torch.equal(at_init, torch.ones_like(at_init))
    _moved(layer)
    want = layer.weight_row_norm()
    want_merged = layer.merged_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_merged = layer.weight_row_norm(), layer.merged_weight()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got_merged.dtype == torch.float32 and torch.equal(got_merged, want_merged)


@pytest.mark.parametrize("setting", ["fp32 model, bf16 autocast", "bf16 model"])
def test_the_magnitude_scales_a_bf16_output_in_float32(setting):
    """``g`` multiplies in float32 and the product is rounded once, as PEFT's DoRA does. On
    average a bf16 output then moves by ``g`` within 0.1% for ``g`` 1-2% above 1. Rounded to
    bf16 first, ``g`` would move in steps of 2^-7 near 1: off by 0.24-0.32% here, a quarter of
    the change the magnitude made."""
    dtype = torch.bfloat16 if setting == "bf16 model" else torch.float32
    layer = AdapterLinear.from_linear(_linear(out=64, inp=48, bias=False, dtype=dtype),
                                      AdapterConfig(method="dude", r=8, alpha=16))
    x = torch.randn(512, 48).to(dtype)
    outputs = {}
    for g in (1.0, 1.01, 1.013, 1.02):
        with torch.no_grad():
            layer.magnitude.copy_(layer.weight_row_norm() * g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            outputs[g] = layer(x).detach()
    unscaled = outputs.pop(1.0)
    assert unscaled.dtype == torch.bfloat16
    kept = unscaled.abs() > 1e-2
    for g, out in outputs.items():
        moved = (out.float() / unscaled.float())[kept].mean().item()
        assert abs(moved - g) < 1e-3, (g, moved)


@pytest.mark.parametrize("method", ["lora", "dude"])
def test_a_bf16_model_rounds_once_and_keeps_its_adapter_gradients_in_float32(method):
    """A bf16 model with its float32 adapter (the eager fused path, no autocast): the output
    ``g (x W_res^T + s h B^T)`` is formed in float32 from the bf16 base output and rounded
    once, so it lies within half a bf16 ulp of the exact value, as PEFT's does; and ``dL/dA``,
    ``dL/dB`` take ``g dz`` in float32. Rounding the update, the sum and the product each
    put outputs up to 1.5 ulp off, and rounding ``g dz`` to bf16 put the gradients ~1e-3 off:
    a bf16 DuDe model's logits were 1.1-1.3x as far from float32 as PEFT's."""
    layer = _moved(AdapterLinear.from_linear(_linear(out=64, inp=48, bias=False, dtype=torch.bfloat16),
                                             AdapterConfig(method=method, r=8, alpha=16)), scale=0.3)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(512, 48).to(torch.bfloat16)
    dz = torch.randn(512, 64).to(torch.bfloat16)
    out = layer(x)
    out.backward(dz)
    f64 = torch.float64
    g = torch.ones(64, dtype=f64) if layer.magnitude is None else layer.magnitude_scale().detach().to(f64)
    base = nn.functional.linear(x, layer.residual).to(f64)  # the bf16 base output, as the layer's matmul gives it
    hidden = x.to(f64) @ layer.lora_A.detach().to(f64).T  # (N, r)
    update = layer.scaling * hidden @ layer.lora_B.detach().to(f64).T
    exact = g * (base + update)
    half_ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 9)
    magnitudes = x.to(f64).abs() @ layer.lora_A.detach().to(f64).abs().T @ layer.lora_B.detach().to(f64).abs().T
    float32_error = 1e-6 * g.abs() * (base.abs() + layer.scaling * magnitudes)  # where terms cancel
    assert ((out.detach().to(f64) - exact).abs() <= half_ulp + float32_error).all()
    d_pre = dz.to(f64) * g  # dL/d(pre-scale output)
    grad_b = layer.scaling * d_pre.T @ hidden
    grad_a = layer.scaling * (d_pre @ layer.lora_B.detach().to(f64)).T @ x.to(f64)
    for got, want in ((layer.lora_B.grad, grad_b), (layer.lora_A.grad, grad_a)):
        assert torch.linalg.vector_norm(got.to(f64) - want) <= 1e-5 * torch.linalg.vector_norm(want)


def test_dropout_only_on_the_adapter_branch():
    linear = _linear()
    layer = AdapterLinear.from_linear(linear, AdapterConfig(method="lora", r=3, dropout=0.5)).train()
    x = torch.randn(6, 8)
    torch.testing.assert_close(layer(x), linear(x))  # B = 0: dropout on the input alone changes nothing
    _moved(layer)
    torch.manual_seed(0)
    dropped = layer(x)
    layer.eval()
    undropped = layer(x)
    assert not torch.allclose(dropped, undropped)
    # the base path saw the undropped input: the difference lies in the r=3 columns of B
    assert torch.linalg.matrix_rank((dropped - undropped).double(), atol=1e-5) == 3
    torch.testing.assert_close(layer(x), decompose.reference_forward(
        x, layer.residual, layer.bias, layer.lora_A, layer.lora_B, layer.scaling))


def test_gradients_flow_to_adapter_only_and_norm_detach_switch():
    x = torch.randn(5, 8)
    grads = {}
    for detach in (True, False):
        layer = _moved(AdapterLinear.from_linear(_linear(), AdapterConfig(method="dude", r=3, detach_norm=detach)))
        layer(x).square().sum().backward()
        assert layer.residual.grad is None
        grads[detach] = layer.lora_A.grad.clone()
        assert layer.magnitude.grad is not None
    assert not torch.allclose(grads[True], grads[False])  # the switch changes the gradient


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"r=9 exceeds min\(out, in\) = 8"):
        AdapterLinear.from_linear(_linear(), AdapterConfig(r=9))
    meta = nn.Linear(8, 12, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        AdapterLinear.from_linear(meta, AdapterConfig(r=2))
    broken = _linear()
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        AdapterLinear.from_linear(broken, AdapterConfig(r=2))
    with torch.no_grad():
        broken.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        AdapterLinear.from_linear(broken, AdapterConfig(r=2))
    integer = nn.Linear(8, 12)
    integer.weight = nn.Parameter(torch.ones(12, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="not a float"):
        AdapterLinear.from_linear(integer, AdapterConfig(r=2))


def test_config_refusals_name_the_option():
    with pytest.raises(ValueError, match="method must be one of"):
        AdapterConfig(method="vera")
    with pytest.raises(ValueError, match="AdapterConfig.r"):
        AdapterConfig(r=0)
    with pytest.raises(ValueError, match="AdapterConfig.dropout"):
        AdapterConfig(dropout=1.0)
    with pytest.raises(ValueError, match="AdapterConfig.svd"):
        AdapterConfig(svd="fast")
    with pytest.raises(ValueError, match="unknown AdapterConfig option"):
        AdapterConfig.from_dict({"rank": 4})
    assert AdapterConfig.from_dict(AdapterConfig(method="pissa", r=4).to_dict()) == AdapterConfig(method="pissa", r=4)
