"""Checks that need a CUDA GPU (marked ``gpu``; skipped without one, see conftest.py):
the fused path in float32 and bfloat16 against the reference formula, the quantized base
with CUDA bitsandbytes, a one-process FSDP run over NCCL, and a compiled training step
(inductor's Triton kernels, bf16 autocast) against the eager one.

    python -m pytest -m gpu tests/test_gpu.py
    bash benchmarks/device_check.sh     # these and the compile benchmark, in one device call
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _run, tiny  # noqa: F401  (tiny: the module fixture)
from test_compile import compiled_against_eager
from test_fast_path import METHODS, _grads, _layer, _reference
from test_train import tiny_train_args

import dude

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_fused_path_on_cuda_matches_the_reference(method, dtype):
    """As tests/test_fast_path.py on CPU, with every tensor on the GPU (dropout 0.3)."""
    layer = _layer(method, dtype=dtype, dropout=0.3).cuda().train()
    assert layer.fast_path
    x = torch.randn(3, 5, 24).to("cuda", dtype).requires_grad_()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)  # the same dropout mask again
    dropped = layer.dropout(x)
    ref = _reference(layer, x, dropped)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (3, 5, 20)
    torch.testing.assert_close(y.float(), ref, **tol)
    for got, want in zip(_grads(layer, x, y), _grads(layer, x, ref)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol)


@pytest.mark.parametrize("method", ["dora", "dude"])
def test_quantized_base_with_cuda_bitsandbytes(method):
    """QDoRA/QDuDe on the GPU: the frozen part is bitsandbytes' CUDA quantization of the
    residual, and the layer computes the reference formula on ``deq(Q)``, gradients included."""
    import bitsandbytes.functional as bnbf

    from dude import decompose, frozen

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True).cuda()
    config = dude.AdapterConfig(method=method, r=4, alpha=8, quantize="nf4", quant_magnitude="quantized")
    layer = dude.AdapterLinear.from_linear(linear, config, generator=torch.Generator().manual_seed(0))
    weight = linear.weight.detach()
    residual = weight if layer.lora_B0 is None else decompose.residual_weight(weight, layer.lora_B0, layer.lora_A0,
                                                                               layer.scaling)
    packed, _ = bnbf.quantize_4bit(residual, blocksize=64, quant_type="nf4")
    assert layer.residual.packed.device.type == "cuda" and torch.equal(layer.residual.packed, packed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from init
        for p in layer.adapter_params():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.device))
    x = torch.randn(3, 5, 96, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer.train()
    out = layer(x)
    ref = decompose.reference_forward(x_ref, frozen.dense(layer.residual), layer.bias, layer.lora_A, layer.lora_B,
                                      layer.scaling, layer.magnitude)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.adapter_params()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *layer.adapter_params()])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_fsdp_one_process_over_nccl_matches_plain_training(tiny, tmp_path):  # noqa: F811
    common = ["--dropout", "0.0", "--device", "cuda", "--precision", "fp32", "--save-every", "2"]
    one_process = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                   "-m", "dude.cli"]
    _run(one_process, tiny_train_args(tiny, tmp_path / "fsdp", 4, *common, "--strategy", "fsdp"))
    _run([sys.executable, "-m", "dude.cli"], tiny_train_args(tiny, tmp_path / "plain", 4, *common))
    a = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000002" / ".metadata").exists()


@pytest.mark.parametrize("method", METHODS)
def test_compiled_step_on_cuda_matches_eager_in_bf16(method):
    compiled_against_eager(method, "cuda")
