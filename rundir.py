"""The run directory: one training process at a time (a lock naming it), and never a new run over an
earlier one unless asked (--resume continues it, --run.overwrite replaces it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do instead."""


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def lock(out: Path) -> None:
    """<out>/.lock names the process training into `out`; a second one is refused instead of interleaving
    checkpoints and metrics. A lock whose process is gone (same host) is taken over."""
    lock = out / ".lock"
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "since": time.time(),
    }
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = json.loads(lock.read_text() or "{}")
            if holder.get("host") == me["host"] and not _alive(holder.get("pid", -1)):
                lock.unlink(missing_ok=True)  # stale: its process died without cleaning up
                continue
            raise RunDirError(
                f"{out} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                f"({holder.get('command', '?')}): wait for it or choose another --run.out; if that process "
                f"is gone, delete {lock}"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


def unlock(out: Path) -> None:
    lock = out / ".lock"
    if lock.exists() and json.loads(lock.read_text() or "{}").get("pid") == os.getpid():
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
