"""Multiple choice scored by the log-likelihood of the answer letter, as MMLU usually is.

The prompt lists the choices as ``A. ...``, ``B. ...`` and ends with ``Answer:``; the
model's prediction is the letter, among the example's valid letters, with the highest
next-token log-probability (``" A"`` after plain text, ``"A"`` at the start of a chat
assistant turn). One forward pass per question, batched with left padding so the last
position of every row is its own last prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.prompts import LETTERS, encode_prompt, mc_prompt, render_prompt, response_prefix
from .batching import left_padded_batches, pad_id_of

__all__ = ["evaluate_multiple_choice", "letter_token_ids"]


def letter_token_ids(tokenizer: Any, n: int, chat: bool) -> list[int]:
    """Token id of each answer letter as it follows the prompt; each must be one token."""
    ids = []
    for letter in LETTERS[:n]:
        tokens = tokenizer(response_prefix(chat) + letter, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(tokens)} tokens for this "
                             "tokenizer; letter scoring needs single-token letters")
        ids.append(tokens[0])
    return ids


def _last_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Logits at the last position, (batch, vocab) float32 on CPU.

    ``logits_to_keep=1`` skips the vocabulary projection of every other position (most
    of the memory and a good part of the time for a small model); models that do not
    take it get the full forward.
    """
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:
        out = model(**kwargs)
    return out.logits[:, -1].float().cpu()


@torch.no_grad()
def evaluate_multiple_choice(model: Any, tokenizer: Any, examples: Sequence[dict],
                             batch_size: int = 16, chat: bool = False) -> dict:
    """Letter-scoring accuracy on ``{"question", "choices", "answer": int}`` examples.

    Args:
        chat: wrap the prompt in the tokenizer's chat template (use it for a task the
            model was fine-tuned on in that format); MMLU is scored as plain text.

    Returns ``{"accuracy", "n", "correct", "correct_prob", "predictions": list[int],
    "letter_logprobs": list[list[float]]}``: ``correct_prob`` is the mean probability of
    the right letter renormalized over the valid letters. An example's optional
    ``subject`` goes into its prompt header.
    """
    if not examples:
        raise ValueError("evaluate_multiple_choice: no examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_max = max(len(ex["choices"]) for ex in examples)
    letter_ids = torch.tensor(letter_token_ids(tokenizer, n_max, chat))
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, mc_prompt(ex, ex.get("subject")), chat),
                             chat) for ex in examples]
    pad_id = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    predictions = [0] * len(examples)
    scores: list[list[float]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    try:
        for rows, ids, mask in left_padded_batches(prompts, batch_size, pad_id):
            # Left padding needs explicit positions so each row starts at position 0.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = _last_logits(model, ids.to(device), mask.to(device), positions.to(device))
            letter_logprobs = torch.log_softmax(logits, -1)[:, letter_ids]  # (batch, n_max)
            for j, i in enumerate(rows):
                n_choices = len(examples[i]["choices"])
                scores[i] = letter_logprobs[j, :n_choices].tolist()
                predictions[i] = int(letter_logprobs[j, :n_choices].argmax())
    finally:
        model.train(was_training)
    correct = sum(int(p == int(ex["answer"])) for p, ex in zip(predictions, examples))
    # Probability of the right letter, renormalized over the valid letters: a smooth
    # companion of accuracy that moves even when a small model always picks one letter.
    correct_prob = sum(torch.softmax(torch.tensor(s), 0)[int(ex["answer"])].item()
                       for s, ex in zip(scores, examples)) / len(examples)
    return {"accuracy": correct / len(examples), "n": len(examples), "correct": correct,
            "correct_prob": correct_prob, "predictions": predictions, "letter_logprobs": scores}
