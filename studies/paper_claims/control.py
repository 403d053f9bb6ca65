"""The "it is only the update size" control (LoRAM, arXiv:2507.06558): the lr factor that
gives LoRA the first-step weight update of a principal-init method.

PiSSA/DuDe start from B0 = U_r sqrt(S_r/s), A0 = sqrt(S_r/s) V_r^T, LoRA from B = 0: at one
lr, one AdamW step changes the effective weight W_eff = W_res + s B A by

    LoRA:  dW = s dB A0_kaiming                   (B = 0, so dA does not act yet)
    PiSSA: dW = s (dB A0 + B0 dA + dB dA)

and Adam's first step is about lr * sign(grad) per entry, so ||dW_pissa|| / ||dW_lora||
is a property of the inits, not of the lr. With

    k = sum_layers ||dW_pissa||_F / sum_layers ||dW_lora||_F     (same batch, same lr)

LoRA at lr = k * lr*_pissa takes PiSSA's first step size. If that LoRA matches PiSSA on
the measures, PiSSA's difference from tuned LoRA is the update size; if it does not, the
principal init does something a larger lr does not.

    python studies/paper_claims/control.py OUT_DIR   # reads OUT_DIR/calib-request.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def effective_weights(model: Any) -> dict[str, torch.Tensor]:
    """Each adapter layer's merged weight (out, in) in float32, detached."""
    import dude

    return {name: layer.merged_weight().detach().float().clone() for name, layer in dude.adapter_layers(model).items()}


def first_step_update(method: str, r: int, seed: int, batch: dict[str, torch.Tensor], lr: float = 1e-5) -> float:
    """sum over adapter layers of ||W_eff after one AdamW step - W_eff before||_F."""
    import dude

    from plan import adapter_config

    model, _ = dude.load_model()
    torch.manual_seed(seed)
    dude.apply(model, adapter_config(method, r, seed))
    before = effective_weights(model)
    opt = torch.optim.AdamW(dude.adapter_parameters(model), lr=lr, weight_decay=0.0)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    after = effective_weights(model)
    return sum(float(torch.linalg.norm(after[n] - before[n])) for n in before)


def update_ratio(request: dict[str, Any]) -> dict[str, Any]:
    from dude.data import build_sft_examples, collate_sft
    from dude.hub import load_model

    from measures import read_jsonl

    _, tokenizer = load_model()
    rows = read_jsonl(request["train_file"], request["batch_size"])
    batch = collate_sft(build_sft_examples(tokenizer, rows, request["max_length"]), tokenizer.pad_token_id)
    norms = {m: first_step_update(m, request["r"], request["seed"], batch)
             for m in (request["base"], request["matched_to"])}
    return {"norms": norms, "ratio": norms[request["matched_to"]] / norms[request["base"]], **request}


def main() -> None:
    out = Path(sys.argv[1])
    result = update_ratio(json.loads((out / "calib-request.json").read_text()))
    tmp = out / ".tmp-update_ratio.json"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "update_ratio.json")
    print(f"first-step update ratio {result['matched_to']}/{result['base']}: {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
