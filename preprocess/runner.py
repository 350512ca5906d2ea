"""The job: a deterministic shard plan, a process pool, finished shards skipped on restart, then index.json.

Shard assignment depends only on the inputs and the seed: each split's jobs are shuffled with `seed` (so a
shard mixes classes) and cut into consecutive groups of `shard_samples` jobs. A shard is therefore an
independent unit: restarting skips shards whose tar exists, and `--part i/N` takes every N-th shard.
A target in bytes (`shard_bytes`) is turned into a sample count once, from the mean output size of a pilot of
the first PILOT_VIDEOS planned videos (deterministic, since the encoders are), and kept in .records/plan.json.

A finished shard's record (.records/<stem>.json) lists its samples, its failures and the sizes of its files.
A re-run retries the failed rows of finished shards (a wrong --root, a download that came late): when some now
succeed, the shard is rewritten with its kept samples copied byte for byte from the old tar, so the result is
the shard a single clean run would have written. Shards that are complete and clean are never touched.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import dirlock
from preprocess import __version__, storage
from preprocess.ffmpeg_args import EncodeSettings
from preprocess.jobs import Failure, InputError, Job, RunError, Sample
from preprocess.writer import (
    TMP_SUFFIX,
    KeptSamples,
    ShardWriter,
    shard_stem,
    write_json_atomic,
    write_text_atomic,
)
from shardformat import FORMAT

log = logging.getLogger("preprocess")
RECORDS = ".records"  # per-shard records (samples, failures) of finished shards; what restart and merge read
PILOT_VIDEOS = 8
ProcessFn = Callable[[Job, EncodeSettings], "Sample | Failure"]


@dataclass
class Dataset:
    classes: list[str]
    splits: list[str]
    jobs: list[Job]
    rejected: list[Failure] = field(default_factory=list)  # input rows that name no usable video at all


@dataclass
class ShardJob:
    out: Path
    name: str
    settings: EncodeSettings
    shard_samples: int = 256
    shard_bytes: int | None = None  # a size target instead: converted to shard_samples by a pilot
    workers: int = 0  # 0: every core
    seed: int = 0
    part: tuple[int, int] = (0, 1)
    video_ext: str = "mp4"
    progress: bool = True
    engine: str = "local"  # local: a process pool on this machine; ray: a task per shard on a Ray cluster
    ray_address: str | None = None  # None: start a Ray instance on this machine
    ray_retries: int = 3  # times a shard's task is run again when its worker or node dies
    straggler_factor: float = 3.0  # at the tail, shards running this many median shard times run again
    remote: str | None = None  # --out as an fsspec URL (s3://...): `out` is then the local staging folder


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    jobs: tuple[Job, ...]

    def stem(self, name: str) -> str:
        return shard_stem(name, self.split, self.number)


@dataclass(frozen=True)
class ShardWork:
    """What a run does to one shard: process `todo` (every job of a new shard, the failed jobs of a finished
    one) and write the shard, keeping the samples that `previous` (the finished shard's record) lists."""

    plan: ShardPlan
    todo: tuple[Job, ...]
    previous: dict[str, Any] | None = None


def plan_shards(dataset: Dataset, shard_samples: int, seed: int) -> list[ShardPlan]:
    plans = []
    for split in dataset.splits:
        jobs = [j for j in dataset.jobs if j.split == split]
        order = np.random.default_rng([seed, _stable_hash(split)]).permutation(len(jobs))
        jobs = [jobs[i] for i in order]
        for number, start in enumerate(range(0, len(jobs), shard_samples)):
            plans.append(ShardPlan(split, number, tuple(jobs[start : start + shard_samples])))
    return plans


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little")


def part_of(plans: list[ShardPlan], part: tuple[int, int]) -> list[ShardPlan]:
    index, count = part
    return [p for i, p in enumerate(plans) if i % count == index]


def tool_versions() -> dict[str, str]:
    import av

    try:
        first = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
        ffmpeg_version = first.split()[2] if first.startswith("ffmpeg version") else "unknown"
    except OSError:
        ffmpeg_version = "missing"
    return {
        "gcvideo": __version__,
        "ffmpeg": ffmpeg_version,
        "python": platform.python_version(),
        "av": av.__version__,
    }


def settings_record(cfg: ShardJob) -> dict[str, Any]:
    return {
        **asdict(cfg.settings),
        "shard_samples": cfg.shard_samples,
        "shard_bytes": cfg.shard_bytes,
        "seed": cfg.seed,
    }


def resolve_shard_samples(cfg: ShardJob, dataset: Dataset, process_fn: ProcessFn) -> int:
    """Samples per shard for a byte target: the value of an earlier run into this output, or a pilot's."""
    plan_path = cfg.out / RECORDS / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())["settings"]
        if old.get("shard_bytes") == cfg.shard_bytes:
            return old["shard_samples"]
    pilot = [j for p in plan_shards(dataset, PILOT_VIDEOS, cfg.seed) for j in p.jobs][:PILOT_VIDEOS]
    sizes = [len(r.video) for r in _results_for(pilot, process_fn, cfg) if isinstance(r, Sample)]
    if not sizes:
        raise RunError(
            f"none of the {len(pilot)} pilot videos transcoded, so --shard-size in bytes cannot be "
            f"estimated: check failures with a sample count (--shard-samples) first"
        )
    samples = max(1, int(cfg.shard_bytes / (sum(sizes) / len(sizes))))  # type: ignore[operator]
    log.info(
        "shard size %d bytes ~ %d videos per shard (mean of %d pilot videos: %.0f kB)",
        cfg.shard_bytes,
        samples,
        len(sizes),
        sum(sizes) / len(sizes) / 1e3,
    )
    return samples


