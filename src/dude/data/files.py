"""User data files: JSON, JSONL or parquet, read with ``datasets`` (offline, local files only).

The format is recognised from the column names (``dude.data.formats``: TRL's
``messages`` and ``prompt``/``completion``, ShareGPT, Alpaca, MetaMathQA, and dude's own
``math``, ``multiple_choice`` and ``instruction``), or named with ``format``; ``columns``
renames the file's columns first, for anything else. Math answers are GSM8K style (final
``#### n``; a bare number becomes ``#### n``); multiple-choice answers are a 0-based
index or a letter A-J.

Every problem raises an error that names the path, the row, the option and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .formats import FILE_FORMATS, RowError, detect_format, to_example
from .prompts import example_kind

__all__ = ["FILE_FORMATS", "describe", "load_file", "read_file"]

_NUMBER = re.compile(r"^-?\$?\d[\d,]*(\.\d+)?$|^-?\$?\.\d+$")


def _builder(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".json", ".jsonl", ".json.gz", ".jsonl.gz"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"data file {str(path)!r}: unsupported extension {suffix!r} "
                     "(use .json, .jsonl or .parquet)")


def _math_answer(answer: object, row: int, path: Path) -> str:
    text = str(answer).strip()
    final = text.rsplit("####", 1)[-1].strip() if "####" in text else text
    if not _NUMBER.match(final):
        raise ValueError(f"data file {str(path)!r}, row {row}: field 'answer' must end with "
                         f"'#### <number>' (or be a number), got final answer {final[:40]!r}")
    return text if "####" in text else f"#### {text}"


def _mc_answer(example: dict, row: int, path: Path) -> int:
    answer, choices = example["answer"], example["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"data file {str(path)!r}, row {row}: field 'choices' must be a list "
                         f"of at least 2 strings, got {choices!r:.60}")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = ord(answer.strip().upper()) - 65
    elif isinstance(answer, (int, str)) and str(answer).strip().isdigit():
        index = int(answer)
    else:
        raise ValueError(f"data file {str(path)!r}, row {row}: field 'answer' must be a choice "
                         f"index or letter, got {answer!r}")
    if not 0 <= index < len(choices):
        raise ValueError(f"data file {str(path)!r}, row {row}: field 'answer'={answer!r} is out "
                         f"of range for {len(choices)} choices")
    return index


def _rename(ds, columns: dict[str, str] | None, path: Path):
    """Apply the ``columns`` option: ``{format field: column of the file}``."""
    if not columns:
        return ds
    missing = [c for c in columns.values() if c not in ds.column_names]
    if missing:
        raise ValueError(f"option 'columns' names column(s) {missing} that data file {str(path)!r} lacks; "
                         f"it has {ds.column_names}")
    clash = [f for f, c in columns.items() if f in ds.column_names and f not in columns.values() and f != c]
    ds = ds.remove_columns(clash)  # a mapped column replaces one of the same name
    return ds.rename_columns({c: f for f, c in columns.items() if f != c})


def _parse_problem(path: Path, err: Exception) -> str:
    """What went wrong reading ``path``: the first bad line of a JSONL file, else the
    innermost error that ``datasets`` wrapped."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    if line.strip():
                        json.loads(line)
                except ValueError as bad:  # JSONDecodeError and UnicodeDecodeError
                    return f"line {number} is not valid JSON ({bad})"[:300]
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"[:300]


def _example(row: dict, fmt: str, i: int, path: Path) -> dict:
    try:
        ex = to_example(row, fmt)
    except RowError as err:
        raise ValueError(f"data file {str(path)!r}, row {i}: {err}") from None
    for key, value in ex.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"data file {str(path)!r}, row {i}: field {key!r} is empty")
    if fmt == "math":
        ex["question"], ex["answer"] = str(ex["question"]), _math_answer(ex["answer"], i, path)
    elif fmt == "multiple_choice":
        ex["answer"] = _mc_answer(ex, i, path)
        ex["choices"] = [str(c) for c in ex["choices"]]
    return ex


def read_file(path: str | Path, format: str | None = None, limit: int | None = None,
              columns: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """``(examples, format)`` of a user data file; see ``load_file``."""
    import datasets

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist or is not a file (option 'path')")
    if format is not None and format not in FILE_FORMATS:
        raise ValueError(f"unknown data format {format!r} (option 'format'); "
                         f"choose from {sorted(FILE_FORMATS)}")
    builder = _builder(path)
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty (0 bytes)")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in many types
        problem = _parse_problem(path, err)
        raise ValueError(f"data file {str(path)!r} could not be read as {builder}: {problem}") from err
    ds = _rename(ds, columns, path)
    fmt = format or detect_format(list(ds.column_names), path)
    missing = [c for c in FILE_FORMATS[fmt][0] if c not in ds.column_names]
    if missing:
        raise ValueError(f"data file {str(path)!r} lacks column(s) {missing} needed by format "
                         f"{fmt!r}; it has {ds.column_names} (option 'columns' renames them)")
    if len(ds) == 0:
        raise ValueError(f"data file {str(path)!r} is empty (no rows)")
    rows = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    return [_example(row, fmt, i, path) for i, row in enumerate(rows)], fmt


def describe(path: str | Path, fmt: str, examples: list[dict]) -> str:
    """One line saying what was recognised, e.g. for the training log."""
    required, optional = FILE_FORMATS[fmt]
    cols = ", ".join(required) + "".join(f", optional {c}" for c in optional)
    kinds = sorted({example_kind(ex) for ex in examples})
    return f"data file {str(path)!r}: format {fmt!r} ({cols}) -> {len(examples)} {'/'.join(kinds)} examples"


def load_file(path: str | Path, format: str | None = None, limit: int | None = None,
              columns: dict[str, str] | None = None) -> list[dict]:
    """Read a user data file into example dicts (kinds of ``dude.data.prompts``).

    Args:
        path: a .json, .jsonl (optionally .gz) or .parquet file.
        format: one of ``FILE_FORMATS``; recognised from the columns when ``None``.
        limit: keep the first ``limit`` rows.
        columns: rename the file's columns first: ``{format field: file column}``, e.g.
            ``{"prompt": "question_text", "response": "answer_text"}``.
    """
    return read_file(path, format, limit, columns)[0]
