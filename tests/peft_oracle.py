"""PEFT's implementation of the same four methods: the independent reference."""

import torch
from peft import LoraConfig, get_peft_model

import dude


def peft_model(base, method: str, r: int, alpha: float, targets, use_rslora: bool = False):
    """PEFT's LoRA, DoRA, PiSSA, and DoRA+PiSSA (DuDe's starting point)."""
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora,
        use_dora=method in ("dora", "dude"), init_lora_weights="pissa" if method in ("pissa", "dude") else True,
    )
    return get_peft_model(base, config)


def peft_layer_tensors(peft, name: str) -> dict[str, torch.Tensor]:
    module = peft.base_model.model.get_submodule(name)
    out = {"residual": module.base_layer.weight, "A": module.lora_A["default"].weight,
           "B": module.lora_B["default"].weight}
    if "default" in module.lora_magnitude_vector:
        out["m"] = module.lora_magnitude_vector["default"].weight
    return out


def copy_kaiming_a_from_peft(model, peft) -> None:
    """LoRA/DoRA draw A at random: give both sides the same A (B = 0 on both)."""
    with torch.no_grad():
        for name, layer in dude.adapter_layers(model).items():
            layer.lora_A.copy_(peft_layer_tensors(peft, name)["A"])


def copy_adapters_to_peft(model, peft) -> None:
    """Give PEFT our A, B and m, layer by layer (for DoRA, whose residual is W on both sides)."""
    with torch.no_grad():
        for name, layer in dude.adapter_layers(model).items():
            ref = peft_layer_tensors(peft, name)
            for key, value in (("A", layer.lora_A), ("B", layer.lora_B), ("m", layer.magnitude)):
                ref[key].copy_(value)


def sgd_steps(model, params, ids, steps: int = 3, lr: float = 0.5) -> None:
    optimizer = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_same_start(model, peft, atol: float) -> None:
    """Layer by layer, our starting point equals PEFT's: residual, the product B @ A
    (factors are defined up to sign), and the magnitude. LoRA/DoRA get PEFT's random A first."""
    if not any(layer.lora_A0 is not None for layer in dude.adapter_layers(model).values()):
        copy_kaiming_a_from_peft(model, peft)
    for name, layer in dude.adapter_layers(model).items():
        ref = peft_layer_tensors(peft, name)
        torch.testing.assert_close(layer.residual, ref["residual"], atol=atol, rtol=0)
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, ref["B"] @ ref["A"], atol=10 * atol, rtol=10 * atol)
        if layer.magnitude is not None:
            torch.testing.assert_close(layer.magnitude, ref["m"], atol=atol, rtol=atol)
