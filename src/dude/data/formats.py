"""Data file formats, recognised from the column names, and how each row becomes an example.

| format              | columns                                          | example kind     |
|---------------------|--------------------------------------------------|------------------|
| ``messages``        | ``messages``: [{role, content}, ...] (TRL)       | conversation     |
| ``sharegpt``        | ``conversations``: [{from, value}, ...]          | conversation     |
| ``prompt_completion``| ``prompt``, ``completion``: text, or message lists (TRL) | completion / conversation |
| ``alpaca``          | ``instruction``, optional ``input``, ``output``  | instruction      |
| ``metamath``        | ``query``, ``response`` (MetaMathQA)             | instruction      |
| ``multiple_choice`` | ``question``, ``choices``, ``answer``            | multiple choice  |
| ``math``            | ``question``, ``answer`` (GSM8K, ``#### n``)     | math             |
| ``instruction``     | ``prompt``, ``response``                         | instruction      |

Detection takes the first row of this table whose required columns a file has; extra
columns are ignored. Example kinds are those of ``dude.data.prompts``; a conversation is
``{"messages": [{"role", "content"}], "prompt_turns": k}``: the loss covers every
assistant turn from index ``k`` on (0 for ``messages``/``sharegpt``: all of them; the
prompt's length for TRL's conversational prompt/completion, as TRL's completion-only loss).
Alpaca joins ``instruction`` and a non-empty ``input`` with a blank line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FILE_FORMATS", "detect_format", "to_example"]

# name -> (required columns, optional columns); the order is the detection order
FILE_FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "metamath": (("query", "response"), ()),
    "multiple_choice": (("question", "choices", "answer"), ()),
    "math": (("question", "answer"), ()),
    "instruction": (("prompt", "response"), ()),
}
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function_call": "assistant",
                  "observation": "tool"}


class RowError(ValueError):
    """A problem with one field of one row; the file reader adds the path and row number."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r} {problem}")


def detect_format(columns: list[str], path: Path) -> str:
    """The first format of ``FILE_FORMATS`` whose required columns are all present."""
    for name, (required, _) in FILE_FORMATS.items():
        if all(c in columns for c in required):
            return name
    known = "; ".join(f"{n}: {', '.join(r)}" for n, (r, _) in FILE_FORMATS.items())
    raise ValueError(f"data file {str(path)!r} has columns {columns}; cannot tell its format. Known formats "
                     f"({known}); rename columns with option 'columns' (CLI: --columns prompt=my_column)")


def _text(row: dict, field: str, optional: bool = False) -> str:
    value = row.get(field)
    if optional and (value is None or value == ""):
        return ""
    if not isinstance(value, str) or not value.strip():
        raise RowError(field, f"must be a non-empty string, got {value!r:.60}")
    return value


def _messages(value: Any, field: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` from a list of message dicts, each checked."""
    if not isinstance(value, list) or not value:
        raise RowError(field, f"must be a non-empty list of messages, got {value!r:.60}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise RowError(field, f"message {i} must have keys {role_key!r} and {content_key!r}, got {message!r:.80}")
        role, content = message[role_key], message[content_key]
        role = (roles or {r: r for r in ROLES}).get(role) if isinstance(role, str) else None
        if role is None:
            raise RowError(field, f"message {i} has {role_key} {message[role_key]!r}; known: {sorted(roles or ROLES)}")
        if not isinstance(content, str):
            raise RowError(field, f"message {i} {content_key} must be a string, got {content!r:.60}")
        out.append({"role": role, "content": content})
    return out


def _conversation(messages: list[dict[str, str]], prompt_turns: int, field: str) -> dict:
    if not any(m["role"] == "assistant" for m in messages[prompt_turns:]):
        raise RowError(field, "has no assistant message to train on")
    return {"messages": messages, "prompt_turns": prompt_turns}


def _prompt_completion(row: dict) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
        prompt_messages = _messages(prompt, "prompt")
        return _conversation(prompt_messages + _messages(completion, "completion"), len(prompt_messages), "completion")
    return {"prompt": _text(row, "prompt"), "completion": _text(row, "completion")}


def _alpaca(row: dict) -> dict:
    extra = _text(row, "input", optional=True)
    instruction = _text(row, "instruction")
    return {"prompt": f"{instruction}\n\n{extra}" if extra.strip() else instruction,
            "response": _text(row, "output")}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "messages": lambda row: _conversation(_messages(row["messages"], "messages"), 0, "messages"),
    "sharegpt": lambda row: _conversation(
        _messages(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES), 0, "conversations"),
    "prompt_completion": _prompt_completion,
    "alpaca": _alpaca,
    "metamath": lambda row: {"prompt": _text(row, "query"), "response": _text(row, "response")},
    "instruction": lambda row: {"prompt": _text(row, "prompt"), "response": _text(row, "response")},
}


def to_example(row: dict, format: str) -> dict:
    """One row of a file in ``format`` as an example dict (math and multiple choice rows
    are checked by the file reader, which knows their answer formats)."""
    if format in CONVERTERS:
        return CONVERTERS[format](row)
    return {c: row[c] for c in FILE_FORMATS[format][0]}