def _results_for(jobs: list[Job], process_fn: ProcessFn, cfg: ShardJob) -> list[Sample | Failure]:
    return list(_results(jobs, process_fn, cfg.settings, cfg.workers or os.cpu_count() or 1))


def _check_plan(cfg: ShardJob, dataset: Dataset, plans: list[ShardPlan]) -> None:
    """Refuse to mix shards made from other inputs or settings into one output directory."""
    fingerprint = {
        "name": cfg.name,
        "classes": dataset.classes,
        "settings": settings_record(cfg),
        "shards": {p.stem(cfg.name): [j.key for j in p.jobs] for p in plans},
    }
    path = cfg.out / RECORDS / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(fingerprint)):
            raise InputError(
                f"{cfg.out} holds shards made from other inputs or settings ({path} differs): "
                f"use another --out, or delete that directory to start again"
            )
    else:
        write_json_atomic(path, fingerprint)


class Feedback:
    """Rich progress bar: videos/s, realtime factor (seconds of video per second), failures, ETA. Without a
    terminal (Docker, Slurm, `> log`), where a bar would only be drawn at the end, cut to 80 columns, the same
    as a complete log line every 5% of the videos or every minute, whichever comes first."""

    LINE_EVERY_S = 60.0

    def __init__(self, total: int, shards: int, enabled: bool, console: Console) -> None:
        self.start = self.last_line = time.perf_counter()
        self.shards_left = shards
        self.seconds = 0.0
        self.failures = 0
        self.total, self.lines = total, enabled and not console.is_terminal
        self.line_every = max(1, -(-total // 20))
        enabled = enabled and not self.lines
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} videos/s"),
            TextColumn("{task.fields[realtime]}x realtime"),
            TextColumn("[red]{task.fields[failures]} failed"),
            TextColumn("{task.fields[shards]} shards left"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            "transcoding", total=total, rate="-", realtime="-", failures=0, shards=shards
        )

    def update(self, result: Sample | Failure) -> None:
        if isinstance(result, Failure):
            self._advance(1, 1, 0.0)
        else:
            self._advance(1, 0, result.source_seconds)

    def shard_done(self, videos: int = 0, failures: int = 0, seconds: float = 0.0) -> None:
        """A shard is finished; `videos` of it were processed elsewhere (a Ray task) and are counted now."""
        self.shards_left -= 1
        self._advance(videos, failures, seconds)

    def _advance(self, videos: int, failures: int, seconds: float) -> None:
        self.failures += failures
        self.seconds += seconds
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = self.progress.tasks[0].completed + videos
        self.progress.update(
            self.task,
            advance=videos,
            rate=f"{done / elapsed:.1f}",
            realtime=f"{self.seconds / elapsed:.1f}",
            failures=self.failures,
            shards=self.shards_left,
        )
        now = time.perf_counter()
        due = done % self.line_every == 0 or done == self.total or now - self.last_line > self.LINE_EVERY_S
        if self.lines and due and videos:  # a shard finishing adds no video: no line of its own
            self.last_line = now
            left = round((self.total - done) * elapsed / done)
            log.info(
                "transcoding %d/%d videos (%.0f%%): %.1f videos/s, %.1fx realtime, %d failed, "
                "ETA %d:%02d:%02d",
                done,
                self.total,
                100 * done / max(self.total, 1),
                done / elapsed,
                self.seconds / elapsed,
                self.failures,
                left // 3600,
                left // 60 % 60,
                left % 60,
            )


def _results(
    jobs: list[Job], process_fn: ProcessFn, settings: EncodeSettings, workers: int
) -> Iterator[Sample | Failure]:
    fn = functools.partial(process_fn, settings=settings)
    if workers == 1:
        yield from map(fn, jobs)
        return
    # spawn: workers must not inherit the parent's threads (rich's refresh thread) or open tar files. Workers
    # ignore Ctrl-C: the parent alone stops (the pool is terminated with it), with one message, no tracebacks.
    pool = multiprocessing.get_context("spawn").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN))
    with pool:
        yield from pool.imap(fn, jobs, chunksize=1)


