"""Writes that either complete or leave nothing, and say why when the disk is full.

Every file dude writes for keeps (an adapter, a checkpoint, an exported model) goes to a
temporary name, is fsynced and renamed into place. When a write fails (a full disk, a
quota, an I/O error), ``guarded`` removes what was staged and raises ``WriteFailed``: one
line naming the file, the bytes it needed and the bytes free, and the exit code of an I/O
failure (74, ``EX_IOERR`` of sysexits.h). A full disk does not always raise ``OSError``:
``torch.save`` raises ``RuntimeError ... unexpected pos`` and safetensors its own
``SafetensorError ... StorageFull``; both are recognised by their text.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

EXIT_IO = 74  # sysexits.h EX_IOERR: the exit code of a failed write
# What the writers say when the disk is full or a write fails, when they do not raise OSError.
_WRITE_ERROR = re.compile(r"unexpected pos|No space left|StorageFull|os error 28|Errno 28|Disk quota|"
                          r"PytorchStreamWriter failed|failed writing|I/O error|Input/output error", re.I)


class WriteFailed(OSError):
    """A file could not be written; what was staged for it is gone, what was there before is intact."""

    exit_code = EXIT_IO


def human(n: int) -> str:
    """Bytes as a short figure: 512 B, 3.4 MB, 1.2 GB."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict / list / tuple: what ``torch.save`` or safetensors writes, less headers."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor: this rank's shard
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def is_write_error(err: BaseException) -> bool:
    """An error a failing write raises (not a bug of the caller): any OSError, or the text of one."""
    return isinstance(err, OSError) or bool(_WRITE_ERROR.search(str(err)))


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def guarded(target: str | os.PathLike, needed: int, staged: Iterable[str | os.PathLike] = ()) -> Iterator[None]:
    """Run a write of ``needed`` bytes into ``target``; on a write error remove ``staged``
    (temporary files or folders) and raise ``WriteFailed`` naming ``target``, ``needed``
    and the bytes then free. Any other error passes through (the staged paths are removed too)."""
    staged = [Path(p) for p in staged]
    try:
        yield
    except WriteFailed:
        _remove(staged)
        raise
    except BaseException as err:
        _remove(staged)
        if not isinstance(err, Exception) or not is_write_error(err):
            raise
        raise failure(target, needed, err) from err


def failure(target: str | os.PathLike, needed: int, err: BaseException) -> WriteFailed:
    """The one-line ``WriteFailed`` for ``err`` raised while writing ``needed`` bytes to ``target``."""
    free = free_bytes(target)
    code = getattr(err, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or free < needed or re.search(
        r"unexpected pos|No space|StorageFull|os error 28|Errno 28|quota", str(err), re.I)
    if full:
        why = "the disk is full"
        code = errno.ENOSPC
    else:
        why = getattr(err, "strerror", None) or str(err).splitlines()[0][:200]
    return WriteFailed(code or errno.EIO, f"cannot write {str(target)!r}: {why} (it needs {human(needed)}, "
                                          f"{human(free)} free there); nothing partial was left")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (ignored where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``path`` holds ``data`` whole, or keeps what it held: temporary file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with guarded(path, len(data), [tmp]):
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def warn_low_space(folder: str | os.PathLike, needed: int, what: str) -> bool:
    """Print one warning when the disk of ``folder`` has less than ``needed`` bytes free; True if it did."""
    free = free_bytes(folder)
    if free >= needed:
        return False
    print(f"warning: {human(free)} free on the disk of {str(folder)!r}, {what} need about {human(needed)}: "
          "the run may stop with a full disk", file=sys.stderr)
    return True
