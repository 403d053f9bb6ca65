"""Target matching (PEFT's rules), apply/merge on whole tiny models, refusals."""

import gc
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import dude
from dude.frozen import QuantizedWeight
from dude.patch import find_targets
from tiny_models import move_adapters, tiny_gpt2, tiny_llama, tiny_qwen2, token_batch


def test_list_matches_exact_names_and_dotted_suffixes():
    model = tiny_llama()
    names = find_targets(model, dude.AdapterConfig(target_modules=["q_proj", "model.layers.1.mlp.down_proj"]))
    assert list(names) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    ]
    # a suffix must start at a dot: "proj" alone matches nothing
    with pytest.raises(ValueError, match=r"matched no module.*'down_proj', 'gate_proj', 'k_proj'"):
        find_targets(model, dude.AdapterConfig(target_modules=["proj"]))


def test_regex_is_a_full_match_and_exclude_applies_after():
    model = tiny_llama()
    config = dude.AdapterConfig(target_modules=r".*layers\.0\..*_proj", exclude_modules=["o_proj", "up_proj"])
    assert sorted(n.rsplit(".", 1)[-1] for n in find_targets(model, config)) == [
        "down_proj", "gate_proj", "k_proj", "q_proj", "v_proj"
    ]
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(model, dude.AdapterConfig(target_modules=r"layers\.0\..*"))  # not anchored to the full name


def test_matching_a_non_linear_module_is_refused():
    with pytest.raises(TypeError, match="LlamaDecoderLayer"):
        find_targets(tiny_llama(), dude.AdapterConfig(target_modules=r"model\.layers\.0"))


def test_apply_freezes_the_base_and_twice_is_refused():
    model = tiny_llama()
    dude.apply(model, dude.AdapterConfig(method="dude", r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 3  # layers x projections x (A, B, m)
    assert {id(p) for p in dude.adapter_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    with pytest.raises(ValueError, match="already has dude adapters"):
        dude.apply(model, dude.AdapterConfig(method="lora", r=4))


def test_stock_checkpoint_does_not_load_silently_into_a_patched_model():
    stock = tiny_llama().state_dict()
    model = dude.apply(tiny_llama(), dude.AdapterConfig(method="dude", r=4))
    with pytest.raises(RuntimeError, match="q_proj.weight"):
        model.load_state_dict(stock)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2-bias", "gpt2-conv1d"])
@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_identity_at_init_and_merge_after_moving(factory, method):
    targets = ["c_attn", "c_proj", "c_fc"] if factory is tiny_gpt2 else dude.config.LLAMA_LINEAR
    base = factory()
    ids = token_batch()
    expected = base(ids).logits
    model = dude.apply(factory(), dude.AdapterConfig(method=method, r=4, alpha=8, target_modules=targets))
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    move_adapters(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)
    merged = dude.merge(model)
    assert not dude.adapter_layers(merged) and not hasattr(merged, "dude_config")
    rel = (merged(ids).logits - adapted).abs().max() / adapted.abs().max()
    assert rel <= 1e-5
    with pytest.raises(ValueError, match="no dude adapters"):
        dude.merge(merged)  # merging is one-way


def test_every_dtype_runs_and_keeps_adapters_in_float32():
    ids = token_batch()
    for dtype in (torch.bfloat16, torch.float16):
        base = tiny_llama(dtype=dtype)
        model = dude.apply(tiny_llama(dtype=dtype), dude.AdapterConfig(method="dude", r=4))
        assert {p.dtype for p in dude.adapter_parameters(model)} == {torch.float32}
        out = model(ids).logits
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), base(ids).logits.float(), atol=5e-2, rtol=5e-2)
        out.float().sum().backward()
        assert all(p.grad is not None for p in dude.adapter_parameters(model))


def test_randomized_and_kaiming_init_are_seeded():
    def factors(method, seed):
        model = dude.apply(tiny_llama(), dude.AdapterConfig(method=method, r=4, svd="randomized", seed=seed))
        return torch.cat([p.flatten() for p in dude.adapter_parameters(model)])

    for method in ("lora", "dude"):
        assert torch.equal(factors(method, 0), factors(method, 0))
        assert not torch.equal(factors(method, 0), factors(method, 1))


def test_merged_model_is_an_ordinary_module():
    model = dude.merge(dude.apply(tiny_llama(), dude.AdapterConfig(method="dora", r=4)))
    assert all(type(m) in (nn.Linear,) for n, m in model.named_modules() if n.endswith("_proj"))


def _mapped(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings from Linux's /proc")
@pytest.mark.parametrize("factory, method, quantize", [
    (tiny_llama, "dude", None), (tiny_llama, "lora", "nf4"), (tiny_gpt2, "pissa", None), (tiny_llama, "lora", None),
], ids=["dude", "qlora", "pissa-gpt2-tied", "lora"])
def test_apply_lets_go_of_the_checkpoint_file_once_the_frozen_weights_are_replaced(tmp_path, factory, method, quantize):
    if quantize is not None:  # bitsandbytes loads its CPU kernels on first use and logs a failure with the
        QuantizedWeight.quantize(torch.ones(64, 64), quantize)  # exception, whose frames pytest's log capture keeps
    factory().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    assert _mapped(file)  # transformers maps the checkpoint: its tensors view the file
    tokens = token_batch()
    with torch.no_grad():
        expected = model(tokens).logits
    embedding = model.get_input_embeddings().weight
    values, pointer = embedding.detach().clone(), embedding.data_ptr()
    dude.apply(model, dude.AdapterConfig(method=method, r=4, alpha=4, target_modules=["q_proj", "v_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj", "k_proj", "c_attn", "c_proj", "c_fc"], quantize=quantize))
    gc.collect()
    replaced = method in ("pissa", "dude") or quantize is not None
    assert _mapped(file) is not replaced
    assert (embedding.data_ptr() != pointer) is replaced  # copied out of the file only when that frees it
    assert model.get_input_embeddings().weight is embedding and torch.equal(embedding, values)
    if factory is tiny_gpt2:
        assert model.lm_head.weight is embedding  # the tie stays
    if quantize is None:
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
