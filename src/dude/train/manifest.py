"""Checkpoint manifests: the size and sha256 of every file, written before the checkpoint
is committed and checked before it is resumed.

A one-file checkpoint ``step-000040.pt`` has its manifest beside it,
``step-000040.pt.manifest.json``, written (temporary file, fsync, rename) before the
checkpoint itself is renamed into place: a ``.pt`` under its final name always has its
manifest. A folder of shards ``step-000040/`` holds ``manifest.json`` (every other file of
the folder) before the folder is renamed into place. Manifest format::

    {"format": 1, "files": {"<name relative to the checkpoint>": {"bytes": N, "sha256": "..."}}}

A checkpoint without a manifest was written by an earlier dude; ``check`` says so and the
caller decides (a one-file checkpoint is then checked by loading it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..safe_write import write_bytes_atomic

FOLDER_NAME = "manifest.json"
SUFFIX = ".manifest.json"
_CHUNK = 1 << 22


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_of(checkpoint: Path) -> Path:
    """Where the manifest of ``checkpoint`` (a file or a folder of shards) lives."""
    return checkpoint / FOLDER_NAME if checkpoint.is_dir() else checkpoint.with_name(checkpoint.name + SUFFIX)


def describe(files: dict[str, Path]) -> dict:
    """The manifest of ``files`` ({name in the checkpoint: path on disk now})."""
    return {"format": 1, "files": {name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
                                   for name, p in sorted(files.items())}}


def write_for_file(staged: Path, final: Path) -> Path:
    """The manifest of the one-file checkpoint ``final``, read from its staged copy, written
    next to ``final`` (before the caller renames ``staged`` to ``final``)."""
    target = final.with_name(final.name + SUFFIX)
    write_bytes_atomic(target, json.dumps(describe({final.name: staged}), indent=1).encode())
    return target


def write_for_folder(folder: Path) -> Path:
    """``folder/manifest.json`` of every file under ``folder`` (written before the folder is committed)."""
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and p.name != FOLDER_NAME}
    target = folder / FOLDER_NAME
    write_bytes_atomic(target, json.dumps(describe(files), indent=1).encode())
    return target


def check(checkpoint: Path) -> str | None:
    """None if ``checkpoint`` matches its manifest; else what is wrong, in a few words
    ('no manifest' for a checkpoint written before manifests existed)."""
    where = path_of(checkpoint)
    if not where.is_file():
        return "no manifest"
    try:
        files = json.loads(where.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its manifest {where.name} is unreadable"
    root = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for name, want in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, its manifest says {want['bytes']}"
        if sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256 checksum"
    return None
