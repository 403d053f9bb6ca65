"""QLoRA, QDoRA, QPiSSA and QDuDe against PEFT on the real SmolLM2 (its first two decoder
blocks, all 7 projections, so each test takes seconds):

- lora/dora + nf4 equal PEFT's QLoRA/QDoRA on the model transformers loaded in 4 bits;
- pissa/dude + nf4 equal PEFT's documented QPiSSA flow: PiSSA init in full precision,
  unload the residual, save it, reload it in 4 bits, load the init adapter (use_dora for DuDe).

Both sides hold the same 4-bit codes (asserted byte for byte), give the same logits at
init and after identical SGD steps. Both run in train mode: in eval mode without gradients
bitsandbytes repacks Linear4bit weights for a bfloat16 CPU kernel (other numerics)."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import dude
from dude.config import LLAMA_LINEAR
from peft_oracle import sgd_steps

BLOCKS = 2
R, ALPHA = 8, 16


def _bnb_config():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=BLOCKS, dtype=torch.float32, **kw)


def _load_4bit(path):
    return _load(path, quantization_config=_bnb_config(), device_map="cpu")


@pytest.fixture(scope="module")
def full_precision(smollm2_dir):
    return _load(smollm2_dir)


@pytest.fixture
def ids():
    return torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def _peft_qpissa(full_precision, method: str, tmp_path):
    """PEFT's QPiSSA recipe (docs of init_lora_weights="pissa"), DoRA on top for DuDe."""
    init = get_peft_model(copy.deepcopy(full_precision), LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=LLAMA_LINEAR, use_dora=method == "dude", init_lora_weights="pissa"))
    init.peft_config["default"].init_lora_weights = True  # the saved factors are the init: no SVD on reload
    init.save_pretrained(tmp_path / "init")
    init.unload().save_pretrained(tmp_path / "residual")
    return PeftModel.from_pretrained(_load_4bit(tmp_path / "residual"), tmp_path / "init", is_trainable=True)


def _peft_qlora(smollm2_dir, method: str):
    return get_peft_model(_load_4bit(smollm2_dir), LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=LLAMA_LINEAR, use_dora=method == "dora"))


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_same_codes_same_start_same_steps_as_peft(method, full_precision, smollm2_dir, ids, tmp_path):
    # PEFT's QDoRA starts at ||deq(Q)||; its QPiSSA+DoRA flow keeps the m0 = ||W|| saved in full precision.
    magnitude = "quantized" if method == "dora" else "full"
    ours = dude.apply(copy.deepcopy(full_precision),
                      dude.AdapterConfig(method=method, r=R, alpha=ALPHA, quantize="nf4", quant_magnitude=magnitude))
    peft = _peft_qpissa(full_precision, method, tmp_path) if method in ("pissa", "dude") else _peft_qlora(smollm2_dir, method)
    ours.train(), peft.train()
    for name, layer in dude.adapter_layers(ours).items():
        theirs = peft.base_model.model.get_submodule(name)
        assert torch.equal(layer.residual.packed.view(-1), theirs.base_layer.weight.data.view(-1)), name
        if layer.lora_A0 is None:  # LoRA/DoRA draw A at random: take PEFT's
            with torch.no_grad():
                layer.lora_A.copy_(theirs.lora_A["default"].weight)
    start_ours, start_peft = ours(ids).logits.detach(), peft(ids).logits.detach()
    torch.testing.assert_close(start_ours, start_peft, atol=1e-4, rtol=1e-5)
    sgd_steps(ours, dude.adapter_parameters(ours), ids, steps=2)
    sgd_steps(peft, [p for p in peft.parameters() if p.requires_grad], ids, steps=2)
    after_ours, after_peft = ours(ids).logits.detach(), peft(ids).logits.detach()
    assert not torch.allclose(after_ours, start_ours, atol=1e-2)  # the steps moved the model
    rel = (after_ours - after_peft).abs().max() / after_peft.abs().max()
    assert rel <= 1e-5, f"{method}: relative logit difference {rel:.2e} after 2 SGD steps"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_on_a_transformers_4bit_model_and_its_file_in_peft(method, full_precision, smollm2_dir, ids, tmp_path):
    """The usual QLoRA flow (the base loaded 4-bit by transformers) gives the model dude builds
    from full precision, and the saved adapter loads in PEFT on the 4-bit base."""
    config = dude.AdapterConfig(method=method, r=R, alpha=ALPHA, quant_magnitude="quantized")
    on_4bit = dude.apply(_load_4bit(smollm2_dir), config)
    ours = dude.apply(copy.deepcopy(full_precision), dude.AdapterConfig(**{**config.to_dict(), "quantize": "nf4"}))
    for model in (on_4bit, ours):
        model.train()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in dude.adapter_parameters(model):
                p.add_(0.05 * torch.randn_like(p))
    logits = ours(ids).logits.detach()
    torch.testing.assert_close(on_4bit(ids).logits, logits, atol=0, rtol=0)
    dude.save(ours, tmp_path)
    peft = PeftModel.from_pretrained(_load_4bit(smollm2_dir), tmp_path).train()
    rel = (peft(ids).logits - logits).abs().max() / logits.abs().max()
    assert rel <= 1e-5


def test_svd_methods_refuse_an_already_4bit_base(full_precision, smollm2_dir, tmp_path):
    for method in ("pissa", "dude"):
        with pytest.raises(ValueError, match=r"already 4-bit.*needs the full-precision weight.*quantize='nf4'"):
            dude.apply(_load_4bit(smollm2_dir), dude.AdapterConfig(method=method, r=R))
    saved = dude.apply(copy.deepcopy(full_precision), dude.AdapterConfig(method="dude", r=R, quantize="nf4"))
    dude.save(saved, tmp_path)  # a QDuDe adapter onto a base that is already quantized
    with pytest.raises(ValueError, match=r"already 4-bit.*Load the model in full precision"):
        dude.load(_load_4bit(smollm2_dir), tmp_path)
    with pytest.raises(ValueError, match=r"already nf4.*AdapterConfig.quantize='fp4'"):
        dude.apply(_load_4bit(smollm2_dir), dude.AdapterConfig(method="lora", r=R, quantize="fp4"))
