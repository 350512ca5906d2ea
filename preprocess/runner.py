"""The job: a deterministic shard plan, a process pool, finished shards skipped on restart, then index.json.

Shard assignment depends only on the inputs and the seed: each split's jobs are shuffled with `seed` (so a
shard mixes classes) and cut into consecutive groups of `shard_samples` jobs. A shard is therefore an
independent unit: restarting skips shards whose tar exists, and `--part i/N` takes every N-th shard.
A target in bytes (`shard_bytes`) is turned into a sample count once, from the mean output size of a pilot of
the first PILOT_VIDEOS planned videos (deterministic, since the encoders are), and kept in .records/plan.json.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import platform
import subprocess
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

from preprocess import FORMAT, __version__
from preprocess.ffmpeg_args import EncodeSettings
from preprocess.jobs import Failure, InputError, Job, Sample
from preprocess.writer import TMP_SUFFIX, ShardWriter, shard_stem, write_json_atomic

log = logging.getLogger("preprocess")
RECORDS = ".records"
PILOT_VIDEOS = 8  # per-shard records (samples, failures) of finished shards; what restart and merge read
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


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    jobs: tuple[Job, ...]

    def stem(self, name: str) -> str:
        return shard_stem(name, self.split, self.number)


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
        raise InputError(
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
    plan = ShardPlan("pilot", 0, tuple(jobs))
    return list(_results([plan], process_fn, cfg.settings, cfg.workers or os.cpu_count() or 1))


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
    """Rich progress bar: videos/s, realtime factor (seconds of video per second), failures, ETA."""

    def __init__(self, total: int, enabled: bool, console: Console) -> None:
        self.start = time.perf_counter()
        self.seconds = 0.0
        self.failures = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} videos/s"),
            TextColumn("{task.fields[realtime]}x realtime"),
            TextColumn("[red]{task.fields[failures]} failed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("transcoding", total=total, rate="-", realtime="-", failures=0)

    def update(self, result: Sample | Failure) -> None:
        if isinstance(result, Failure):
            self.failures += 1
        else:
            self.seconds += result.source_seconds
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = self.progress.tasks[0].completed + 1
        self.progress.update(
            self.task,
            advance=1,
            rate=f"{done / elapsed:.1f}",
            realtime=f"{self.seconds / elapsed:.1f}",
            failures=self.failures,
        )


def _results(
    plans: list[ShardPlan], process_fn: ProcessFn, settings: EncodeSettings, workers: int
) -> Iterator[Sample | Failure]:
    jobs = [job for plan in plans for job in plan.jobs]
    fn = functools.partial(process_fn, settings=settings)
    if workers == 1:
        yield from map(fn, jobs)
        return
    # spawn: workers must not inherit the parent's threads (rich's refresh thread) or open tar files.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=1)


def _write_shard(
    cfg: ShardJob, plan: ShardPlan, results: Iterator[Sample | Failure], feedback: Feedback
) -> dict[str, Any]:
    writer: ShardWriter | None = None
    samples, failures, total_bytes, seconds = [], [], 0, 0.0
    for _ in plan.jobs:
        result = next(results)
        feedback.update(result)
        if isinstance(result, Failure):
            failures.append(result.record())
            log.debug("failed: %s: %s", result.source, result.reason)
            continue
        if writer is None:
            writer = ShardWriter(cfg.out, plan.stem(cfg.name), cfg.video_ext)
        writer.add(result)
        samples.append(
            {"key": result.key, "num_frames": result.info["num_frames"], "duration": result.info["duration"]}
        )
        total_bytes += len(result.video)
        seconds += result.source_seconds
    record = {
        "stem": plan.stem(cfg.name),
        "split": plan.split,
        "num_samples": len(samples),
        "bytes": total_bytes,
        "source_seconds": round(seconds, 3),
        "samples": samples,
        "failures": failures,
    }
    # The record goes in first: a tar with its final name always has one, so restart can trust the tar.
    write_json_atomic(cfg.out / RECORDS / f"{plan.stem(cfg.name)}.json", record)
    if writer is not None:
        writer.close()
    return record


def _finished(cfg: ShardJob, plan: ShardPlan) -> dict[str, Any] | None:
    record_path = cfg.out / RECORDS / f"{plan.stem(cfg.name)}.json"
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    tar = cfg.out / f"{plan.stem(cfg.name)}.tar"
    if record["num_samples"] and not tar.exists():
        return None
    return record


def _remove_stale(cfg: ShardJob, plans: list[ShardPlan]) -> None:
    for plan in plans:
        for suffix in (".tar", ".idx"):
            Path(str(cfg.out / plan.stem(cfg.name)) + suffix + TMP_SUFFIX).unlink(missing_ok=True)


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
    """Process every pending shard of this part; write index.json (or index.part-i-of-N.json) + failures."""
    console = console or Console(stderr=True)
    (cfg.out / RECORDS).mkdir(parents=True, exist_ok=True)
    if cfg.shard_bytes:
        cfg = replace(cfg, shard_samples=resolve_shard_samples(cfg, dataset, process_fn))
    plans = plan_shards(dataset, cfg.shard_samples, cfg.seed)
    _check_plan(cfg, dataset, plans)
    mine = part_of(plans, cfg.part)
    _remove_stale(cfg, mine)
    done = {p.stem(cfg.name): r for p in mine if (r := _finished(cfg, p)) is not None}
    pending = [p for p in mine if p.stem(cfg.name) not in done]
    total = sum(len(p.jobs) for p in pending)
    log.info(
        "%s: %d shards in this part, %d already finished, %d videos to process with %d workers",
        cfg.name,
        len(mine),
        len(done),
        total,
        cfg.workers or os.cpu_count(),
    )
    feedback = Feedback(total, cfg.progress, console)
    start = time.perf_counter()
    with feedback.progress:
        results = _results(pending, process_fn, cfg.settings, cfg.workers or os.cpu_count() or 1)
        for plan in pending:
            done[plan.stem(cfg.name)] = _write_shard(cfg, plan, results, feedback)
        results.close()
    wall = time.perf_counter() - start
    records = [done[p.stem(cfg.name)] for p in mine]
    failures = [f.record() for f in dataset.rejected] if cfg.part[0] == 0 else []
    failures += [f for r in records for f in r["failures"]]
    suffix = part_suffix(cfg.part)
    with open(cfg.out / f"failures{suffix}.jsonl", "w") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in failures)
    index = build_index(cfg, dataset, records, len(failures), tool_versions())
    if cfg.part[1] > 1:
        index["part"] = list(cfg.part)
    write_json_atomic(cfg.out / f"index{suffix}.json", index)
    summary = {
        "videos": total,
        "wall_s": wall,
        "skipped_shards": len(mine) - len(pending),
        "source_seconds": feedback.seconds,
        "records": records,
        "failures": failures,
        "index": index,
    }
    print_summary(console, cfg, summary)
    return summary


def print_summary(console: Console, cfg: ShardJob, summary: dict[str, Any]) -> None:
    table = Table(title=f"{cfg.name}{part_suffix(cfg.part)} -> {cfg.out}")
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
        failed = Table(
            title=f"failures (details: {cfg.out / ('failures' + part_suffix(cfg.part) + '.jsonl')})"
        )
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
