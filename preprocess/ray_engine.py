"""`--engine ray`: the shards of the deterministic plan as Ray tasks, one per shard, over a cluster.

Each task processes its shard's pending videos in order and writes the shard into a private attempt folder
(in --out's .records/work/ when --out is a folder every node sees, in the node's temporary folder for an
object-storage --out), then publishes it: files renamed or uploaded into place, then its done record
(storage.publish_shard). The bytes of a shard depend only on the plan, so the output equals the local
engine's, whichever node or attempt wrote it.

The driver keeps as many tasks in flight as the cluster has CPUs, so a task starts when it is submitted and
its run time is measured. A task whose worker or node dies is run again by Ray (`max_retries`, bounded; a
video that fails is a Failure in the record, not a task error). At the tail (every shard submitted), a shard
still running after `straggler_factor` times the median shard time is launched once more, preferably on
another node; the first attempt to finish wins and the other is cancelled. Attempt folders of killed or
cancelled attempts are removed at the end (and counted: `attempts_lost`).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import preprocess
from preprocess import storage
from preprocess.jobs import InputError, RunError
from preprocess.runner import (
    RECORDS,
    Feedback,
    ProcessFn,
    ShardJob,
    ShardWork,
    _write_shard,
    kept_tar,
)
from preprocess.writer import write_json_atomic

log = logging.getLogger("preprocess")
ATTEMPTS = "work"  # .records/work/<stem>.<attempt>: a shard being written by one attempt
POLL_SECONDS = 0.5


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError(
            "--engine ray needs Ray on every node: pip install ray==2.60.0 (the pin of the dev extras)"
        ) from None
    return ray


def build_shard(
    cfg: ShardJob, work: ShardWork, process_fn: ProcessFn, remote: storage.RemoteOutput | None
) -> dict[str, Any]:
    """One attempt at one shard (a Ray task): process, write privately, publish; returns its record."""
    stem = work.plan.stem(cfg.name)
    if remote is None:
        attempt = cfg.out / RECORDS / ATTEMPTS / f"{stem}.{uuid.uuid4().hex}"
    else:
        attempt = Path(tempfile.gettempdir()) / "gcvideo-attempts" / f"{stem}.{uuid.uuid4().hex}"
    (attempt / RECORDS).mkdir(parents=True)
    try:
        old_tar = kept_tar(cfg, work, attempt, remote)
        results = (process_fn(job, cfg.settings) for job in work.todo)
        record = _write_shard(replace(cfg, out=attempt), work, results, None, old_tar)
        storage.publish_shard(attempt, stem, record, remote or cfg.out, RECORDS)
        return record
    finally:
        shutil.rmtree(attempt, ignore_errors=True)


@dataclass
class Attempt:
    work: ShardWork
    started: float
    copy: int  # 0: the first launch, 1: the straggler's second


class Driver:
    """Submits, watches and collects the shard tasks (see the module docstring)."""

    def __init__(self, ray, cfg: ShardJob, process_fn: ProcessFn, feedback: Feedback, remote) -> None:
        self.ray, self.cfg, self.feedback = ray, cfg, feedback
        self.task = ray.remote(build_shard)
        self.process_fn, self.remote = process_fn, remote
        self.running: dict[Any, Attempt] = {}
        self.written: dict[str, dict[str, Any]] = {}
        self.durations: list[float] = []
        self.relaunched = 0

    def stem(self, work: ShardWork) -> str:
        return work.plan.stem(self.cfg.name)

    def slots(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def submit(self, work: ShardWork, copy: int = 0) -> None:
        options = {"scheduling_strategy": "SPREAD"} if copy else {}
        task = self.task.options(num_cpus=1, max_retries=self.cfg.ray_retries, **options)
        ref = task.remote(self.cfg, work, self.process_fn, self.remote)
        self.running[ref] = Attempt(work, time.perf_counter(), copy)

    def run(self, work: list[ShardWork]) -> dict[str, dict[str, Any]]:
        pending = list(reversed(work))  # popped from the end: plan order
        try:
            while pending or self.running:
                while pending and len(self.running) < self.slots():
                    self.submit(pending.pop())
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    self.collect(ref)
                if not pending:
                    self.relaunch_stragglers()
        except BaseException:  # a shard that cannot be written, Ctrl-C: stop the others too
            for ref in self.running:
                self.ray.cancel(ref, force=True)
            raise
        return self.written

    def collect(self, ref) -> None:
        attempt = self.running.pop(ref, None)
        if attempt is None:
            return
        stem = self.stem(attempt.work)
        try:
            record = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            return
        except self.ray.exceptions.RayTaskError as err:  # the task raised: a full disk, a failed upload
            cause = err.cause if isinstance(err.cause, BaseException) else err
            if isinstance(cause, RunError | InputError):
                raise cause from None
            raise RunError(f"shard {stem} failed: {cause}") from None
        except self.ray.exceptions.RayError as err:  # its worker or node died more often than retried
            if any(self.stem(a.work) == stem for a in self.running.values()):
                return  # the other attempt goes on
            raise RunError(
                f"shard {stem} lost its worker or node {self.cfg.ray_retries + 1} times (last: "
                f"{type(err).__name__}): check the cluster (ray status), then run the same command again: "
                f"finished shards are kept"
            ) from None
        if stem in self.written:
            return
        self.written[stem] = record
        self.durations.append(time.perf_counter() - attempt.started)
        for other, a in list(self.running.items()):
            if self.stem(a.work) == stem:
                self.ray.cancel(other, force=True)
                del self.running[other]
        if self.remote is not None:  # the driver's copy of the done record, in the staging folder
            write_json_atomic(self.cfg.out / RECORDS / f"{stem}.json", record)
        seconds = sum(s["source_seconds"] for s in record["samples"] if s["key"] in _keys(attempt.work))
        self.feedback.shard_done(len(attempt.work.todo), len(record["failures"]), seconds)

    def relaunch_stragglers(self) -> None:
        if not self.durations or len(self.running) >= self.slots():
            return
        limit = self.cfg.straggler_factor * statistics.median(self.durations)
        copies = {self.stem(a.work) for a in self.running.values() if a.copy}
        now = time.perf_counter()
        for a in list(self.running.values()):
            stem = self.stem(a.work)
            if stem not in copies and now - a.started > limit and len(self.running) < self.slots():
                log.info(
                    "shard %s runs %.0f s (median %.1f s): launching it again", stem, now - a.started, limit
                )
                self.submit(a.work, copy=1)
                copies.add(stem)
                self.relaunched += 1


def _keys(work: ShardWork) -> set[str]:
    return {job.key for job in work.todo}


def run_shards(
    cfg: ShardJob,
    work: list[ShardWork],
    process_fn: ProcessFn,
    feedback: Feedback,
    remote: storage.RemoteOutput | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Write the shards of `work` on Ray; returns their records and the engine's counts."""
    ray = _ray()
    if remote is None:
        _remove_attempts(cfg)  # a killed earlier run's
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, cfg)
    try:
        driver = Driver(ray, cfg, process_fn, feedback, remote)
        written = driver.run(work) if work else {}
    finally:
        if started_here:
            ray.shutdown()
    lost = _remove_attempts(cfg) if remote is None else 0
    return written, {"relaunched": driver.relaunched, "attempts_lost": lost}


def _connect(ray, cfg: ShardJob) -> None:
    """Join the cluster at --ray-address (or start one on this machine); the preprocess package travels to
    the workers with the job, so nodes need only the same Python packages."""
    kwargs: dict[str, Any] = {"include_dashboard": False} if cfg.ray_address is None else {}
    if cfg.ray_address is None and cfg.workers:
        kwargs["num_cpus"] = cfg.workers
    try:
        ray.init(
            address=cfg.ray_address,
            runtime_env={"py_modules": [str(Path(preprocess.__file__).parent)]},
            log_to_driver=False,
            logging_level=logging.WARNING,
            **kwargs,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise RunError(
            f"cannot join the Ray cluster at {cfg.ray_address or '(a new local one)'}: {err}. Start it with "
            f"`ray start --head` (docs/docker.md) or drop --ray-address"
        ) from None


def _remove_attempts(cfg: ShardJob) -> int:
    """Remove the attempt folders that killed or cancelled attempts left in --out; returns their count."""
    root = cfg.out / RECORDS / ATTEMPTS
    left = [p for p in root.glob("*") if p.is_dir()] if root.is_dir() else []
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    if root.is_dir():
        root.rmdir()
    return len(left)
