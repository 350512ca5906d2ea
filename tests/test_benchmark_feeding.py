"""The reader and train benchmarks' own logic: Kinetics geometry, thread rule, reader rows on tiny shards."""

from __future__ import annotations

import argparse

import pytest

from benchmark import reader
from benchmark import train as bench_train


def _train_args(**kw) -> argparse.Namespace:
    base = dict(quick=True, device="cpu", index="x", num_segments=8, precision=None, no_compile=False)
    return argparse.Namespace(
        **{**base, "batch_size": None, "kinetics": True, "workers": None, "backend": None, **kw}
    )


def test_train_benchmark_kinetics_geometry():
    cfg = bench_train.bench_config(_train_args(workers=2, backend="torch"), "gc_tsm_mini")
    d = cfg.data
    assert (d.crop_size, d.scale_size, d.batch_size, d.num_segments, d.flip) == (224, 256, 8, 8, True)
    assert d.scales == (1.0, 0.875, 0.75, 0.66) and (d.workers, d.backend) == (2, "torch")
    demo = bench_train.bench_config(_train_args(kinetics=False), "gc_tsm_mini").data
    assert demo.crop_size == 56 and demo.workers == 1


@pytest.mark.parametrize(
    "cores, workers, threads, expected",
    [(2, 1, 0, 1), (2, 2, 0, 1), (8, 2, 0, 6), (2, 0, 0, 2), (2, 1, 3, 3)],
)
def test_train_benchmark_gives_torch_the_cores_the_workers_leave(
    monkeypatch, cores, workers, threads, expected
):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    cfg = bench_train.bench_config(_train_args(workers=workers), "gc_tsm_mini")
    cfg.run.threads = threads
    assert bench_train.torch_threads(cfg) == expected


def test_reader_rows_on_tiny_shards(tiny_index):
    rows = reader.rows_for("tiny", tiny_index, rounds=1, seconds=0.05)
    parts = {(r["part"], r["reader"]) for r in rows}
    assert ("read", "per-member preads, 1 thread (before)") in parts and (
        "cold read",
        "ReadAhead 4 threads",
    ) in parts
    assert ("feed", "DALI source callback, as built (after)") in parts
    assert all(r["samples_per_s"] > 0 and r["mb_per_s"] > 0 for r in rows)


def test_per_member_read_equals_one_pread(tiny_index):
    from pipeline.shards import ShardDataset

    ds = ShardDataset(tiny_index, "train")
    for i in (0, 5, len(ds) - 1):
        a, b = reader.read_per_member(ds, i), ds[i]
        assert (a.key, a.label, a.num_frames, a.width, a.height) == (
            b.key,
            b.label,
            b.num_frames,
            b.width,
            b.height,
        )
        assert a.video.tobytes() == b.video.tobytes()
