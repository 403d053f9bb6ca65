"""User data files: JSON, JSONL or parquet, read with ``datasets`` (offline, local files only).

Three formats, matching ``dude.data.prompts``:

- ``math``:            columns ``question``, ``answer`` (GSM8K style, final ``#### n``;
                       a bare number is accepted and becomes ``#### n``)
- ``multiple_choice``: columns ``question``, ``choices`` (list of str), ``answer``
                       (0-based index, or a letter A-J)
- ``instruction``:     columns ``prompt``, ``response``

Every problem raises an error that names the path, the option and the field.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["FILE_FORMATS", "load_file"]

FILE_FORMATS = {
    "math": ("question", "answer"),
    "multiple_choice": ("question", "choices", "answer"),
    "instruction": ("prompt", "response"),
}
_NUMBER = re.compile(r"^-?\$?\d[\d,]*(\.\d+)?$|^-?\$?\.\d+$")


def _builder(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".json", ".jsonl", ".json.gz", ".jsonl.gz"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"data file {str(path)!r}: unsupported extension {suffix!r} "
                     "(use .json, .jsonl or .parquet)")


def _guess_format(columns: list[str], path: Path) -> str:
    if "choices" in columns:
        return "multiple_choice"
    if "question" in columns and "answer" in columns:
        return "math"
    if "prompt" in columns and "response" in columns:
        return "instruction"
    raise ValueError(f"data file {str(path)!r} has columns {columns}; cannot tell its format: "
                     f"expected one of {FILE_FORMATS}")


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


def load_file(path: str | Path, format: str | None = None, limit: int | None = None) -> list[dict]:
    """Read a user data file into example dicts of one of ``FILE_FORMATS``.

    Args:
        path: a .json, .jsonl (optionally .gz) or .parquet file.
        format: ``math``, ``multiple_choice`` or ``instruction``; guessed from the columns
            when ``None``.
        limit: keep the first ``limit`` rows.
    """
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (option 'path')")
    if format is not None and format not in FILE_FORMATS:
        raise ValueError(f"unknown data format {format!r} (option 'format'); "
                         f"choose from {sorted(FILE_FORMATS)}")
    builder = _builder(path)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in many types
        raise ValueError(f"data file {str(path)!r} could not be read as {builder}: "
                         f"{type(err).__name__}: {err}") from err
    columns = list(ds.column_names)
    fmt = format or _guess_format(columns, path)
    missing = [c for c in FILE_FORMATS[fmt] if c not in columns]
    if missing:
        raise ValueError(f"data file {str(path)!r} lacks column(s) {missing} needed by format "
                         f"{fmt!r}; it has {columns}")
    if len(ds) == 0:
        raise ValueError(f"data file {str(path)!r} is empty (no rows)")
    rows = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    out = []
    for i, row in enumerate(rows):
        ex = {k: row[k] for k in FILE_FORMATS[fmt]}
        for key, value in ex.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"data file {str(path)!r}, row {i}: field {key!r} is empty")
        if fmt == "math":
            ex["question"], ex["answer"] = str(ex["question"]), _math_answer(ex["answer"], i, path)
        elif fmt == "multiple_choice":
            ex["answer"] = _mc_answer(ex, i, path)
            ex["choices"] = [str(c) for c in ex["choices"]]
        out.append(ex)
    return out
