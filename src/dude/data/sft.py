"""Tokenize examples for supervised fine-tuning, with the loss on response tokens only.

Each example becomes ``{"input_ids": list[int], "labels": list[int]}`` where every
position outside a response carries the label -100 (ignored by the loss). An example is
a list of text segments, each a target or not:

- with a chat template, a conversation alternates context (everything up to and
  including the opening of an assistant turn) and target (the assistant's text and the
  template's end-of-turn tokens, so the model also learns to stop). Every assistant
  turn from ``prompt_turns`` on is a target: a multi-turn conversation trains on all of
  them. An instruction, math or multiple-choice example is the conversation
  ``[user: prompt, assistant: response]``. The segments are cut from the template's
  renderings of growing prefixes of the conversation, which must extend one another.
- without one, the prompt, then ``" " + response + EOS``.
- a completion example (TRL's plain prompt/completion) is never templated: the prompt,
  then ``completion + EOS``, as TRL tokenizes it.

Segments are tokenized apart and concatenated, so the boundaries are exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .prompts import encode_prompt, example_kind, prompt_and_response, response_prefix, use_chat

__all__ = ["IGNORE_INDEX", "build_sft_examples", "collate_sft", "sft_segments"]

IGNORE_INDEX = -100


def _chat_segments(tokenizer: Any, messages: list[dict], prompt_turns: int) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a conversation rendered by the chat template."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < prompt_turns:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError("the chat template renders an earlier part of the conversation differently once "
                             f"turn {i} follows; cannot separate context from the assistant's response")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    if not segments:
        raise ValueError("conversation has no assistant turn to train on")
    return segments


def sft_segments(tokenizer: Any, example: dict, chat: bool) -> list[tuple[str, bool]]:
    """The (text, is_target) segments of one example (see the module docstring)."""
    if example_kind(example) == "conversation":
        if not chat:
            raise ValueError("conversation data needs the tokenizer's chat template (data.chat must not be false)")
        return _chat_segments(tokenizer, example["messages"], example["prompt_turns"])
    prompt, response = prompt_and_response(example)
    if example_kind(example) == "completion":  # TRL's standard form: the text continues as it stands
        return [(prompt, False), (response + (tokenizer.eos_token or ""), True)]
    if chat:
        return _chat_segments(tokenizer, [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], 0)
    return [(prompt, False), (response_prefix(chat) + response + (tokenizer.eos_token or ""), True)]


def _tokenize(tokenizer: Any, segments: list[tuple[str, bool]], templated: bool) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, target) in enumerate(segments):
        # the first segment gets the tokenizer's special tokens (BOS) unless a template holds them
        ids = encode_prompt(tokenizer, text, templated) if i == 0 else \
            tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if target else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def build_sft_examples(tokenizer: Any, examples: Sequence[dict], max_length: int,
                       chat: bool | None = None) -> list[dict[str, list[int]]]:
    """Tokenize ``examples`` (any kind of ``dude.data.prompts``) for training.

    Args:
        tokenizer: a transformers tokenizer.
        examples: dicts of any kind understood by ``dude.data.prompts.example_kind``.
        max_length: longest sequence kept, in tokens. Longer examples are cut at the
            right end and counted in a warning; an example with no target token left
            within ``max_length`` would have nothing to learn and is dropped (also counted).
        chat: use the chat template (default: when the tokenizer has one).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    chat = use_chat(tokenizer, chat)
    out: list[dict[str, list[int]]] = []
    truncated = dropped = 0
    for example in examples:
        templated = chat and example_kind(example) != "completion"
        input_ids, labels = _tokenize(tokenizer, sft_segments(tokenizer, example, chat), templated)
        if len(input_ids) > max_length:
            if all(t == IGNORE_INDEX for t in labels[:max_length]):
                dropped += 1
                continue
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        out.append({"input_ids": input_ids, "labels": labels})
    if truncated or dropped:
        warnings.warn(
            f"{truncated + dropped} of {len(examples)} examples are longer than "
            f"max_length={max_length} tokens: {truncated} truncated, {dropped} dropped "
            "(no response token within max_length)", stacklevel=2)
    if not out:
        raise ValueError(f"no training example left (of {len(examples)}) with max_length={max_length} "
                         "(data.max_length)")
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
