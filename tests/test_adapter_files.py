"""Adapter directories dude refuses to load, each with a message naming the file and the
field: other adapter types (real PEFT files), files that disagree, non-finite tensors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import move_adapters, tiny_llama

import dude
from dude.cli import main

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def saved(tmp_path) -> Path:
    model = dude.apply(tiny_llama(), dude.AdapterConfig(method="dude", r=4, alpha=8))
    move_adapters(model)
    return dude.save(model, tmp_path / "adapter")


def _rewrite(directory: Path, edit_tensors=None, edit_metadata=None, edit_config=None) -> None:
    weights, config_path = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, weights, metadata=metadata)
    if edit_config:
        config = json.loads(config_path.read_text())
        edit_config(config)
        config_path.write_text(json.dumps(config))


def _peft_saved(tmp_path: Path, config) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), config)
        model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


@pytest.mark.parametrize("config, field", [
    (IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "peft_type"),
    (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), "rank_pattern"),
    (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"), "init_lora_weights"),
])
def test_peft_adapters_dude_cannot_load_faithfully_are_refused(tmp_path, config, field):
    directory = _peft_saved(tmp_path, config)
    with pytest.raises(ValueError, match=rf"adapter_config.json: field '{field}'"):
        dude.load(tiny_llama(), directory)


@pytest.mark.parametrize("edit, message", [
    (dict(edit_config=lambda c: c.update(r=16)), r"adapter_config.json: field 'r' is 16, but the metadata of "
                                                 r"adapter_model.safetensors \(method 'dude', r=4"),
    (dict(edit_config=lambda c: c.update(lora_alpha=3)), "adapter_config.json: field 'lora_alpha' is 3"),
    (dict(edit_config=lambda c: c.update(use_dora=False)), "adapter_config.json: field 'use_dora' is False"),
    (dict(edit_config=lambda c: c.update(r="8")), "adapter_config.json: field 'r' must be a positive integer"),
    (dict(edit_metadata=lambda m: m.update(dude_config=m["dude_config"].replace('"r": 4', '"r": 2'))),
     r"adapter_config.json: field 'r' is 8, but the metadata .* r=2"),
    (dict(edit_metadata=lambda m: m.update(dude_config="{not json")),
     "adapter_model.safetensors: metadata field 'dude_config' is not a valid dude AdapterConfig"),
    (dict(edit_tensors=lambda t: t[A_KEY].__setitem__((0, 0), float("nan"))),
     rf"adapter_model.safetensors: field '{A_KEY}' holds 1 NaN or inf value"),
    (dict(edit_tensors=lambda t: t.update({A_KEY: t[A_KEY].to(torch.int32)})),
     rf"field '{A_KEY}' has dtype torch.int32"),
    (dict(edit_tensors=lambda t: t.update({A_KEY: t[A_KEY][:6]})),
     rf"field '{A_KEY}' has shape \(6, 32\), not rank r=8"),
])
def test_inconsistent_or_broken_files_are_refused(saved, edit, message):
    _rewrite(saved, **edit)
    with pytest.raises(ValueError, match=message) as err:
        dude.load(tiny_llama(), saved)
    assert str(saved) in str(err.value)  # the message names the file by its path


def test_a_magnitude_without_use_dora_is_refused(saved):
    # a PEFT-style file (no dude metadata) whose config says plain LoRA but holds magnitudes
    _rewrite(saved, edit_metadata=lambda m: m.pop("dude_config"), edit_config=lambda c: c.update(use_dora=False))
    with pytest.raises(ValueError, match=r"holds magnitude vectors \(DoRA\), but adapter_config.json field 'use_dora'"):
        dude.load(tiny_llama(), saved)


def test_the_cli_refuses_a_broken_adapter_with_exit_2_and_writes_nothing(saved, tmp_path, capsys):
    _rewrite(saved, edit_tensors=lambda t: t[A_KEY].__setitem__((1, 1), float("inf")))
    for args in (["eval", "--adapter", str(saved), "--tasks", "mmlu", "--mmlu-limit", "2",
                  "--output-dir", str(tmp_path / "eval")],
                 ["export", "--adapter", str(saved), "--output-dir", str(tmp_path / "merged")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"field '{A_KEY}' holds 1 NaN or inf value" in err and err.count("error:") == 1
    assert not (tmp_path / "eval").exists() and not (tmp_path / "merged").exists()


def test_a_non_finite_adapter_is_not_saved(tmp_path):
    model = dude.apply(tiny_llama(), dude.AdapterConfig(method="dora", r=4, alpha=8))
    layer = dude.adapter_layers(model)["model.layers.1.mlp.up_proj"]
    with torch.no_grad():
        layer.lora_B[2, 1] = float("inf")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    with pytest.raises(ValueError, match=rf"field '{key}' holds 1 NaN or inf value\(s\) of 256; .* not saved"):
        dude.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_saving_onto_a_file_is_refused_by_name(tmp_path):
    model = dude.apply(tiny_llama(), dude.AdapterConfig(method="lora", r=2))
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match="cannot save the adapter to .*taken': it exists and is not a directory"):
        dude.save(model, tmp_path / "taken")
