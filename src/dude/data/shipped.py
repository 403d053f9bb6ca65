"""Evaluation data that ships inside dude, read from the package (nothing is downloaded).

- ``mmlu_dev.jsonl.gz``: the 282 MMLU dev questions (5 per subject, 57 subjects) with
  their chain-of-thought explanations, from ``lm-eval==0.4.13`` (MIT);
- ``gsm8k_cot_exemplars.jsonl.gz``: the 8 standard GSM8K chain-of-thought exemplars,
  from the same wheel.

``build_lm_eval_data`` regenerates both; ``LICENSES.md`` gives their sources and licences.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from .prompts import mc_prompt

__all__ = ["gsm8k_fewshot", "mmlu_dev", "mmlu_dev_explained", "read_shipped"]

HERE = Path(__file__).parent


@lru_cache(maxsize=None)
def read_shipped(name: str) -> tuple[dict, tuple[dict, ...]]:
    """``(header meta, rows)`` of a shipped gzip JSONL file (line 1 is ``{"meta": ...}``)."""
    with gzip.open(HERE / name, "rt", encoding="utf-8") as f:
        meta = json.loads(f.readline())["meta"]
        rows = tuple(json.loads(line) for line in f if line.strip())
    if len(rows) != meta.get("n", len(rows)):
        raise RuntimeError(f"shipped data file {name} holds {len(rows)} rows, its header says {meta['n']}: "
                           "the installation is damaged; reinstall dude")
    return meta, rows


def mmlu_dev() -> list[dict]:
    """The 282 MMLU dev questions: ``{"question", "choices", "answer": int, "subject"}``."""
    return [{"question": r["question"], "choices": list(r["choices"]), "answer": r["answer"], "subject": r["subject"]}
            for r in read_shipped("mmlu_dev.jsonl.gz")[1]]


def mmlu_dev_explained() -> list[dict]:
    """The MMLU dev questions as text to score: ``{"prompt": question and lettered choices,
    "response": the worked explanation ending "The answer is (X)."}``.

    Science, law and history prose that a math task does not teach: its response loss
    before and after fine-tuning measures forgetting (eval set ``mmlu_explanations``).
    """
    return [{"prompt": mc_prompt(r, r["subject"]), "response": r["explanation"]}
            for r in read_shipped("mmlu_dev.jsonl.gz")[1]]


def gsm8k_fewshot() -> list[dict]:
    """The 8 standard GSM8K chain-of-thought exemplars, in GSM8K format (``#### n``)."""
    return [dict(r) for r in read_shipped("gsm8k_cot_exemplars.jsonl.gz")[1]]
