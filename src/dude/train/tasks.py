"""Config -> data: the training examples of ``data.task`` and the eval sets by name.

Eval set names (``eval.tasks``):

- ``heldout``: the training task's held-out split: for ``gsm_symbolic`` variants of
  templates never trained on (out of distribution); for ``file``
  the file ``data.eval_path``, or without one the seeded ``data.eval_fraction`` of the
  training file that training leaves out (``dude eval`` of a run folder reads these
  options from the run's ``config.yaml``).
- ``heldout_variants``: ``gsm_symbolic`` only: new variants of the trained templates,
  never trained on (in distribution).
- ``gsm_original``: the real GSM8K problems of the held-out templates.
- ``mmlu``: the 282 MMLU dev questions (knowledge retention, by accuracy).
- ``mmlu_explanations``: the same questions with their worked explanations, scored by
  response loss: text a math task does not teach (forgetting, after - before).
- any task name of ``dude.data.TASKS``: its test split.
- ``file:<path>``: a JSON/JSONL/parquet file in any format (from its columns), e.g.
  GSM8K's test set or MMLU's test set, where the user has them.

Math sets are scored by exact match of greedy answers and/or the loss on their worked
solutions (``eval.math_scores``), multiple-choice sets by accuracy, text sets
(instruction or conversation) by the loss on their response tokens.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..data import TASKS, build_sft_examples, collate_sft, describe, held_out, load_task, read_file
from .config import EVAL_ALIASES, DataConfig


def _file_options(data: DataConfig) -> dict[str, Any]:
    return {"format": data.format, "columns": data.columns or None}


def _split_file(data: DataConfig) -> bool:
    """Whether training leaves out ``data.eval_fraction`` of its file for 'heldout'."""
    return data.task == "file" and not data.eval_path and data.eval_fraction > 0


def train_examples(data: DataConfig, log: bool = False) -> list[dict]:
    if data.task != "file":
        return load_task(data.task, "train", limit=data.limit, seed=data.split_seed)
    examples, fmt = read_file(data.path, data.format, None if _split_file(data) else data.limit,
                              data.columns or None)
    if log:
        print(describe(data.path, fmt, examples))
    if _split_file(data):
        examples = held_out(examples, "train", data.eval_fraction, data.split_seed, "data.path")[:data.limit]
        if log:
            print(f"data: {len(examples)} of them for training, eval set 'heldout' holds the rest "
                  f"(data.eval_fraction={data.eval_fraction}, data.split_seed={data.split_seed})")
    return examples


def training_set(data: DataConfig, tokenizer: Any, log: bool = True) -> tuple[list[dict], Callable]:
    """Tokenized training examples (loss on responses only) and their collate function."""
    raw = train_examples(data, log)
    if not raw:
        raise ValueError(f"data.task {data.task!r} gave no training examples")
    examples = build_sft_examples(tokenizer, raw, data.max_length, chat=data.chat)
    if log:
        lengths = sorted(len(e["input_ids"]) for e in examples)
        print(f"data: {len(examples)} training examples of {data.task!r}, "
              f"tokens median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    return examples, partial(collate_sft, pad_token_id=tokenizer.pad_token_id)


def eval_examples(name: str, data: DataConfig, limit: int | None) -> list[dict]:
    """The examples of eval set ``name`` (see the module docstring)."""
    if name == "heldout":
        if data.task == "file" and data.eval_path:
            return load_task("file", path=data.eval_path, limit=limit, **_file_options(data))
        if data.task == "file":
            if not _split_file(data):
                raise ValueError("eval set 'heldout' of data.task 'file' needs data.eval_path (a held-out file) "
                                 "or data.eval_fraction > 0 (a share of the training file)")
            return load_task("file", "test", path=data.path, limit=limit, seed=data.split_seed,
                             test_fraction=data.eval_fraction, **_file_options(data))
        return load_task(data.task, "test", limit=limit, seed=data.split_seed)
    if name == "heldout_variants":
        if data.task != "gsm_symbolic":
            raise ValueError(f"eval set 'heldout_variants' is for data.task gsm_symbolic, not {data.task!r}; "
                             "use 'heldout'")
        return load_task("gsm_symbolic", "heldout_variants", limit=limit, seed=data.split_seed)
    if name == "gsm_original":
        return load_task("gsm_symbolic", "test_original", limit=limit, seed=data.split_seed)
    if name == "mmlu":
        return load_task("mmlu_dev", limit=limit)
    if name.startswith("file:"):
        return load_task("file", path=name[len("file:"):], limit=limit)
    if name in TASKS and name != "file":
        return load_task(name, "test", limit=limit, seed=data.split_seed)
    raise ValueError(f"unknown eval task {name!r} in eval.tasks; use {list(EVAL_ALIASES)}, "
                     f"file:<path>, or one of {list(TASKS)}")


def check_files(tasks: list[str], data: DataConfig) -> None:
    """Fail before loading the model or training, not after, on a data file that is not there,
    cannot be read, or whose format or columns do not fit (its first row is converted; the
    rest when training starts: ``datasets`` caches the parsed file, so this costs little)."""
    if data.task == "file" and not Path(data.path or "").is_file():
        raise FileNotFoundError(f"data.path: the training file {data.path!r} does not exist or is not a file")
    if data.task == "file":
        read_file(data.path, data.format, 1, data.columns or None)
    if "heldout" in tasks and data.task == "file" and not data.eval_path and not _split_file(data):
        eval_examples("heldout", data, 1)  # the error naming both ways out, before any training
    if "heldout_variants" in tasks:
        eval_examples("heldout_variants", data, 1)
    paths = [(t, t[len("file:"):]) for t in tasks if t.startswith("file:")]
    if "heldout" in tasks and data.task == "file" and data.eval_path:
        paths.append(("heldout", data.eval_path))
    for name, path in paths:
        if not path or not Path(path).is_file():
            option = "data.eval_path" if name == "heldout" else "eval.tasks"
            raise FileNotFoundError(f"{option}: eval set {name!r} needs a file, {path!r} is not one")
        heldout = name == "heldout"  # the training task's eval file reads as its training file
        read_file(path, data.format if heldout else None, 1, (data.columns or None) if heldout else None)
