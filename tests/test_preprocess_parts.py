"""preprocess.runner's accounting with rejected rows (rows that name no usable video) and failed rows, in one
run and in `--part i/N` runs then `merge`: every row lands exactly once in a shard or in failures.jsonl, and
the merged index equals the single run's. The transcoder is replaced by a function, so this takes a second."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from preprocess.ffmpeg_args import EncodeSettings
from preprocess.jobs import Failure, Job, RunError, Sample
from preprocess.merge import merge
from preprocess.runner import Dataset, ShardJob, run

CLASSES = ["a", "b"]


def fake_process(job: Job, settings: EncodeSettings) -> Sample | Failure:
    """A 'video' of the key's bytes; sources named missing-* fail as a file that is not there."""
    if job.source.startswith("missing"):
        return Failure(job.source, "file not found", key=job.key, split=job.split)
    info = {"label": job.label, "num_frames": 8, "duration": 0.5, "width": 32, "height": 32}
    return Sample(job.key, f"video of {job.key}".encode(), info, source_seconds=0.5)


def dataset() -> Dataset:
    jobs = [
        Job(
            f"{split}_{i}", f"{'missing' if i % 4 == 3 else 'clip'}-{split}-{i}", i % 2, CLASSES[i % 2], split
        )
        for split, count in (("train", 12), ("val", 6))
        for i in range(count)
    ]
    rejected = [
        Failure(
            f"row-{i}",
            "label 'c' is not in the class list",
            key=f"bad_{i}",
            split=split,
            extra={"rejected": True},
        )
        for i, split in enumerate(["train", "train", "val"])
    ]
    return Dataset(CLASSES, ["train", "val"], jobs, rejected)


def job(out: Path, part: tuple[int, int] = (0, 1)) -> ShardJob:
    return ShardJob(
        out, "fake", EncodeSettings(codec="mjpeg"), shard_samples=2, workers=1, part=part, progress=False
    )


def failure_lines(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines())


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def test_single_run_accounts_for_every_row(tmp_path):
    summary = run(dataset(), job(tmp_path), fake_process, quiet())
    index = json.loads((tmp_path / "index.json").read_text())
    failures = [json.loads(x) for x in failure_lines(tmp_path / "failures.jsonl")]
    # 18 jobs: 4 fail (every 4th, i = 3, 7, 11 of train; 3 of val), 14 in shards; plus 3 rejected rows
    assert {s: index["splits"][s]["num_samples"] for s in ("train", "val")} == {"train": 9, "val": 5}
    assert index["failures"] == len(failures) == 4 + 3 == len(summary["failures"])
    assert Counter(f["reason"] for f in failures) == {
        "file not found": 4,
        "label 'c' is not in the class list": 3,
    }
    assert sorted(f["key"] for f in failures if f.get("rejected")) == ["bad_0", "bad_1", "bad_2"]
    keys = {f["key"] for f in failures} | {
        k for r in summary["records"] for k in (s["key"] for s in r["samples"])
    }
    assert len(keys) == 18 + 3  # every row exactly once, in a shard or in the failures


def test_parts_with_rejected_rows_merge_to_the_single_run(tmp_path):
    single, parts = tmp_path / "single", tmp_path / "parts"
    run(dataset(), job(single), fake_process, quiet())
    for i in range(3):
        run(dataset(), job(parts, (i, 3)), fake_process, quiet())
        part_failures = [json.loads(x) for x in failure_lines(parts / f"failures.part-{i}-of-3.jsonl")]
        rejected = [f for f in part_failures if f.get("rejected")]
        assert len(rejected) == (3 if i == 0 else 0)  # rejected rows belong to no shard: part 0 lists them
        part_index = json.loads((parts / f"index.part-{i}-of-3.json").read_text())
        assert part_index["failures"] == len(part_failures) and part_index["part"] == [i, 3]
    merged = merge(parts, quiet())
    assert merged == json.loads((single / "index.json").read_text())
    assert failure_lines(parts / "failures.jsonl") == failure_lines(single / "failures.jsonl")
    lines = failure_lines(parts / "failures.jsonl")
    assert len(lines) == len(set(lines)) == merged["failures"] == 7


def test_a_part_whose_rows_all_fail_writes_its_failures_then_says_so(tmp_path):
    data = dataset()
    data.jobs = [j for j in data.jobs if j.source.startswith("missing")]
    with pytest.raises(RunError, match="every one of the 7 rows failed, most often: file not found \\(4\\)"):
        run(data, job(tmp_path), fake_process, quiet())
    assert len(failure_lines(tmp_path / "failures.jsonl")) == 7
    assert json.loads((tmp_path / "index.json").read_text())["failures"] == 7
