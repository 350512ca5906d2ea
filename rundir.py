"""The run directory: one training process at a time (a lock naming it), and never a new run over an
earlier one unless asked (--resume continues it, --run.overwrite replaces it)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do instead."""


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def lock(out: Path) -> None:
    """<out>/.lock names the process training into `out`; a second one is refused instead of interleaving
    checkpoints and metrics. The lock appears whole (written beside it, then hard-linked into place), so one
    whose owner cannot be read (empty or garbled: a disk that filled up, an older version killed between
    create and write) or whose process is gone (same host) is stale: it is taken over, with a message."""
    lock = out / ".lock"
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "since": time.time(),
    }
    tmp = out / f".lock.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(me))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunDirError(
            f"cannot write the lock of {out} ({e.strerror}): free some space or fix the folder"
        ) from None
    try:
        for _ in range(3):
            try:
                _place(tmp, lock)
                return
            except FileExistsError:
                holder = _holder(lock)
            if holder == {}:
                continue  # released meanwhile
            stale = _stale_reason(holder, me["host"])
            if stale is None:
                raise RunDirError(
                    f"{out} is in use by pid {holder['pid']} on {holder['host']} "
                    f"({holder.get('command', '?')}): wait for it or choose another --run.out; if that "
                    f"process is gone, delete {lock}"
                )
            log.warning("%s: taking over a stale lock (%s)", lock, stale)
            lock.unlink(missing_ok=True)
        raise RunDirError(f"{lock} keeps reappearing: another process is claiming {out}; try again")
    finally:
        tmp.unlink(missing_ok=True)


def _place(tmp: Path, lock: Path) -> None:
    """Create `lock` with the content of `tmp` at once (FileExistsError when it exists)."""
    try:
        os.link(tmp, lock)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: create exclusively, then write
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())


def _holder(lock: Path) -> dict | None:
    """The owner a lock names, or None when it cannot be read."""
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return {}  # released meanwhile: try again
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = (
        isinstance(holder, dict)
        and isinstance(holder.get("pid"), int)
        and isinstance(holder.get("host"), str)
    )
    return holder if ok else None


def _stale_reason(holder: dict | None, host: str) -> str | None:
    """Why a lock's owner is gone, or None while it may still be training."""
    if holder is None:
        return "its owner cannot be read: it was never written completely"
    if holder["host"] == host and not _alive(holder["pid"]):
        return f"pid {holder['pid']} has ended"
    return None


def unlock(out: Path) -> None:
    lock = out / ".lock"
    holder = _holder(lock) if lock.exists() else None
    if holder and holder.get("pid") == os.getpid():
        lock.unlink()


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
