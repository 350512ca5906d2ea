"""Progress that reads both on a terminal and in a log file.

On a terminal a long job shows a rich bar. Without one (Docker without -t, a Slurm job, `> log`) a bar is
drawn only when it ends, cut to 80 columns, so the log stays silent for hours: there the job writes a plain,
complete log line every few steps instead (`track`, and train.py's per-`--run.log_every` lines).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("progress")


def on_terminal() -> bool:
    """Whether stderr (where bars and logs go) is an interactive terminal that can redraw a bar."""
    from rich.console import Console

    return Console(stderr=True).is_terminal


def clock(seconds: float) -> str:
    """H:MM:SS, the ETA format of rich's bar; '?' before the first estimate."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta_s(done: int, total: int, elapsed_s: float) -> float:
    """Seconds left at the mean rate so far (inf before anything is done)."""
    return (total - done) * elapsed_s / done if done > 0 else float("inf")


def progress_line(what: str, done: int, total: int, elapsed_s: float) -> str:
    """'evaluate runs/a/best.pt: 30/120 batches (25%), 0:00:12, ETA 0:00:36'."""
    share = done / total if total else 1.0
    return (
        f"{what}: {done}/{total} batches ({share:.0%}), {clock(elapsed_s)}, "
        f"ETA {clock(eta_s(done, total, elapsed_s))}"
    )


def line_steps(total: int, lines: int = 10) -> int:
    """Steps between plain lines for about `lines` lines over the whole job."""
    return max(1, -(-total // lines))


def track(items: Iterable[T], total: int, what: str, *, enabled: bool = True) -> Iterator[T]:
    """Yield `items` while showing progress: a transient rich bar on a terminal, else a log line about every
    10% and at the end. Silent when not `enabled` (a rank other than 0)."""
    if not enabled:
        yield from items
        return
    if on_terminal():
        from rich.progress import Progress

        with Progress(*Progress.get_default_columns(), transient=True) as bar:
            task = bar.add_task(what, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    every, start, done = line_steps(total), time.perf_counter(), 0
    for item in items:
        yield item
        done += 1
        if done % every == 0 or done == total:
            log.info("%s", progress_line(what, done, total, time.perf_counter() - start))
