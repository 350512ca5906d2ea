"""The run directory: one training process at a time (a lock naming it), and never a new run over an
earlier one unless asked (--resume continues it, --run.overwrite replaces it)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import dirlock

log = logging.getLogger(__name__)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do instead."""


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def lock(out: Path) -> None:
    """<out>/.lock names the process training into `out` and holds its flock (dirlock); a second one is
    refused instead of interleaving checkpoints and metrics. A lock file left behind whose owner cannot be
    read (empty or garbled: a disk that filled up, an older version killed between create and write), whose
    process is gone (same host) or that no longer holds its flock (a pid since reused) is stale: it is taken
    over, with a message. One naming another host is not: flock may not reach across hosts on a network file
    system, and a record written by an older version (no flock) is trusted while its process lives."""
    path = out / ".lock"
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "since": time.time(),
        "flock": True,  # an owner that holds the flock while it lives (a record without it: an older version)
    }
    left_behind = path.exists()
    try:
        fd = dirlock.try_acquire(path)
    except OSError as e:
        raise _unwritable(out, e) from None
    if fd is None:
        raise _in_use(out, path, dirlock.read_record(path), held=True)
    holder = _holder(path) if left_behind else {}
    if holder != {}:  # a record left behind: its owner let the flock go, or never held one
        stale = _stale_reason(holder, me["host"])
        if stale is None:
            dirlock.release(fd)
            raise _in_use(out, path, holder, held=False)
        log.warning("%s: taking over a stale lock (%s)", path, stale)
    try:
        dirlock.write_record(fd, me)
    except OSError as e:
        dirlock.release(fd, path)
        raise _unwritable(out, e) from None
    _held_locks[path.absolute()] = fd


# The lock files this process holds -> their descriptors (closing one releases its flock).
_held_locks: dict[Path, int] = {}


def _unwritable(out: Path, e: OSError) -> RunDirError:
    if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
        return RunDirError(
            f"the file system of {out} has no file locks (flock: {e.strerror}): choose a --run.out on one "
            f"that has (a local disk, NFS)"
        )
    return RunDirError(f"cannot write the lock of {out} ({e.strerror}): free some space or fix the folder")


def _in_use(out: Path, path: Path, holder: dict | None, *, held: bool) -> RunDirError:
    """`held`: a live process holds the flock (deleting the file would not stop it, only unlock `out`)."""
    if not holder:  # held, its record not written yet (or unreadable)
        who = "another process"
    else:
        who = f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')})"
    advice = "" if held else f"; if that process is gone, delete {path}"
    return RunDirError(f"{out} is in use by {who}: wait for it or choose another --run.out{advice}")


def _holder(lock: Path) -> dict | None:
    """The owner a lock names, {} when there is no lock file, or None when it cannot be read."""
    holder = dirlock.read_record(lock)
    if holder == {}:
        return {}
    ok = (
        isinstance(holder, dict)
        and isinstance(holder.get("pid"), int)
        and isinstance(holder.get("host"), str)
    )
    return holder if ok else None


def _stale_reason(holder: dict | None, host: str) -> str | None:
    """Why a free lock's owner is gone, or None while it may still be training."""
    if holder is None:
        return "its owner cannot be read: it was never written completely"
    if holder["host"] != host:
        return None
    if not _alive(holder["pid"]):
        return f"pid {holder['pid']} has ended"
    if holder.get("flock") is True:
        return f"pid {holder['pid']} no longer holds it (its lock was released: the pid has been reused)"
    return None


def unlock(out: Path) -> None:
    path = out / ".lock"
    fd = _held_locks.pop(path.absolute(), None)
    if fd is not None:
        dirlock.release(fd, path)
        return
    holder = _holder(path) if path.exists() else None
    if holder and holder.get("pid") == os.getpid():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(out: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create and lock the run directory; never train over an earlier run unless told to."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--run.out {out}: cannot create the run directory ({e.strerror})") from None
    if holds_run(out) and not resume and not overwrite:
        raise RunDirError(
            f"{out} already holds a run ({', '.join(n for n in RUN_FILES if (out / n).exists())}): "
            f"continue it with --resume, train into another --run.out, or replace it with --run.overwrite"
        )
    lock(out)
    if holds_run(out) and overwrite and not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "tb", ignore_errors=True)
    return out


def fresh(out: str) -> str:
    """`out`, or `out-2`, `out-3`, ... when `out` already holds a run (for a preset's default directory)."""
    n = 1
    path = Path(out)
    while holds_run(path):
        n += 1
        path = Path(f"{out}-{n}")
    return str(path)
