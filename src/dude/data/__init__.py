"""Real data for training and evaluation, and the tokenization for fine-tuning.

    from dude.data import load_task, build_sft_examples, collate_sft
    train = load_task("gsm_symbolic", "train")          # variants of 70 train templates
    same = load_task("gsm_symbolic", "heldout_variants")  # other variants of them (in distribution)
    test = load_task("gsm_symbolic", "test")            # variants of 30 other templates
    mmlu = load_task("mmlu_dev")                         # 282 MMLU dev questions
    mine = load_task("file", "train", path="data.jsonl", format="math")
    alpaca = load_task("file", "test", path="alpaca.jsonl", test_fraction=0.1)  # seeded split

Tasks (``TASKS``): ``gsm_symbolic``, ``mmlu_dev``, ``mmlu_explanations`` (the MMLU dev
questions with their worked explanations, as text), ``gsm8k_fewshot``, and ``file`` (user
JSON/JSONL/parquet in any format of ``dude.data.formats``). All but ``file`` ship inside
the package (``LICENSES.md``). Example kinds: see ``dude.data.prompts``.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .files import FILE_FORMATS, describe, load_file, read_file
from .gsm_symbolic import gsm_symbolic, template_split
from .shipped import gsm8k_fewshot, mmlu_dev, mmlu_dev_explained
from .prompts import example_kind, prompt_and_response
from .sft import IGNORE_INDEX, build_sft_examples, collate_sft

__all__ = ["FILE_FORMATS", "IGNORE_INDEX", "TASKS", "build_sft_examples",
           "collate_sft", "describe", "example_kind", "held_out", "load_file", "load_task",
           "prompt_and_response", "read_file", "removed_task", "task_kind", "template_split"]

TASKS = ("gsm_symbolic", "mmlu_dev", "mmlu_explanations", "gsm8k_fewshot", "file")


def removed_task(name: str) -> str | None:
    """The one-line refusal of a task that dude no longer has, or ``None``.

    The ``bigbench_*`` tasks read BIG-bench's task files out of the ``bigbench==1.0.0``
    sdist, which the package index no longer serves (2026-12): no source for them is left
    that does not vanish, so they are gone rather than failing on a new machine.
    """
    if not name.startswith("bigbench_"):
        return None
    return (f"task {name!r} was removed: its data came from the bigbench==1.0.0 sdist, which the package "
            "index no longer serves; give your own copy of the task as a file (data.task file with data.path "
            "JSON/JSONL, e.g. --task file --path siqa.jsonl: question, choices, answer) or use a shipped task "
            f"({', '.join(t for t in TASKS if t != 'file')})")


def _question(example: dict) -> str:
    """What two examples must not share across a split: the question or prompt text."""
    if "messages" in example:  # everything before the first trained turn (a shared system prompt is not enough)
        messages, start = example["messages"], example["prompt_turns"]
        first = next(i for i, m in enumerate(messages) if i >= start and m["role"] == "assistant")
        return json.dumps(messages[:first])
    return example["question"] if "question" in example else example["prompt"]


def held_out(examples: list[dict], split: str, test_fraction: float, seed: int,
             name: str) -> list[dict]:
    """A seeded train/test cut of a task without an official split.

    Examples that share a question text (some multiple-choice sets repeat an input with
    other choices) stay on one side, so no question is seen in both splits.
    """
    if split not in ("train", "test"):
        raise ValueError(f"{name}: unknown split {split!r}; choose 'train' or 'test'")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{name}: the held-out fraction must be in (0, 1), got {test_fraction}")
    questions = sorted({_question(ex) for ex in examples})
    random.Random(seed).shuffle(questions)
    n_test = round(len(questions) * test_fraction)
    if not 0 < n_test < len(questions):
        raise ValueError(f"{name}: holding out {test_fraction} of {len(questions)} distinct prompts leaves "
                         f"{n_test} for test and {len(questions) - n_test} for training; change the fraction "
                         "(data.eval_fraction; 0: no split) or give a held-out file (data.eval_path)")
    test_questions = set(questions[:n_test])
    chosen = [ex for ex in examples if (_question(ex) in test_questions) == (split == "test")]
    random.Random(seed).shuffle(chosen)  # a limit then takes a random sample
    return chosen


def load_task(name: str, split: str = "train", *, limit: int | None = None,
              seed: int = 0, test_fraction: float | None = None, **options: Any) -> list[dict]:
    """Examples of a task.

    Args:
        name: one of ``TASKS``.
        split: ``train`` or ``test`` (``gsm_symbolic`` also ``heldout_variants``,
            ``test_original`` and ``train_original``; ``mmlu_dev``, ``mmlu_explanations``
            and ``gsm8k_fewshot`` have one split, any value is accepted; ``file`` ignores it
            unless ``test_fraction`` is given: then the file is cut by ``held_out``).
        limit: keep the first ``limit`` examples; splits come in a seeded random order.
        seed: seed of the train/test cut.
        test_fraction: share held out for test (default 0.3 for gsm_symbolic templates;
            none for ``file``).
        options: ``file``: ``path`` (required), ``format`` and ``columns`` (see
            ``dude.data.files.load_file``); ``gsm_symbolic``:
            ``variants_per_template``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if name == "gsm_symbolic":
        examples = gsm_symbolic(split, test_fraction or 0.3, seed, **options)
        random.Random(seed).shuffle(examples)  # mix templates, so a limit takes a random sample
    elif name == "mmlu_dev":
        examples = mmlu_dev()
    elif name == "mmlu_explanations":
        examples = mmlu_dev_explained()
    elif name == "gsm8k_fewshot":
        examples = gsm8k_fewshot()
    elif name == "file":
        if "path" not in options:
            raise ValueError("task 'file' needs option 'path' (a JSON, JSONL or parquet file)")
        unknown = sorted(set(options) - {"path", "format", "columns"})
        if unknown:
            raise ValueError(f"task 'file' takes no option(s) {unknown}")
        if test_fraction is None:
            return load_file(options["path"], options.get("format"), limit, options.get("columns"))
        examples = held_out(load_file(options["path"], options.get("format"), None, options.get("columns")),
                            split, test_fraction, seed, f"data file {str(options['path'])!r}")
    elif removed_task(name):
        raise ValueError(removed_task(name))
    else:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if options and name not in ("gsm_symbolic", "file"):
        raise ValueError(f"task {name!r} takes no option(s) {sorted(options)}")
    return examples[:limit] if limit is not None else examples


def task_kind(examples: list[dict]) -> str:
    """``math``, ``multiple_choice`` or ``instruction``, from the first example."""
    if not examples:
        raise ValueError("empty task: no examples")
    return example_kind(examples[0])
