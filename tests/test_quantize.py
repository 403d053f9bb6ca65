"""QLoRA, QDoRA, QPiSSA, QDuDe on tiny models: the layer against bitsandbytes' own
quantizer, exact save/load, merge, LoftQ alternation, and every refused input.

The PEFT oracles on SmolLM2 live in test_quantize_peft.py."""

import sys

import bitsandbytes.functional as bnbf
import pytest
import torch

import dude
from dude import decompose, frozen
from tiny_models import move_adapters, tiny_gpt2, tiny_llama, token_batch

Q = dict(quantize="nf4", r=4, alpha=8)


def _layer(method: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(96, 40, bias=True)
    config = dude.AdapterConfig(method=method, **{**Q, **kw})
    return linear, dude.AdapterLinear.from_linear(linear, config, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_frozen_part_is_bitsandbytes_quantization_of_the_residual(method, quant_type):
    linear, layer = _layer(method, quantize=quant_type)
    weight = linear.weight.detach()
    b0 = torch.zeros(40, 4) if layer.lora_B0 is None else layer.lora_B0
    a0 = torch.zeros(4, 96) if layer.lora_A0 is None else layer.lora_A0
    residual = decompose.residual_weight(weight, b0, a0, layer.scaling) if layer.lora_A0 is not None else weight
    packed, state = bnbf.quantize_4bit(residual, blocksize=64, quant_type=quant_type)  # the reference quantizer
    assert torch.equal(layer.residual.packed, packed)
    deq = bnbf.dequantize_4bit(packed, state)
    torch.testing.assert_close(frozen.dense(layer.residual), deq, atol=0, rtol=0)
    # no dense copy of the weight is kept: the layer holds 4-bit codes and (out, r)/(r, in) factors only
    big = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.numel() >= 40 * 96]
    assert big == [], big


@pytest.mark.parametrize("method", ["dora", "dude"])
def test_fused_forward_and_backward_equal_the_reference_on_deq_q(method):
    _, layer = _layer(method, quant_magnitude="quantized")
    move_adapters(torch.nn.Sequential(layer))  # at init B = 0 or B = B0: move off it
    deq = frozen.dense(layer.residual)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer.train()
    out = layer(x)
    ref = decompose.reference_forward(x_ref, deq, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, layer.magnitude)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.adapter_params()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *layer.adapter_params()])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    auto = layer.forward_autograd(x)
    torch.testing.assert_close(auto, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_norm_from_the_base_matmul_equals_the_separate_norm(dropout, monkeypatch):
    """Training a 4-bit layer, ``W_res A^T`` comes as r extra rows of the forward's 4-bit
    matmul: the same output and gradients as the norm by its own dequantized product, also
    with a zero magnitude row (its g = 0) and with dropout (the base matmul reads x)."""
    _, layer = _layer("dude", dropout=dropout)
    move_adapters(torch.nn.Sequential(layer))
    with torch.no_grad():
        layer.magnitude[3] = 0.0
    layer.train()
    assert layer._norm_from_rows(torch.zeros(1, 96))
    x = torch.randn(3, 5, 96)
    results = []
    for inside in (True, False):
        monkeypatch.setattr(type(layer), "_norm_from_rows", lambda self, x, inside=inside: inside)
        torch.manual_seed(1)  # the same dropout mask
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        results.append((out, *torch.autograd.grad(out.square().sum(), [xi, *layer.adapter_params()])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(results[0][0][..., 3].detach(), layer.bias[3].expand(3, 5))  # g = 0: only the bias
    layer.eval()
    assert not layer._norm_from_rows(torch.zeros(1, 96))


def test_magnitude_at_init_full_or_quantized():
    linear, full = _layer("dude", quant_magnitude="full")
    _, quantized = _layer("dude", quant_magnitude="quantized")
    torch.testing.assert_close(full.magnitude, decompose.row_norm_dense(linear.weight))
    dense = frozen.dense(quantized.residual) + quantized.scaling * quantized.lora_B0 @ quantized.lora_A0
    torch.testing.assert_close(quantized.magnitude, decompose.row_norm_dense(dense), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full.magnitude, quantized.magnitude, atol=1e-4)


def test_quant_iters_lower_the_quantization_error():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    weight = linear.weight.detach()
    errors = []
    for iters in (1, 5):
        config = dude.AdapterConfig(method="dude", r=8, alpha=8, quantize="nf4", quant_iters=iters)
        layer = dude.AdapterLinear.from_linear(linear, config)
        approx = frozen.dense(layer.residual) + layer.scaling * layer.lora_B0 @ layer.lora_A0
        errors.append(torch.linalg.norm(weight - approx).item())
    qlora = torch.linalg.norm(weight - frozen.dense(frozen.QuantizedWeight.quantize(weight, "nf4"))).item()
    assert errors[1] < errors[0] < qlora, (errors, qlora)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_save_load_rebuilds_the_quantized_model_bit_identically(method, tmp_path):
    config = dude.AdapterConfig(method=method, quant_iters=3, **Q)
    model = dude.apply(tiny_llama(), config)
    move_adapters(model)
    ids = token_batch()
    logits = model(ids).logits
    dude.save(model, tmp_path)
    loaded = dude.load(tiny_llama(), tmp_path)
    assert dude.patch.get_config(loaded).quantize == "nf4"
    for name, layer in dude.adapter_layers(loaded).items():
        assert torch.equal(layer.residual.packed, dude.adapter_layers(model)[name].residual.packed), name
    assert torch.equal(loaded(ids).logits, logits)
    # the same file on the full-precision base: W + s B'A', what PEFT computes on the stock model
    full = dude.load(tiny_llama(), tmp_path, full_precision=True)
    assert all(isinstance(layer.residual, torch.nn.Parameter) for layer in dude.adapter_layers(full).values())
    assert not torch.allclose(full(ids).logits, logits, atol=1e-4)  # 4 bits cost something


def test_merge_of_a_quantized_model_computes_what_it_computes():
    model = dude.apply(tiny_llama(), dude.AdapterConfig(method="dude", **Q))
    ids = token_batch()
    start = model(ids).logits
    move_adapters(model)
    moved = model(ids).logits
    assert not torch.allclose(moved, start, atol=1e-3)
    merged = dude.merge(model)
    assert not dude.adapter_layers(merged)
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(merged(ids).logits, moved, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_is_quantized_and_merges_back_to_conv1d():
    model = dude.apply(tiny_gpt2(), dude.AdapterConfig(method="dude", target_modules=["c_attn", "c_fc"], **Q))
    ids = token_batch()
    move_adapters(model)
    moved = model(ids).logits
    layer = dude.adapter_layers(model)["transformer.h.0.attn.c_attn"]
    assert isinstance(layer.residual, frozen.QuantizedWeight) and layer.fan_in_fan_out
    merged = dude.merge(model)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(merged(ids).logits, moved, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------- refused input


def test_unknown_quantization_type_names_the_option():
    with pytest.raises(ValueError, match=r"AdapterConfig.quantize must be one of \('nf4', 'fp4'\).*'int4'"):
        dude.AdapterConfig(quantize="int4")
    with pytest.raises(ValueError, match="AdapterConfig.quant_iters"):
        dude.AdapterConfig(quantize="nf4", quant_iters=0)
    with pytest.raises(ValueError, match="AdapterConfig.quant_magnitude"):
        dude.AdapterConfig(quantize="nf4", quant_magnitude="mean")


def test_missing_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r"AdapterConfig.quantize needs bitsandbytes \(pip install bitsandbytes\)"):
        dude.apply(tiny_llama(), dude.AdapterConfig(method="lora", **Q))


def test_a_layer_bitsandbytes_cannot_quantize_is_named():
    model = tiny_llama().to(torch.float64)
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj: bitsandbytes cannot quantize a "
                                        r"torch.float64 weight.*exclude_modules"):
        dude.apply(model, dude.AdapterConfig(method="dora", **Q))


def test_half_precision_base_says_its_compute_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"quantize='nf4' on a torch.bfloat16 base: deq\(Q\) and the base matmuls "
                                         r"run in torch.bfloat16 \(the compute dtype"):
        dude.apply(model, dude.AdapterConfig(method="dude", **Q))
    layer = dude.adapter_layers(model)["model.layers.0.mlp.up_proj"]
    assert layer.residual.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert model(token_batch()).logits.dtype == torch.bfloat16


def test_export_full_precision_merges_a_4bit_adapter_onto_the_full_weights(tmp_path, smollm2_dir):
    """``dude export --full-precision``: the merged folder computes what the saved adapter
    computes on the full-precision base (``dude.load(..., full_precision=True)``); plain
    ``dude export`` what the 4-bit model computes (``deq(Q)``-based)."""
    from transformers import AutoModelForCausalLM

    from dude.cli import main
    from test_train import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model", smollm2_dir)
    fresh = lambda: AutoModelForCausalLM.from_pretrained(model_dir).eval()  # noqa: E731
    model = dude.apply(fresh(), dude.AdapterConfig(method="dude", **Q))
    move_adapters(model)
    dude.save(model, tmp_path / "adapter")
    ids = token_batch()
    merged = {}
    for flag in ("--full-precision", "--no-full-precision"):
        out = tmp_path / flag.strip("-")
        assert main(["export", "--adapter", str(tmp_path / "adapter"), "--name-or-path", str(model_dir),
                     "--output-dir", str(out), flag]) == 0
        with torch.no_grad():
            merged[flag] = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    with torch.no_grad():
        on_full = dude.load(fresh(), tmp_path / "adapter", full_precision=True)(ids).logits
        on_4bit = dude.load(fresh(), tmp_path / "adapter")(ids).logits
        base = fresh()(ids).logits
    assert not torch.allclose(on_full, base, atol=1e-3) and not torch.allclose(on_full, on_4bit, atol=1e-4)
    torch.testing.assert_close(merged["--full-precision"], on_full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged["--no-full-precision"], on_4bit, rtol=1e-4, atol=1e-5)