def _sample_entry(sample: Sample) -> dict[str, Any]:
    return {
        "key": sample.key,
        "num_frames": sample.info["num_frames"],
        "duration": sample.info["duration"],
        "bytes": len(sample.video),
        "source_seconds": round(sample.source_seconds, 3),
    }


def _write_shard(
    cfg: ShardJob,
    work: ShardWork,
    results: Iterator[Sample | Failure],
    feedback: Feedback | None,
    old_tar: Path | None = None,
) -> dict[str, Any]:
    """Consume the results of `work.todo` (in plan order) and write the shard and its record.

    The samples a finished shard keeps are copied from its old tar; the tar is only rewritten when a retried
    row now succeeds (the writer opens at the first new sample and first copies the kept samples before it).
    """
    stem = work.plan.stem(cfg.name)
    previous = work.previous or {"samples": []}
    kept = {s["key"]: s for s in previous["samples"]}
    old = KeptSamples(old_tar or cfg.out / f"{stem}.tar") if kept else None
    todo = {job.key for job in work.todo}
    writer: ShardWriter | None = None
    samples: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    warnings = [w for w in previous.get("warnings", []) if w["key"] in kept and w["key"] not in todo]
    try:
        for job in work.plan.jobs:
            if job.key not in todo:
                samples.append(kept[job.key])
                if writer is not None:
                    writer.add_members(old.members(job.key))  # type: ignore[union-attr]
                continue
            result = next(results)
            if feedback is not None:
                feedback.update(result)
            if isinstance(result, Failure):
                failures.append(result.record())
                log.debug("failed: %s: %s", result.source, result.reason)
                continue
            if writer is None:
                writer = ShardWriter(cfg.out, stem, cfg.video_ext)
                for entry in samples:  # all kept so far: a new sample would have opened the writer
                    writer.add_members(old.members(entry["key"]))  # type: ignore[union-attr]
            writer.add(result)
            samples.append(_sample_entry(result))
            if result.warning:
                warnings.append(
                    {"source": job.source, "key": job.key, "split": job.split, "reason": result.warning}
                )
        files = writer.finish() if writer is not None else _file_sizes(previous)
        record = {**_record(stem, work.plan.split, samples, failures, files), "warnings": warnings}
        # The record goes in first, with the sizes of the files about to be renamed into place: a kill before
        # the renames leaves files that do not match it, and restart then redoes the shard.
        write_json_atomic(cfg.out / RECORDS / f"{stem}.json", record)
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()  # a full disk, an interrupt: no temporary file stays behind
        raise
    finally:
        if old is not None:
            old.close()
    return record


def _record(
    stem: str, split: str, samples: list[dict], failures: list[dict], files: dict[str, int]
) -> dict[str, Any]:
    return {
        "stem": stem,
        "split": split,
        "num_samples": len(samples),
        "bytes": sum(s.get("bytes", 0) for s in samples),
        "source_seconds": round(sum(s.get("source_seconds", 0.0) for s in samples), 3),
        **files,
        "samples": samples,
        "failures": failures,
    }


def _file_sizes(record: dict[str, Any]) -> dict[str, int]:
    return {k: record[k] for k in ("tar_bytes", "idx_bytes") if k in record}


def _finished(cfg: ShardJob, plan: ShardPlan, stored: dict[str, int] | None = None) -> dict[str, Any] | None:
    """The record of a finished shard whose files are the ones it describes, else None (redo the shard).
    `stored`: the sizes of the files in the store, for a remote --out (the records are synced to cfg.out)."""
    record_path = cfg.out / RECORDS / f"{plan.stem(cfg.name)}.json"
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if not record["num_samples"]:
        return record
    for suffix in ("tar", "idx"):
        name = f"{plan.stem(cfg.name)}.{suffix}"
        if stored is not None:
            size = stored.get(name)
        else:
            size = (cfg.out / name).stat().st_size if (cfg.out / name).exists() else None
        if size is None or record.get(f"{suffix}_bytes", size) != size:
            return None
    return record


