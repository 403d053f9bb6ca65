"""Config -> data: the training examples of ``data.task`` and the eval sets by name.

Eval set names (``eval.tasks``):

- ``heldout``: the training task's held-out split: for ``gsm_symbolic`` variants of
  templates never trained on; for ``bigbench_*`` the seeded test split; for ``file``
  the file ``data.eval_path``.
- ``gsm_original``: the real GSM8K problems of the held-out templates.
- ``mmlu``: the 282 MMLU dev questions (knowledge retention).
- any task name of ``dude.data.TASKS``: its test split.
- ``file:<path>``: a JSON/JSONL/parquet file of math or multiple-choice examples (format
  from its columns), e.g. GSM8K's test set or MMLU's test set, where the user has them.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..data import TASKS, build_sft_examples, collate_sft, load_task
from .config import DataConfig

EVAL_ALIASES = ("heldout", "gsm_original", "mmlu")


def _file(path: str | None, data: DataConfig, limit: int | None, option: str) -> list[dict]:
    if not path:
        raise ValueError(f"eval task 'heldout' of data.task 'file' needs {option} (a held-out file)")
    return load_task("file", path=path, format=data.format, limit=limit)


def train_examples(data: DataConfig) -> list[dict]:
    if data.task == "file":
        return _file(data.path, data, data.limit, "data.path")
    return load_task(data.task, "train", limit=data.limit, seed=data.split_seed)


def training_set(data: DataConfig, tokenizer: Any, log: bool = True) -> tuple[list[dict], Callable]:
    """Tokenized training examples (loss on responses only) and their collate function."""
    raw = train_examples(data)
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
        if data.task == "file":
            return _file(data.eval_path, data, limit, "data.eval_path")
        return load_task(data.task, "test", limit=limit, seed=data.split_seed)
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
    """Fail before loading the model or training, not after, on a data file that is not there."""
    if data.task == "file" and not Path(data.path or "").is_file():
        raise FileNotFoundError(f"data.path: the training file {data.path!r} does not exist")
    paths = [(t, t[len("file:"):]) for t in tasks if t.startswith("file:")]
    if "heldout" in tasks and data.task == "file":
        paths.append(("heldout", data.eval_path or ""))
    for name, path in paths:
        if not path or not Path(path).is_file():
            option = "data.eval_path" if name == "heldout" else "eval.tasks"
            raise FileNotFoundError(f"{option}: eval set {name!r} needs a file, {path!r} is not one")
