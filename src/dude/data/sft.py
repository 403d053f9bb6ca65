"""Tokenize examples for supervised fine-tuning, with the loss on response tokens only.

Each example becomes ``{"input_ids": list[int], "labels": list[int]}`` where prompt
positions carry the label -100 (ignored by the loss). With a chat template the prompt
is one user turn and the response the assistant turn, closed by the template's end
token, so the model also learns to stop; without one the response ends with EOS.
Prompt and response are tokenized apart and concatenated, so the boundary is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .prompts import encode_prompt, prompt_and_response, render_prompt, response_prefix, use_chat

__all__ = ["IGNORE_INDEX", "build_sft_examples", "collate_sft"]

IGNORE_INDEX = -100


def _response_text(tokenizer: Any, prompt: str, response: str, rendered: str, chat: bool) -> str:
    if not chat:
        return response_prefix(chat) + response + (tokenizer.eos_token or "")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False)
    if not full.startswith(rendered):
        raise ValueError("the chat template renders the prompt differently with and without "
                         "the assistant turn; cannot separate prompt from response")
    return full[len(rendered):]


def build_sft_examples(tokenizer: Any, examples: Sequence[dict], max_length: int,
                       chat: bool | None = None) -> list[dict[str, list[int]]]:
    """Tokenize ``examples`` (math, multiple-choice or instruction dicts) for training.

    Args:
        tokenizer: a transformers tokenizer.
        examples: dicts of any kind understood by ``dude.data.prompts.example_kind``.
        max_length: longest sequence kept, in tokens. Longer examples are cut at the
            right end and counted in a warning; an example whose prompt alone fills
            ``max_length`` would have nothing to learn and is dropped (also counted).
        chat: use the chat template (default: when the tokenizer has one).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    chat = use_chat(tokenizer, chat)
    out: list[dict[str, list[int]]] = []
    truncated = dropped = 0
    for example in examples:
        prompt, response = prompt_and_response(example)
        rendered = render_prompt(tokenizer, prompt, chat)
        prompt_ids = encode_prompt(tokenizer, rendered, chat)
        response_ids = tokenizer(_response_text(tokenizer, prompt, response, rendered, chat),
                                 add_special_tokens=False)["input_ids"]
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        if len(input_ids) > max_length:
            if len(prompt_ids) >= max_length:
                dropped += 1
                continue
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        out.append({"input_ids": input_ids, "labels": labels})
    if truncated or dropped:
        warnings.warn(
            f"{truncated + dropped} of {len(examples)} examples are longer than "
            f"max_length={max_length} tokens: {truncated} truncated, {dropped} dropped "
            "(prompt alone too long)", stacklevel=2)
    if not out:
        raise ValueError(f"no training example left (of {len(examples)}) with max_length={max_length}")
    return out


def collate_sft(batch: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (pad label -100)."""
    if pad_token_id is None:
        raise ValueError("collate_sft: pad_token_id is None (set tokenizer.pad_token)")
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