def plan_work(cfg: ShardJob, plans: list[ShardPlan], stored: dict[str, int] | None = None) -> list[ShardWork]:
    """New and unfinished shards in full; the failed rows of finished ones; nothing for complete ones."""
    work = []
    for plan in plans:
        record = _finished(cfg, plan, stored)
        if record is None:
            work.append(ShardWork(plan, plan.jobs))
            continue
        kept = {s["key"] for s in record["samples"]}
        todo = tuple(job for job in plan.jobs if job.key not in kept)
        if todo:
            work.append(ShardWork(plan, todo, record))
    return work


def _remove_stale(cfg: ShardJob, plans: list[ShardPlan]) -> None:
    for plan in plans:
        for suffix in (".tar", ".idx"):
            Path(str(cfg.out / plan.stem(cfg.name)) + suffix + TMP_SUFFIX).unlink(missing_ok=True)


def make_output_dir(out: Path) -> None:
    """Create --out (and its .records); a file in the way is a usage error, not a traceback."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder: give a folder (it is created when missing)")
    try:
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), out)
        raise InputError(f"cannot create the output folder {out}: {blocker} is a file") from err
    except OSError as err:
        raise InputError(f"cannot create the output folder {out}: {err.strerror or err}") from err


def _lock_name(part: tuple[int, int]) -> str:
    return f"lock.part-{part[0]}-of-{part[1]}"


def _holder(path: Path) -> str:
    info = dirlock.read_record(path)
    try:
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (TypeError, KeyError):
        return "pid unknown"


def _busy(out: Path, lock: Path) -> RunError:
    return RunError(
        f"another run ({_holder(lock)}) is writing into {out}: wait for it to end or stop it (parts of one "
        f"job, --part i/N, may run at the same time; a whole run and a part, or two runs of one part, not)"
    )


@contextlib.contextmanager
def output_lock(out: Path, part: tuple[int, int]) -> Iterator[None]:
    """Hold `.records/lock.part-i-of-N` (dirlock: released when the process dies, even by SIGKILL) and refuse
    to start while another run holds the same part, or any part of another N (their shards overlap ours)."""
    locks = out / RECORDS
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / _lock_name(part)
    fd = dirlock.try_acquire(path)
    if fd is None:
        raise _busy(out, path)
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        dirlock.write_record(fd, holder)
        for other in locks.glob("lock.part-*-of-*"):
            if not other.name.endswith(f"-of-{part[1]}") and dirlock.is_held(other):
                raise _busy(out, other)
        yield
    finally:
        dirlock.release(fd)  # the file stays: the next run of this part locks it again


def build_index(
    cfg: ShardJob, dataset: Dataset, records: list[dict[str, Any]], failures: int, tools: dict[str, str]
) -> dict[str, Any]:
    splits: dict[str, Any] = {s: {"num_samples": 0, "shards": []} for s in dataset.splits}
    for record in sorted(records, key=lambda r: r["stem"]):
        if record["num_samples"] == 0:
            continue
        split = splits[record["split"]]
        split["num_samples"] += record["num_samples"]
        split["shards"].append(
            {
                "tar": f"{record['stem']}.tar",
                "index": f"{record['stem']}.idx",
                "num_samples": record["num_samples"],
                **{k: record[k] for k in ("tar_bytes", "idx_bytes") if k in record},
            }
        )
    return {
        "format": FORMAT,
        "name": cfg.name,
        "classes": dataset.classes,
        "codec": cfg.settings.codec,
        "video_ext": cfg.video_ext,
        "splits": splits,
        "settings": settings_record(cfg),
        "tools": tools,
        "failures": failures,
    }


def part_suffix(part: tuple[int, int]) -> str:
    return "" if part[1] == 1 else f".part-{part[0]}-of-{part[1]}"


def run(
    dataset: Dataset, cfg: ShardJob, process_fn: ProcessFn, console: Console | None = None
) -> dict[str, Any]:
    """Process every pending shard of this part; write index.json (or index.part-i-of-N.json) + failures.

    Raises RunError (after writing the index and the failures) when every row of this part failed."""
    console = console or Console(stderr=True)
    make_output_dir(cfg.out)
    with output_lock(cfg.out, cfg.part):
        summary = _run_locked(dataset, cfg, process_fn, console)
    if summary["failures"] and not summary["index_samples"]:
        raise RunError(all_failed_message(summary["failures"], summary["failures_path"]))
    return summary


def _run_locked(dataset: Dataset, cfg: ShardJob, process_fn: ProcessFn, console: Console) -> dict[str, Any]:
    remote = storage.RemoteOutput(cfg.remote) if cfg.remote else None
    stored = storage.sync_records(remote, cfg.out, RECORDS) if remote else None
    if cfg.shard_bytes:
        cfg = replace(cfg, shard_samples=resolve_shard_samples(cfg, dataset, process_fn))
    plans = plan_shards(dataset, cfg.shard_samples, cfg.seed)
    _check_plan(cfg, dataset, plans)
    if remote:
        remote.put(cfg.out / RECORDS / "plan.json", f"{RECORDS}/plan.json")
    mine = part_of(plans, cfg.part)
    _remove_stale(cfg, mine)
    work = plan_work(cfg, mine, stored)
    jobs = [job for w in work for job in w.todo]
    log.info(
        "%s: %d shards in this part, %d complete, %d videos to process (%d retried) on %s",
        cfg.name,
        len(mine),
        len(mine) - len(work),
        len(jobs),
        sum(len(w.todo) for w in work if w.previous),
        "a Ray cluster" if cfg.engine == "ray" else f"{cfg.workers or os.cpu_count()} workers",
    )
    feedback = Feedback(len(jobs), len(work), cfg.progress, console)
    start = time.perf_counter()
    engine_stats: dict[str, Any] = {}
    with feedback.progress:
        if cfg.engine == "ray":
            from preprocess import ray_engine

            written, engine_stats = ray_engine.run_shards(cfg, work, process_fn, feedback, remote)
        else:
            written = _run_pool(cfg, work, process_fn, feedback, remote)
    wall = time.perf_counter() - start
    records = [written.get(p.stem(cfg.name)) or _finished(cfg, p, stored) for p in mine]
    summary = _write_outputs(cfg, dataset, records, remote)
    summary.update(
        videos=len(jobs),
        wall_s=wall,
        skipped_shards=len(mine) - len(work),
        source_seconds=feedback.seconds,
        **engine_stats,
    )
    print_summary(console, cfg, summary)
    return summary


def _run_pool(
    cfg: ShardJob,
    work: list[ShardWork],
    process_fn: ProcessFn,
    feedback: Feedback,
    remote: storage.RemoteOutput | None,
) -> dict[str, dict[str, Any]]:
    """The local engine: one process pool for every video, shards written in plan order by this process (and
    uploaded one by one for a remote --out)."""
    written: dict[str, dict[str, Any]] = {}
    jobs = [job for w in work for job in w.todo]
    results = _results(jobs, process_fn, cfg.settings, cfg.workers or os.cpu_count() or 1)
    try:
        for w in work:
            stem = w.plan.stem(cfg.name)
            old_tar = kept_tar(cfg, w, cfg.out / RECORDS, remote)
            written[stem] = _write_shard(cfg, w, results, feedback, old_tar)
            if remote:
                storage.publish_shard(cfg.out, stem, written[stem], remote, RECORDS)
                if old_tar is not None:
                    old_tar.unlink(missing_ok=True)
            feedback.shard_done()
    finally:
        results.close()  # stops the pool, also when a shard could not be written
    return written


def kept_tar(
    cfg: ShardJob, work: ShardWork, scratch: Path, remote: storage.RemoteOutput | None
) -> Path | None:
    """The finished tar whose samples a retried shard keeps: in --out, or downloaded from the store into
    `scratch`; None for a new shard."""
    if not (work.previous and work.previous["samples"]):
        return None
    stem = work.plan.stem(cfg.name)
    if remote is None:
        return cfg.out / f"{stem}.tar"
    local = scratch / f"{stem}.kept.tar"
    remote.get(f"{stem}.tar", local)
    return local


def _write_outputs(
    cfg: ShardJob, dataset: Dataset, records: list[dict[str, Any]], remote: storage.RemoteOutput | None
) -> dict[str, Any]:
    """failures.jsonl, then index.json (uploaded in that order for a remote --out: the index comes last)."""
    failures = [f.record() for f in dataset.rejected] if cfg.part[0] == 0 else []
    failures += [f for r in records for f in r["failures"]]
    kept_with_warnings = [{**w, "warning": True} for r in records for w in r.get("warnings", [])]
    suffix = part_suffix(cfg.part)
    failures_path = cfg.out / f"failures{suffix}.jsonl"
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in failures + kept_with_warnings]
    write_text_atomic(failures_path, "".join(lines))
    index = build_index(cfg, dataset, records, len(failures), tool_versions())
    if cfg.part[1] > 1:
        index["part"] = list(cfg.part)
    index_path = cfg.out / f"index{suffix}.json"
    write_json_atomic(index_path, index)
    if remote:
        remote.put(failures_path, failures_path.name)
        remote.put(index_path, index_path.name)
    return {
        "records": records,
        "failures": failures,
        "failures_path": f"{remote.url}/{failures_path.name}" if remote else failures_path,
        "index": index,
        "index_samples": sum(s["num_samples"] for s in index["splits"].values()),
    }


# What to check for the commonest reasons of a run where every row failed: (start of the reason, hint).
REASON_HINTS = (
    (
        "file not found",
        "check --root (list paths start from it) or --videos: the paths in {failures} must exist",
    ),
    ("frame folder not found", "check --root: the frame folders in {failures} must exist"),
    ("label", "check --classes: every label must be one of its names (or numbers)"),
    ("unreadable", "check that the files are videos (ffprobe FILE)"),
    ("no video stream", "check that the files are videos (ffprobe FILE)"),
    (
        "transcode failed",
        "see the ffmpeg messages in {failures} (--tolerate-decode-errors keeps damaged sources)",
    ),
    ("truncated", "download the files in {failures} again, or keep what they hold with --keep-truncated"),
    ("internal error", "this is a bug: please report it with {failures}"),
)


def all_failed_message(failures: list[dict[str, Any]], failures_path: Path) -> str:
    """One line: how many rows, the three commonest reasons with counts, and what to check for them."""
    reasons = Counter(f["reason"] for f in failures).most_common(3)
    hints = []
    for reason, _ in reasons:
        hint = next((h for start, h in REASON_HINTS if reason.startswith(start)), "see {failures}")
        if hint not in hints:
            hints.append(hint)
    listed = ", ".join(f"{reason} ({count})" for reason, count in reasons)
    advice = "; ".join(h.format(failures=failures_path) for h in hints)
    return f"every one of the {len(failures)} rows failed, most often: {listed}. {advice}"


def print_summary(console: Console, cfg: ShardJob, summary: dict[str, Any]) -> None:
    table = Table(title=f"{cfg.name}{part_suffix(cfg.part)} -> {cfg.remote or cfg.out}")
    for column in ("split", "rows", "in shards", "failed", "shards", "hours of video"):
        table.add_column(column, justify="right" if column != "split" else "left")
    by_split: dict[str, Counter] = {}
    for record in summary["records"]:
        c = by_split.setdefault(record["split"], Counter())
        c["ok"] += record["num_samples"]
        c["failed"] += len(record["failures"])
        c["shards"] += bool(record["num_samples"])
        c["seconds"] += sum(s["duration"] for s in record["samples"])
    for failure in summary["failures"]:
        if failure.get("rejected"):
            by_split.setdefault(failure["split"], Counter())["failed"] += 1
    for split, c in by_split.items():
        table.add_row(
            split,
            str(c["ok"] + c["failed"]),
            str(c["ok"]),
            str(c["failed"]),
            str(c["shards"]),
            f"{c['seconds'] / 3600:.2f}",
        )
    console.print(table)
    reasons = Counter(f["reason"] for f in summary["failures"])
    if reasons:
        failed = Table(title=f"failures (details: {summary['failures_path']})")
        failed.add_column("reason")
        failed.add_column("count", justify="right")
        for reason, count in reasons.most_common():
            failed.add_row(reason, str(count))
        console.print(failed)
    if summary["videos"]:
        console.print(
            f"{summary['videos']} videos in {summary['wall_s']:.1f} s: "
            f"{summary['videos'] / summary['wall_s']:.2f} videos/s, "
            f"{summary['source_seconds'] / summary['wall_s']:.1f}x realtime; "
            f"{summary['skipped_shards']} finished shards skipped"
        )
    if cfg.engine == "ray":
        console.print(
            f"Ray: {summary.get('relaunched', 0)} straggler shard(s) launched again, "
            f"{summary.get('attempts_lost', 0)} attempt(s) lost (worker or node died, or cancelled)"
        )
