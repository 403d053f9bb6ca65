"""Math word problems scored by exact match of the final number after greedy generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.prompts import encode_prompt, prompt_and_response, render_prompt, use_chat
from .batching import left_padded_batches, pad_id_of
from .extract import extract_answer, numbers_match

__all__ = ["evaluate_math", "generate_greedy"]


@torch.no_grad()
def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[list[int]],
                    max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions (decoded, special tokens skipped) of tokenized prompts.

    Batches are LEFT-padded, so every row's next token follows its own last prompt token.
    Prompts are sorted by length to waste little padding; results come back in order.
    """
    pad_id = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for rows, ids, mask in left_padded_batches(prompts, batch_size, pad_id):
            width = ids.shape[1]
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                temperature=None, top_p=None, top_k=None)
            for j, i in enumerate(rows):
                outputs[i] = tokenizer.decode(generated[j, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def evaluate_math(model: Any, tokenizer: Any, examples: Sequence[dict], batch_size: int = 8,
                  max_new_tokens: int = 256, chat: bool | None = None) -> dict:
    """Accuracy of greedy answers on GSM8K-format examples (``question``, ``answer``).

    The prompt is the training prompt (``dude.data.prompts``), in the chat template when
    the tokenizer has one (``chat=None``). The prediction is the number after the last
    ``####`` of the generation, else its last number; it must equal the reference's
    ``#### n`` numerically (commas and ``$`` ignored).

    Returns ``{"accuracy", "n", "correct", "predictions": [{"question", "reference",
    "predicted", "correct", "output"}]}``.
    """
    if not examples:
        raise ValueError("evaluate_math: no examples")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got "
                         f"{batch_size}, {max_new_tokens}")
    chat = use_chat(tokenizer, chat)
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, prompt_and_response(ex)[0], chat), chat)
               for ex in examples]
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    predictions = []
    for ex, output in zip(examples, outputs):
        reference = extract_answer(ex["answer"])
        predicted = extract_answer(output)
        predictions.append({"question": ex["question"], "reference": reference,
                            "predicted": predicted, "correct": numbers_match(predicted, reference),
                            "output": output})
    correct = sum(p["correct"] for p in predictions)
    return {"accuracy": correct / len(examples), "n": len(examples), "correct": correct,
            "predictions": predictions}
