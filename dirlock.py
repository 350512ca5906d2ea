"""Lock files that keep two processes from writing into one folder: a run directory (rundir.py), a part of a
preprocess output folder (preprocess/runner.py), a shard cache (pipeline/remote.py).

The lock is an flock on the file, which the kernel releases when its holder ends, even by SIGKILL: a lock is
never left held by a process that is gone. The file itself may stay behind; it carries a record of its holder
(pid, host, command: JSON) for the message of whoever is refused. Imports nothing of the project, so both
preprocess/ and pipeline/ may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A lock file that its releasing holder removes (rundir does) may vanish between our open and our flock; the
# path is then opened again, at most this many times.
REOPENS = 10


def try_acquire(path: Path) -> int | None:
    """An open descriptor holding `path`'s exclusive lock (the file created when missing), or None while
    another process holds it. Close the descriptor (release) to let the lock go.

    The descriptor is checked to still be the file at `path` once locked: a holder that removes its file on
    release leaves a waiter holding a lock on a file nobody else can open."""
    for _ in range(REOPENS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_flock(fd, fcntl.LOCK_EX):
            os.close(fd)
            return None
        if _is_file_at(fd, path):
            return fd
        os.close(fd)
    return None


@contextlib.contextmanager
def holding(path: Path) -> Iterator[None]:
    """Wait for `path`'s exclusive lock and hold it for the block; the file stays."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_held(path: Path) -> bool:
    """Whether a process holds `path`'s lock now (False when there is no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not _try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def write_record(fd: int, record: dict[str, Any]) -> None:
    """Replace the content of a held lock file with its holder's record (OSError when the disk is full)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record a lock file holds; {} when there is no such file, None when it cannot be read (empty: being
    written or never written; garbled)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def release(fd: int, path: Path | None = None) -> None:
    """Let the lock go; with `path`, remove the file first (while still holding it, so nobody else holds a
    lock on the removed file: try_acquire opens it again)."""
    try:
        if path is not None:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino)
