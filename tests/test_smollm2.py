"""Integration on the real SmolLM2-135M-Instruct: identity at init, PEFT as oracle, PEFT's
loader on our files, randomized SVD accuracy. Figures are printed (pytest -s) for the record."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import dude
from dude import decompose
from peft_oracle import assert_same_start, peft_model, sgd_steps

TARGETS = dude.config.LLAMA_LINEAR
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def _ids(tokenizer, n_copies=2):
    return tokenizer([PROMPT] * n_copies, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def fp32_noise_floor(smollm2_dir):
    """How far SmolLM2's own fp32 logits are from its fp64 logits on the test prompt: the
    rounding noise any re-association of the same function (such as W = W_res + s B0 A0) meets."""
    model, tokenizer = dude.load_model(smollm2_dir)
    ids = _ids(tokenizer)
    with torch.no_grad():
        fp32 = model.eval()(ids).logits.double()
        fp64 = model.double()(ids).logits
    return (fp32 - fp64).abs().max().item()


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_identity_at_init_on_every_projection(smollm2, method, fp32_noise_floor):
    """All 30 x 7 projections adapted; the randomized SVD keeps the test fast (the split is
    exact whatever the factors: W_res = W - s B0 A0)."""
    base, tokenizer = smollm2
    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = base(ids).logits
    model = dude.apply(base, dude.AdapterConfig(method=method, r=16, alpha=16, svd="randomized"))
    assert len(dude.adapter_layers(model)) == 30 * 7
    with torch.no_grad():
        identity = (model(ids).logits - expected).abs().max().item()
    print(f"\n{method}: identity at init, max |logit diff| = {identity:.2e} "
          f"(the base model's own fp32-vs-fp64 error: {fp32_noise_floor:.2e})")
    if method in ("lora", "dora"):
        assert identity == 0.0  # B = 0 and g = 1 exactly: the same arithmetic as the base
    else:
        # Splitting W into two matmuls re-rounds every product: the difference can only be
        # held to the order of the base model's own fp32 rounding error.
        assert identity <= max(1e-4, 3 * fp32_noise_floor)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "dude"])
def test_same_start_and_same_steps_as_peft(smollm2, method):
    """Against PEFT on the first two decoder blocks (all seven projection types), exact SVD
    on both sides: the whole model would spend minutes in 420 full SVDs."""
    base, tokenizer = smollm2
    ids = _ids(tokenizer)
    targets = r"model\.layers\.[01]\..*_proj"
    peft = peft_model(copy.deepcopy(base), method, r=16, alpha=16, targets=targets)
    ours = dude.apply(base, dude.AdapterConfig(method=method, r=16, alpha=16, target_modules=targets))
    assert len(dude.adapter_layers(ours)) == 2 * 7
    assert_same_start(ours, peft, atol=1e-5)
    with torch.no_grad():
        start = ours(ids).logits
    sgd_steps(ours, dude.adapter_parameters(ours), ids, steps=3, lr=1e-3)
    sgd_steps(peft, [p for p in peft.parameters() if p.requires_grad], ids, steps=3, lr=1e-3)
    with torch.no_grad():
        ours_logits, peft_logits = ours(ids).logits, peft(ids).logits
    assert not torch.allclose(ours_logits, start, atol=1e-3)
    rel = ((ours_logits - peft_logits).abs().max() / peft_logits.abs().max()).item()
    print(f"\n{method}: after 3 SGD steps, relative logit difference to PEFT = {rel:.2e}")
    assert rel <= 1e-4


@pytest.mark.parametrize("method", ["pissa", "dude"])
def test_peft_loads_the_rank_2r_export(smollm2, tmp_path, method, fp32_noise_floor):
    base, tokenizer = smollm2
    stock = copy.deepcopy(base)
    ids = _ids(tokenizer)
    model = dude.apply(base, dude.AdapterConfig(method=method, r=16, alpha=16, svd="randomized"))
    sgd_steps(model, dude.adapter_parameters(model), ids, steps=3, lr=1e-3)
    model.eval()
    dude.save(model, tmp_path / "adapter")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(copy.deepcopy(stock), tmp_path / "adapter").eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]
    prompt = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        ours_logits, peft_logits, stock_logits = model(ids).logits, peft(ids).logits, stock(ids).logits
        ours_tokens = model.generate(**prompt, max_new_tokens=20, do_sample=False)
        peft_tokens = peft.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert not torch.allclose(ours_logits, stock_logits, atol=1e-3)
    diff = (ours_logits - peft_logits).abs().max().item()
    print(f"\n{method}: PEFT-loaded rank-2r adapter, max |logit diff| = {diff:.2e}")
    # PEFT computes W x + s B'A' x, we W_res x + s BA x: the same function re-associated,
    # so they agree to the order of the model's own fp32 rounding (8.8e-5 on this prompt).
    assert diff <= max(1e-4, 3 * fp32_noise_floor)
    assert torch.equal(ours_tokens, peft_tokens)

    reloaded = dude.load(copy.deepcopy(stock), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ours_logits)

    dude.export_merged(model, tmp_path / "merged", tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits
    rel = ((merged_logits - ours_logits).abs().max() / ours_logits.abs().max()).item()
    assert rel <= 1e-5


def test_randomized_svd_matches_exact_principal_part(smollm2):
    base, _ = smollm2
    errors: dict[str, float] = {}
    defaults = dude.AdapterConfig()  # the randomized SVD as apply() runs it
    blocks = (".0.", ".10.", ".20.", ".29.")  # a sample of blocks: the full sweep is benchmarks/init_svd.py
    for name, module in base.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in TARGETS or not any(b in name for b in blocks):
            continue
        w = module.weight.detach()
        exact = decompose.top_singular(w, 16)
        options = dict(randomized=True, niter=defaults.svd_niter, oversample=defaults.svd_oversample, seed=0)
        fast = decompose.top_singular(w, 16, **options)
        assert all(torch.equal(a, b) for a, b in zip(fast, decompose.top_singular(w, 16, **options)))
        part = lambda u, s, vh: u * s @ vh  # noqa: E731  the principal part s*B0@A0
        err = (torch.linalg.norm(part(*fast) - part(*exact)) / torch.linalg.norm(part(*exact))).item()
        errors[kind] = max(errors.get(kind, 0.0), err)
    print("\nrandomized SVD, worst relative Frobenius error of the principal part per layer type:")
    for kind, err in errors.items():
        print(f"  {kind:10s} {err:.2e}")
    assert max(errors.values()) <= 1e-2


def test_the_benchmarks_random_weight_model_has_smollm2s_shapes(smollm2):
    """benchmarks/device_check.sh times SmolLM2's architecture with random weights (the model
    does not travel to a GPU machine): every tensor's name, shape and the config that sets
    the computation match the real model's."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.builders import smollm2_shaped

    model, _ = smollm2
    shaped = smollm2_shaped()
    assert {k: v.shape for k, v in shaped.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings", "hidden_act"):
        assert getattr(shaped.config, key) == getattr(model.config, key), key
