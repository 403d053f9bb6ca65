"""Teacher-forced response loss: the study's held-out, validation and retention measure.

    loss = sum_i sum_{t in response_i} -log p(y_t | y_<t) / sum_i |response_i|

over the examples of one file, in the prompt format of training (``dude.data``: chat
template, loss on the response tokens only, prompt tokens masked). One token-weighted
mean over the whole set, the same quantity the training loop minimises. Loss rather
than accuracy: at 135M a few hundred math problems give a handful of correct greedy
answers, while the loss ranks every model on every answer token.

No example may be cut: a response truncated by ``max_length`` would drop its last tokens
from the measure, so such a set is refused (raise ``max_length``).
"""

from __future__ import annotations

from typing import Any

import torch


def response_loss(model: Any, tokenizer: Any, examples: list[dict], max_length: int,
                  batch_size: int = 8) -> dict[str, float | int]:
    """``{"loss", "tokens", "examples"}`` of ``examples`` (math or instruction dicts)."""
    from dude.data import build_sft_examples, collate_sft

    encoded = build_sft_examples(tokenizer, examples, max_length=10 ** 6)
    longest = max(len(e["input_ids"]) for e in encoded)
    if longest > max_length:
        raise ValueError(f"an example has {longest} tokens > max_length {max_length}: its answer would be cut; "
                         "raise the study's max_length")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))  # little padding
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = collate_sft([encoded[i] for i in order[start:start + batch_size]],
                                    pad_token_id=tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]  # (b, t-1): token t is predicted at position t-1
                total += torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum").item()
                tokens += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return {"loss": total / tokens, "tokens": tokens, "examples": len(encoded)}
