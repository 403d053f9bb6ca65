"""Evaluation of any Hugging Face causal LM (base, dude-patched, merged, or PEFT-wrapped).

- ``evaluate_math``: batched greedy generation (left padding), exact match of the final
  number (``#### n``, else the last number).
- ``evaluate_multiple_choice``: log-likelihood of the answer letter after ``Answer:``,
  as MMLU is usually scored; one batched forward pass per question.
- ``evaluate_response_loss``: instruction or conversation sets, the mean loss on their
  response tokens (as in training).
"""

from __future__ import annotations

from .choice import evaluate_multiple_choice, letter_token_ids
from .extract import extract_answer, normalize_number, numbers_match
from .loss import evaluate_response_loss
from .math import evaluate_math, generate_greedy

__all__ = ["evaluate_math", "evaluate_multiple_choice", "evaluate_response_loss", "extract_answer", "generate_greedy",
           "letter_token_ids", "normalize_number", "numbers_match"]
