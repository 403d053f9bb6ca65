"""PEFT on-disk format: PEFT's own loader reads what we write; we read it back exactly."""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import dude
from dude import io
from peft_oracle import peft_model, sgd_steps
from tiny_models import move_adapters, tiny_gpt2, tiny_llama, tiny_qwen2, token_batch

METHODS = ["lora", "dora", "pissa", "dude"]


def _trained(factory, method, targets=dude.config.LLAMA_LINEAR, **options):
    model = dude.apply(factory(), dude.AdapterConfig(method=method, r=4, alpha=8, target_modules=targets, **options))
    move_adapters(model)
    return model


def _peft_load_quietly(base, directory):
    """PeftModel.from_pretrained, failing on any warning about missing or unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, directory)
    bad = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not bad, bad
    return loaded.eval()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2-bias", "gpt2-conv1d"])
@pytest.mark.parametrize("method", METHODS)
def test_peft_loads_our_files_and_we_load_them_back_exactly(tmp_path, factory, method):
    targets = ["c_attn", "c_proj", "c_fc"] if factory is tiny_gpt2 else dude.config.LLAMA_LINEAR
    model = _trained(factory, method, targets)
    ids = token_batch()
    expected = model(ids).logits.detach()
    assert not torch.allclose(expected, factory()(ids).logits, atol=1e-3)
    dude.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == (8 if method in ("pissa", "dude") else 4)
    assert config["use_dora"] == (method in ("dora", "dude"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    peft_logits = _peft_load_quietly(factory(), tmp_path)(ids).logits.detach()
    torch.testing.assert_close(peft_logits, expected, atol=1e-5, rtol=1e-5)

    reloaded = dude.load(factory(), tmp_path)
    assert torch.equal(reloaded(ids).logits, expected)
    originals, copies = dude.adapter_layers(model), dude.adapter_layers(reloaded)
    for name, layer in originals.items():
        for tensor in ("residual", "lora_A", "lora_B", "magnitude", "lora_A0", "lora_B0"):
            a, b = getattr(layer, tensor), getattr(copies[name], tensor)
            assert (a is None and b is None) or torch.equal(a, b), f"{name}.{tensor}"
    assert all(p.requires_grad for p in dude.adapter_parameters(reloaded))


def test_rslora_scaling_survives_the_rank_doubling(tmp_path):
    model = _trained(tiny_llama, "dude", use_rslora=True)
    ids = token_batch()
    dude.save(model, tmp_path)
    peft_logits = _peft_load_quietly(tiny_llama(), tmp_path)(ids).logits.detach()
    torch.testing.assert_close(peft_logits, model(ids).logits.detach(), atol=1e-5, rtol=1e-5)


def test_training_continues_after_load(tmp_path):
    ids = token_batch(batch=4, length=16)
    straight = _trained(tiny_llama, "dude")
    dude.save(straight, tmp_path)
    resumed = dude.load(tiny_llama(), tmp_path)
    sgd_steps(straight, dude.adapter_parameters(straight), ids)
    sgd_steps(resumed, dude.adapter_parameters(resumed), ids)
    assert torch.equal(straight(ids).logits, resumed(ids).logits)


def test_a_peft_trained_dora_adapter_loads_into_dude(tmp_path):
    ids = token_batch(batch=4, length=16)
    peft = peft_model(tiny_llama(), "dora", r=4, alpha=8, targets=["q_proj", "v_proj"])
    sgd_steps(peft, [p for p in peft.parameters() if p.requires_grad], ids)
    peft.save_pretrained(tmp_path)
    ours = dude.load(tiny_llama(), tmp_path)
    assert dude.patch.get_config(ours).method == "dora"
    torch.testing.assert_close(ours(ids).logits, peft(ids).logits.detach(), atol=1e-5, rtol=1e-5)


def test_merged_model_saves_and_reloads_with_automodel(tmp_path):
    model = _trained(tiny_qwen2, "dude")
    ids = token_batch()
    expected = model(ids).logits.detach()
    dude.export_merged(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not torch.allclose(reloaded(ids).logits, tiny_qwen2()(ids).logits, atol=1e-3)
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite"):
        dude.export_merged(_trained(tiny_qwen2, "dude"), tmp_path / "merged")


def test_adapter_for_a_different_base_is_refused(tmp_path):
    dude.save(_trained(tiny_llama, "dude"), tmp_path)
    wider = tiny_qwen2()  # same module names, but biased and differently initialised: still fits
    dude.load(wider, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="saved for a different base model: layer model.layers.0.self_attn.q_proj"):
        dude.load(other, tmp_path)
    with pytest.raises(ValueError, match="matched no module"):
        dude.load(tiny_gpt2(), tmp_path)


def test_truncated_or_corrupt_files_are_refused(tmp_path):
    dude.save(_trained(tiny_llama, "dora"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        dude.load(tiny_llama(), tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        dude.load(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dude.load(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        dude.load(tiny_llama(), tmp_path / "nowhere")


def test_a_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    dude.save(_trained(tiny_llama, "dude"), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        dude.save(_trained(tiny_llama, "dude", seed=5), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, nothing changed


def test_saving_a_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no dude adapters"):
        io.save(tiny_llama(), tmp_path)
