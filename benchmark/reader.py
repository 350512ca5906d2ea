"""The DALI feeding path alone: samples/s that one host process reads from shards and hands to DALI.

    python -m benchmark reader --quick [--repeat 20] [--rounds 5] [--data-dir DIR]

What 8 GPUs need: an H100 trains GC-TSM-R50 at ~600 clips/s, so one process feeding 8 of them needs
~5,000 samples/s. Datasets: the five Kinetics clips of ../shared/data x repeat as H.264 shards (short side
256, GOP 16: ~0.7 MB a sample, the Kinetics-400 size) and as MJPEG shards (~3.8 MB a sample). Rows, in
alternating rounds in one process (medians; other jobs may share the CPU, so compare ratios):

- "read": ShardDataset reads only, a batch held until the next is read (as DALI's feed holds it). Before:
  a pread per member (video, meta, json) into fresh memory, one thread. After: one pread per sample into
  reused buffers (BufferPool); and the loader's ReadAhead pool with 2, 4 and 8 threads (reads of the next
  batches in flight while the current one is taken).
- "feed": what the DALI source callback does per batch of 32 (reads, per-sample draws and crop boxes,
  external-source lists; MJPEG also slices the sampled frames' JPEGs out of the MP4), DALI itself not
  run: before (per-member reads in the feeding thread) and after (the loader as built, reader threads).

- "cold read": one pass over the dataset in random order right after its shards were dropped from the page
  cache (posix_fadvise DONTNEED on these files only), with 1, 2, 4 and 8 reader threads: the disk's part.

"read" and "feed" rows run with the shards in the page cache (warm-up round): CPU and memory-copy costs.
page_faults_per_sample counts the process's minor page faults per sample read: reading into fresh memory
faults once per 4 KiB page unless the allocator reuses freed memory, and the rows share one process's heap,
so a "before" row may borrow memory the others left (its fault count says whether it did).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import resource
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from benchmark.common import Plot, write_results
from benchmark.loader import build_shards
from pipeline import LoaderConfig
from pipeline.dali_loader import READ_AHEAD_BATCHES, DaliLoader
from pipeline.mp4 import frame_ranges
from pipeline.shards import BufferPool, ReadAhead, Sample, ShardDataset

log = logging.getLogger(__name__)
BATCH = 32
COLD_THREADS = (0, 2, 4, 8)
TARGET_8_GPUS = 5000.0


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--repeat", type=int, default=20, help="copies of each of the 5 Kinetics clips (H.264)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per row per round")
    parser.add_argument("--data-dir", default=None, help="keep the built shards here (default: a temp dir)")


def read_per_member(ds: ShardDataset, i: int) -> Sample:
    """The reader before: one pread per member (json, meta, video)."""
    ref = ds.refs[i]
    info = json.loads(ds._pread(ref.tar, ref.info.size, ref.info.offset).tobytes())
    label, num_frames = ds._pread(ref.tar, ref.meta.size, ref.meta.offset).view("<i4")[:2]
    video = ds._pread(ref.tar, ref.video.size, ref.video.offset)
    return Sample(ref.key, video, int(label), int(num_frames), int(info["width"]), int(info["height"]))


def batch_size(num_samples: int) -> int:
    return min(BATCH, num_samples)


def read_stream(ds: ShardDataset, threads: int, per_member: bool):
    """Samples of an endless random order, read as the DALI loader reads them (ReadAhead, batch lookahead)."""
    fetch = (lambda i: read_per_member(ds, i)) if per_member else ds.__getitem__
    reader = ReadAhead(fetch, threads)
    ds.buffers = None if per_member else BufferPool()
    held: list[Sample] = []  # a batch is held until the next one, as DALI's feed holds it
    batch = batch_size(len(ds))
    batches = (
        np.random.default_rng(epoch).permutation(len(ds))[b : b + batch]
        for epoch in itertools.count()
        for b in range(0, len(ds) - batch + 1, batch)
    )
    ahead: deque = deque(itertools.islice(batches, READ_AHEAD_BATCHES + 1))
    while True:
        ids = ahead.popleft()
        ahead.append(next(batches))
        for upcoming in ahead:
            reader.want(upcoming)
        if ds.buffers is not None:
            ds.buffers.give_back(s.video for s in held)
        held = [reader.get(i) for i in ids]
        if errors := [s for s in held if isinstance(s, BaseException)]:
            raise errors[0]
        yield len(ids), sum(ds.refs[i].video.size for i in ids)


def feed_stream(index: Path, per_member: bool):
    """Batches of the DALI loader's source callback, endlessly (epochs restarted), DALI not run."""
    loader = DaliLoader(
        LoaderConfig(
            index=str(index),
            batch_size=batch_size(len(ShardDataset(index, "train"))),
            crop_size=224,
            scale_size=256,
            workers=2,
        ),
        gpu=False,
        split="train",
        mode="train",
    )
    if per_member:
        loader.reader = ReadAhead(lambda i: _checked(loader, read_per_member(loader.dataset, i)), 0)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        plan, fifo = deque(loader.batches()), deque()
        source = loader._batch_source(plan, fifo)
        while plan:
            source()
            ids = fifo.popleft()[0]
            yield len(ids), sum(loader.dataset.refs[i].video.size for i in ids)


