"""Left-padded batches of tokenized prompts, shortest first (shared by both evaluators)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its eos token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither pad_token nor eos_token")
    return pad_id


def left_padded_batches(prompts: Sequence[list[int]], batch_size: int,
                        pad_id: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``(rows, ids, mask)`` per batch: ``rows`` index ``prompts``; ``ids`` and ``mask`` are
    (len(rows), width) with the padding on the LEFT, so the last position of every row is
    its own last prompt token. Prompts are sorted by length to waste little padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(prompts[i])
            ids[j, width - n:] = torch.tensor(prompts[i])
            mask[j, width - n:] = 1
        yield rows, ids, mask
