"""--engine ray on one in-process Ray instance (2 CPUs, a small object store): the shards, records, index and
failures equal the local engine's byte for byte; a task whose worker dies is run again (a bounded number of
times); a straggler is launched again and the first attempt to finish wins; a re-run skips finished shards and
retries failed rows. The process functions below travel to the workers by value (cloudpickle)."""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from conftest import ROOT
from rich.console import Console

from preprocess import synthetic
from preprocess.jobs import Failure, RunError
from preprocess.runner import ShardJob, plan_shards, run

SHARD = 8
DATASET = synthetic.synthetic_dataset({"train": 6, "val": 2}, frames=8, seed=0)  # 64 clips, 8 shards
SETTINGS = synthetic.EncodeSettings(codec="mjpeg", short_side=None, size=(32, 32), mjpeg_quality=5)
FAILING = {"train_3_00001", "val_5_00000"}  # rows that fail in every run, as a corrupt video would


def fail_some(job, settings):
    if job.key in FAILING:
        return Failure(job.source, "transcode failed: broken on purpose", "ffmpeg: no", job.key, job.split)
    return synthetic.process(job, settings)


def die_once(job, settings, marker: str, key: str):
    """Kill the worker process the first time `key` comes up (as an OOM kill or a lost node would)."""
    if job.key == key and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return fail_some(job, settings)


def always_die(job, settings):
    os._exit(1)


def slow_once(job, settings, marker: str, key: str):
    """The first attempt at `key`'s shard hangs (a slow disk, a busy node); a second attempt runs normally."""
    if job.key == key and not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(600)
    return fail_some(job, settings)


def fail_once(job, settings, marker: str, key: str):
    """`key` fails in the first run (its file was not downloaded yet) and succeeds in a re-run."""
    if job.key == key and not os.path.exists(marker):
        Path(marker).touch()
        return Failure(job.source, "file not found", "", job.key, job.split)
    return fail_some(job, settings)


@pytest.fixture(scope="module")
def ray_session():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        runtime_env={"py_modules": [str(ROOT / "preprocess")]},
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def job(out: Path, **kw) -> ShardJob:
    return ShardJob(out=out, name="synthetic", settings=SETTINGS, shard_samples=SHARD, progress=False, **kw)


def files(out: Path) -> dict[str, bytes]:
    """Every file of an output folder but its lock files, by relative path."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith("lock.")
    }


def run_quietly(cfg: ShardJob, process_fn=fail_some) -> dict:
    return run(DATASET, cfg, process_fn, Console(file=open(os.devnull, "w")))  # noqa: SIM115


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local")
    run_quietly(job(out, workers=1))
    return files(out)


def key_of_shard(number: int) -> str:
    return plan_shards(DATASET, SHARD, 0)[number].jobs[0].key


def test_ray_engine_writes_the_local_engines_bytes(ray_session, local_run, tmp_path):
    summary = run_quietly(job(tmp_path, engine="ray"))
    assert files(tmp_path) == local_run  # shards, .idx, .records, index.json, failures.jsonl
    assert len([n for n in local_run if n.endswith(".tar")]) == 8
    failures = local_run["failures.jsonl"].decode().splitlines()
    assert len(failures) == 2 and all("broken on purpose" in line for line in failures)
    assert summary["attempts_lost"] == 0 and summary["relaunched"] == 0


def test_a_task_whose_worker_dies_is_run_again(ray_session, local_run, tmp_path):
    died = tmp_path / "died"
    fn = functools.partial(die_once, marker=str(died), key=key_of_shard(3))
    summary = run_quietly(job(tmp_path / "out", engine="ray"), fn)
    assert died.exists() and summary["attempts_lost"] == 1  # the dead attempt's folder, removed at the end
    assert files(tmp_path / "out") == local_run


def test_retries_are_bounded(ray_session, tmp_path):
    with pytest.raises(RunError, match=r"lost its worker or node 2 times"):
        run_quietly(job(tmp_path, engine="ray", ray_retries=1), always_die)


def test_a_straggler_is_launched_again_and_the_first_to_finish_wins(ray_session, local_run, tmp_path):
    marker = tmp_path / "slow"
    fn = functools.partial(slow_once, marker=str(marker), key=key_of_shard(0))
    start = time.monotonic()
    summary = run_quietly(job(tmp_path / "out", engine="ray", straggler_factor=2.0), fn)
    assert time.monotonic() - start < 300  # the hanging attempt (600 s) was not waited for
    assert marker.exists() and summary["relaunched"] >= 1 and summary["attempts_lost"] >= 1
    assert files(tmp_path / "out") == local_run


def test_rerun_skips_finished_shards_and_retries_failed_rows(ray_session, local_run, tmp_path):
    out, marker, late = tmp_path / "out", tmp_path / "late", key_of_shard(5)
    fn = functools.partial(fail_once, marker=str(marker), key=late)
    first = run_quietly(job(out, engine="ray"), fn)
    assert any(f["key"] == late for f in first["failures"])
    stems = sorted(p.name for p in out.glob("*.tar"))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in stems}
    (out / stems[1]).unlink()  # a shard lost after the run: redone in full
    again = run_quietly(replace(job(out, engine="ray")), fn)
    lost = {
        j.key
        for p in plan_shards(DATASET, SHARD, 0)
        if p.stem("synthetic") + ".tar" == stems[1]
        for j in p.jobs
    }
    failed = {f["key"] for f in first["failures"]}
    assert again["videos"] == len(lost | failed) < 2 * SHARD  # the lost shard and the failed rows only
    assert files(out) == local_run
    redone = {stems[1], plan_shards(DATASET, SHARD, 0)[5].stem("synthetic") + ".tar"}
    assert {n for n in stems if (out / n).stat().st_mtime_ns != mtimes[n]} == redone
