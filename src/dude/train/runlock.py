"""One run per folder: an exclusive lock on ``<folder>/.dude.lock`` while a run writes there.

``fcntl.flock`` on an open file: the kernel releases it when the process ends, however
it ends, so a lock left by a killed run never blocks the next one. The holder writes its
pid, host, command and start time into the file, so a refused run can name it. On a
clean release the file is deleted while still locked; a process that opened it just
before takes the lock on an unlinked file, sees that the path now names another file (or
none), and tries again, so two holders can never both believe they have the folder.
flock does not reach across NFS clients on every system: two machines writing one shared
folder are not guarded by it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from . import distributed

NAME = ".dude.lock"


class FolderBusy(ValueError):
    """Another process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(folder, "dude train"):`` holds ``folder``'s lock (the folder must exist)."""

    def __init__(self, folder: str | os.PathLike, command: str, what: str = "run.output_dir"):
        self.path = Path(folder) / NAME
        self.command, self.what = command, what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise FolderBusy(self._refusal(holder)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and deleted it between our open and flock: again
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refusal(self, holder: dict | None) -> str:
        folder = str(self.path.parent)
        who = (f"{holder.get('command', 'a dude process')} (pid {holder.get('pid')} on {holder.get('host')}, "
               f"since {holder.get('started')})" if holder else "another dude process (starting up)")
        return (f"{self.what} {folder!r} is in use by {who}: two runs in one folder overwrite each other's files; "
                "wait for it to end or stop it, or choose another folder")


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "null")
    except (OSError, ValueError):
        return None


@contextmanager
def held_by_main(folder: Path, d: "distributed.Dist", command: str) -> Iterator[None]:
    """Rank 0 holds ``folder``'s lock for the duration (creating the folder); when another
    process holds it, every rank raises ``FolderBusy`` with the same message."""
    from . import distributed

    lock = FolderLock(folder, command)

    def take() -> str | None:
        if folder.exists() and not folder.is_dir():
            return None  # not a folder: rundir.prepare refuses it
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except FolderBusy as err:
            return str(err)
        return None

    refusal = distributed.from_main(d, take)
    if refusal:
        raise FolderBusy(refusal)
    try:
        yield
    finally:
        lock.release()
