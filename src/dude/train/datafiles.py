"""The data files a run read, by content: ``data-files.json`` in the run folder.

A file run's training order and its held-out split are functions of its files' bytes: a
file edited after training would silently give other rows. ``dude train`` records the
sha256 of ``data.path`` and ``data.eval_path``; ``--resume`` and ``dude eval --adapter RUN``
(when it scores the run's own split) refuse a file that changed or is gone.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cache import sha256_file
from .config import DataConfig
from .rundir import write_json

NAME = "data-files.json"


def digests(data: DataConfig) -> dict[str, dict[str, str]]:
    """``{"data.path": {"file", "sha256"}, ...}`` of a file task; empty for built-in tasks."""
    if data.task != "file":
        return {}
    files = (("data.path", data.path), ("data.eval_path", data.eval_path))
    return {option: {"file": str(path), "sha256": sha256_file(Path(path))} for option, path in files if path}


def record(out: Path, data: DataConfig) -> None:
    found = digests(data)
    if found:
        write_json(out / NAME, found)


def check(out: Path, consequence: str) -> None:
    """Refuse when a file the run in ``out`` read is gone or differs; ``consequence`` says
    what using it would do. Runs from before this record existed pass unchecked."""
    path = out / NAME
    if not path.is_file():
        return
    for option, entry in json.loads(path.read_text()).items():
        file = Path(entry["file"])
        if not file.is_file():
            raise FileNotFoundError(f"{option} {entry['file']!r}, which the run in {str(out)!r} read, is not there "
                                    f"(from {str(Path.cwd())!r}); {consequence}")
        if sha256_file(file) != entry["sha256"]:
            raise ValueError(f"{option} {entry['file']!r} changed since the run in {str(out)!r} read it (sha256 "
                             f"{entry['sha256'][:12]}..., now {sha256_file(file)[:12]}...); {consequence}")
