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


def response_loss(model: Any, tokenizer: Any, examples: list[dict], max_length: int,
                  batch_size: int = 8) -> dict[str, float | int]:
    """``{"loss", "tokens", "examples"}`` of ``examples`` (math or instruction dicts).

    The loss itself is ``dude.evaluate.evaluate_response_loss``; this adds the refusal of
    cut answers and a length-sorted order (batches of similar lengths waste little padding).
    """
    from dude.data import build_sft_examples
    from dude.evaluate.loss import evaluate_response_loss

    lengths = [len(e["input_ids"]) for e in build_sft_examples(tokenizer, examples, max_length=10 ** 6)]
    if max(lengths) > max_length:
        raise ValueError(f"an example has {max(lengths)} tokens > max_length {max_length}: its answer would be cut; "
                         "raise the study's max_length")
    ordered = [examples[i] for i in sorted(range(len(examples)), key=lengths.__getitem__)]
    result = evaluate_response_loss(model, tokenizer, ordered, batch_size=batch_size, max_length=max_length)
    return {"loss": result["loss"], "tokens": result["tokens"], "examples": result["n"]}
