"""Validation loss of a trained adapter: the lr sweep's criterion.

Mean cross-entropy over response tokens (the training objective) of the validation file,
with the adapter loaded on the base model. Loss rather than accuracy: at 135M scale and
a few dozen validation problems, greedy-answer accuracy on math is a handful of correct
answers and would pick lrs by noise; the loss ranks every lr on every token.

    python studies/paper_claims/valloss.py RUN_DIR   # writes RUN_DIR/val.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml


def validation_loss(run_dir: Path, batch_size: int = 8) -> dict:
    from dude.data import build_sft_examples, collate_sft, load_task
    from dude.train.commands import load_for
    from dude.train.config import ModelConfig

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = cfg["data"]
    model, tokenizer, _ = load_for(ModelConfig(**cfg["model"]), str(run_dir))
    model.eval()
    raw = load_task("file", path=data["eval_path"], format=data["format"])
    examples = build_sft_examples(tokenizer, raw, data["max_length"], chat=data.get("chat"))
    total = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate_sft(examples[i:i + batch_size], pad_token_id=tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            tokens += (labels != -100).sum().item()
    return {"val_loss": total / tokens, "examples": len(examples), "tokens": int(tokens)}


def main() -> None:
    run_dir = Path(sys.argv[1])
    result = validation_loss(run_dir)
    tmp = run_dir / ".tmp-val.json"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(run_dir / "val.json")
    print(f"validation loss {result['val_loss']:.4f} over {result['tokens']} tokens")


if __name__ == "__main__":
    main()