def _checked(loader: DaliLoader, sample: Sample) -> Sample:
    """The loader's own fetch on a sample read per member (MJPEG frame tables included)."""
    return dataclasses.replace(sample, frames=frame_ranges(sample.video)) if loader.jpeg else sample


def evict(ds: ShardDataset) -> None:
    """Drop this dataset's shards (and nothing else) from the page cache: the next reads come from disk."""
    for tar in sorted({r.tar for r in ds.refs}):
        fd = os.open(tar, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_pass(ds: ShardDataset, threads: int, seed: int) -> tuple[float, float, float]:
    """(samples/s, MB/s) of one pass over the dataset in random order, from disk, read as the loader does."""
    evict(ds)
    order = np.random.default_rng(seed).permutation(len(ds))
    batch = batch_size(len(ds))
    reader = ReadAhead(ds.__getitem__, threads)
    start = time.perf_counter()
    for b in range(0, len(order), batch):
        reader.want(order[b : b + (READ_AHEAD_BATCHES + 1) * batch])
        for i in order[b : b + batch]:
            if isinstance(sample := reader.get(i), BaseException):
                raise sample
    elapsed = time.perf_counter() - start
    reader.close()
    return len(order) / elapsed, sum(r.video.size for r in ds.refs) / elapsed / 2**20, float("nan")


def measure(streams: dict[str, object], rounds: int, seconds: float) -> dict[str, list[tuple[float, float]]]:
    for stream in streams.values():  # page cache, thread pools, first batches
        for _ in range(3):
            next(stream)
    out: dict[str, list[tuple[float, float, float]]] = {name: [] for name in streams}
    for _ in range(rounds):
        for name, stream in streams.items():
            n = nbytes = 0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                k, b = next(stream)
                n, nbytes = n + k, nbytes + b
            elapsed = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            out[name].append((n / elapsed, nbytes / elapsed / 2**20, faults / max(n, 1)))
    return out


def rows_for(label: str, index: Path, rounds: int, seconds: float) -> list[dict]:
    ds = ShardDataset(index, "train")
    streams = {
        ("read", "per-member preads, 1 thread (before)"): read_stream(
            ShardDataset(index, "train"), 0, per_member=True
        ),
        ("read", "one pread per sample, reused buffers, 1 thread"): read_stream(
            ShardDataset(index, "train"), 0, per_member=False
        ),
        **{
            ("read", f"one pread per sample, reused buffers, ReadAhead {k} threads"): read_stream(
                ShardDataset(index, "train"), k, per_member=False
            )
            for k in (2, 4, 8)
        },
        ("feed", "DALI source callback, per-member preads (before)"): feed_stream(index, per_member=True),
        ("feed", "DALI source callback, as built (after)"): feed_stream(index, per_member=False),
    }
    measured = measure(streams, rounds, seconds)  # type: ignore[arg-type]
    for r in range(rounds):
        for k in COLD_THREADS:
            measured.setdefault(("cold read", f"ReadAhead {k} threads" if k else "1 thread"), []).append(
                cold_pass(ds, k, seed=r)
            )
    sizes = [r.video.size for r in ds.refs]
    rows = []
    for (part, name), values in measured.items():
        per_s = statistics.median(v[0] for v in values)
        rows.append(
            {
                "dataset": label,
                "mean_sample_kb": float(np.mean(sizes)) / 1024,
                "part": part,
                "reader": name,
                "samples_per_s": per_s,
                "mb_per_s": statistics.median(v[1] for v in values),
                "page_faults_per_sample": statistics.median(v[2] for v in values),
                "rounds": ", ".join(f"{v[0]:.0f}" for v in values),
                "x_8_gpu_need": per_s / TARGET_8_GPUS,
            }
        )
    return rows


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    data_dir = getattr(args, "data_dir", None)
    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="gcvideo-bench-reader-")
    root = Path(data_dir or tmp.name)
    rows = []
    try:
        for label, codec, gop, repeat in (
            ("kinetics h264 gop 16", "h264", 16, args.repeat),
            ("kinetics mjpeg", "mjpeg", 1, max(1, args.repeat // 5)),
        ):
            index = build_shards(root / f"{codec}-256-g{gop}-x{repeat}", codec=codec, gop=gop, copies=repeat)
            rows += rows_for(label, index, args.rounds, args.seconds)
    finally:
        if tmp is not None:
            tmp.cleanup()
    for row in rows:
        log.info(
            "%-22s %-4s %-52s %8.0f samples/s",
            row["dataset"],
            row["part"],
            row["reader"],
            row["samples_per_s"],
        )
    meta = {
        "batch": BATCH,
        "rounds": args.rounds,
        "seconds_per_row_per_round": args.seconds,
        "target_samples_per_s_8_gpus": TARGET_8_GPUS,
        "what": "samples/s of the shard reader and of the DALI feeding path (DALI not run), page cache warm, "
        "alternating rounds in one process, medians (other jobs may share the CPU: compare ratios)",
    }
    write_results(
        "reader",
        rows,
        meta=meta,
        plots=[Plot(x="reader", y="samples_per_s", group="dataset", logy=True, title="Reader samples/s")],
    )
    return 0
