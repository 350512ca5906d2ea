"""Datasets in object storage, against a real S3-protocol server on loopback (moto's ThreadedMotoServer, the
server s3fs's own tests use) through s3fs: preprocessing into s3:// publishes the local run's bytes and
re-runs skip what is there; training and evaluation from the bucket equal the local ones; a shard deleted
from the bucket mid-run is a clear error naming it. The shard cache's bounds, retries and size checks run on
fsspec's in-memory filesystem."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import TINY_SYNTHETIC, run_preprocess, tiny_args
from fsspec.implementations.memory import MemoryFileSystem
from moto.server import ThreadedMotoServer

import config
import evaluation
import train
from pipeline import DatasetError, remote
from pipeline.shards import ShardDataset

BUCKET = "gcvideo-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 server on a free loopback port; the AWS_* variables point s3fs (here and in subprocesses) at
    it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = dict(os.environ)
    try:
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
        )
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def bucket_files(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    root = f"{BUCKET}/{prefix}/"
    return {p[len(root) :]: fs.cat_file(p) for p in fs.find(root) if "/.records/" not in f"/{p[len(root) :]}"}


def local_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def s3_tiny(s3, tiny_index, tmp_path_factory) -> str:
    """The tiny synthetic dataset preprocessed into the bucket (the same command as conftest's tiny_index)."""
    staging = tmp_path_factory.mktemp("staging")
    url = f"s3://{BUCKET}/tiny"
    run_preprocess("synthetic", "--out", url, "--staging", str(staging), *TINY_SYNTHETIC, "--workers", "1")
    return f"{url}/index.json"


def test_preprocessing_into_s3_publishes_the_local_runs_bytes(s3, s3_tiny, tiny_index, tmp_path):
    assert bucket_files(s3, "tiny") == local_files(tiny_index.parent)
    records = s3.find(f"{BUCKET}/tiny/.records")
    assert any(r.endswith("synthetic-train-000000.json") for r in records)
    # a re-run from another machine (a fresh staging folder) finds every shard finished in the bucket
    again = run_preprocess(
        "synthetic", "--out", "s3://" + s3_tiny.split("//")[1].rsplit("/", 1)[0], "--staging", str(tmp_path),
        *TINY_SYNTHETIC, "--workers", "1",
    )  # fmt: skip
    assert "2 complete, 0 videos to process" in " ".join(again.stderr.split())
    assert not list(tmp_path.glob("*.tar")) and bucket_files(s3, "tiny") == local_files(tiny_index.parent)


def test_a_lost_shard_in_the_bucket_is_redone_and_nothing_else(s3, tiny_index, tmp_path):
    url = f"s3://{BUCKET}/redo"
    args = ["synthetic", "--out", url, *TINY_SYNTHETIC, "--shard-size", "8", "--workers", "1"]
    run_preprocess(*args, "--staging", str(tmp_path / "a"))
    first = bucket_files(s3, "redo")
    s3.rm(f"{BUCKET}/redo/synthetic-train-000002.tar")
    again = run_preprocess(*args, "--staging", str(tmp_path / "b"))
    assert "8 videos in" in " ".join(again.stderr.split()) and "5 finished shards skipped" in again.stderr
    assert bucket_files(s3, "redo") == first


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def short_run(index: str, out: Path, *extra: str) -> config.Config:
    args = [*tiny_args(index, out, batch_size=4), "--optim.epochs", "1", "--run.max_steps", "4", *extra]
    return config.validate(config.apply_overrides(config.demo(), args))


def test_training_and_evaluation_from_s3_equal_the_local_run(s3_tiny, tiny_index, tmp_path):
    cache = tmp_path / "cache"
    local = train.train(short_run(str(tiny_index), tmp_path / "local"))
    remote_run = train.train(short_run(s3_tiny, tmp_path / "s3", "--data.cache_dir", str(cache)))
    assert local["step"] == remote_run["step"] == 4
    a, b = weights(tmp_path / "local" / "last.pt"), weights(tmp_path / "s3" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs")
    assert sorted(p.name for p in cache.rglob("*.tar")) == ["synthetic-train-000000.tar"]
    results = {}
    for name, index in (("local", str(tiny_index)), ("s3", s3_tiny)):
        out = tmp_path / f"eval-{name}"
        options = ["--data.index", index, "--data.cache_dir", str(cache), "--eval.out", str(out)]
        results[name] = evaluation.evaluate([str(tmp_path / "local" / "last.pt")], options)
        results[name]["predictions"] = (out / "predictions.jsonl").read_text()
    assert results["s3"]["videos"] == results["local"]["videos"] == 16  # every val video once
    assert results["s3"]["predictions"] == results["local"]["predictions"]
    assert results["s3"]["top1"] == results["local"]["top1"]


@pytest.fixture(scope="module")
def s3_small(s3, tmp_path_factory) -> str:
    """4 train shards of 8 clips in the bucket, for the deletion tests."""
    url = f"s3://{BUCKET}/small"
    staging = tmp_path_factory.mktemp("small")
    run_preprocess("synthetic", "--out", url, "--staging", str(staging), *TINY_SYNTHETIC, "--shard-size", "8")
    return f"{url}/index.json"


def test_a_bounded_cache_reads_every_sample_and_keeps_to_its_bound(s3_small, tmp_path):
    whole = ShardDataset(s3_small, "train", cache_dir=tmp_path / "whole")
    sizes = sorted(size for _, size in whole._remote.values())
    bound = sizes[-1] + sizes[-2]  # two shards at a time
    ds = ShardDataset(s3_small, "train", cache_dir=tmp_path / "bounded", cache_bytes=bound)
    order = [i for rnd in range(2) for i in range(rnd, len(ds), 3)]  # hops between the 4 shards, twice
    for i in order:
        assert ds[i].key == whole[i].key and (ds[i].video == whole[i].video).all()
        assert sum(p.stat().st_size for p in (tmp_path / "bounded").rglob("*.tar")) <= bound


def test_a_shard_deleted_mid_run_is_an_error_naming_it(s3, s3_small, tmp_path):
    ds = ShardDataset(s3_small, "train", cache_dir=tmp_path)
    first = ds[0]  # fetches the first sample's shard
    victim = next(r.tar for r in ds.refs if r.tar != ds.refs[0].tar and not r.tar.endswith("000003.tar"))
    s3.rm(victim.split("://", 1)[1])
    assert ds[0].key == first.key  # a cached shard reads on
    with pytest.raises(DatasetError, match=rf"shard file {victim} is missing from the store.*re-run"):
        ds[next(i for i, r in enumerate(ds.refs) if r.tar == victim)]


def test_training_on_an_index_whose_shard_is_gone_exits_with_one_line(s3, s3_small, tmp_path, caplog):
    s3.rm(f"{BUCKET}/small/synthetic-train-000003.tar")
    caplog.set_level(logging.ERROR)
    code = train.main(["train", *tiny_args(s3_small, tmp_path / "run", 4), "--data.cache_dir", str(tmp_path)])
    assert code == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"s3://{BUCKET}/small/synthetic-train-000003.tar" in message and "missing" in message


# ------------------------------------------------------------------ the shard cache, on an in-memory store


class FlakyMemory(MemoryFileSystem):
    """In-memory store whose first `failures` downloads fail like a reset connection."""

    protocol = "flakymem"
    failures = 0

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(path.replace("flakymem://", "memory://", 1))

    def get_file(self, rpath, lpath, **kwargs):
        if FlakyMemory.failures:
            FlakyMemory.failures -= 1
            raise OSError("connection reset by peer")
        return super().get_file(rpath, lpath, **kwargs)


fsspec.register_implementation("flakymem", FlakyMemory, clobber=True)


@pytest.fixture
def store(tiny_index, monkeypatch):
    """A copy of the tiny dataset (a shard per split) in the in-memory store."""
    monkeypatch.setattr(remote, "RETRY_SECONDS", 0.0)
    fs = FlakyMemory()
    for path in tiny_index.parent.iterdir():
        if path.is_file():
            fs.pipe_file(f"/tiny/{path.name}", path.read_bytes())
    yield fs, "flakymem://tiny"
    fs.rm("/tiny", recursive=True)


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(store, tmp_path):
    fs, url = store
    for i, name in enumerate(["a", "b", "c"]):
        fs.pipe_file(f"/tiny/{name}.tar", bytes([i]) * 1000)
    cache = remote.ShardCache(url, tmp_path, max_bytes=2500)
    for name in ["a", "b", "a", "c"]:  # a was used after b: b goes when c needs room
        assert cache.path(f"{name}.tar", 1000).read_bytes() == bytes(["abc".index(name)]) * 1000
    assert sorted(p.name for p in cache.dir.glob("*.tar")) == ["a.tar", "c.tar"]
    with pytest.raises(DatasetError, match=r"does not fit in the shard cache.*--data.cache_gb"):
        remote.ShardCache(url, tmp_path, max_bytes=999).path("b.tar", 1000)


def test_fetches_are_retried_and_checked_against_their_size(store, tmp_path):
    fs, url = store
    FlakyMemory.failures = 2
    ds = ShardDataset(f"{url}/index.json", "train", cache_dir=tmp_path)  # .idx fetches retried
    FlakyMemory.failures = 2
    assert ds[0].num_frames == 8  # the shard's fetch too
    index = json.loads(fs.cat_file("/tiny/index.json"))
    index["splits"]["val"]["shards"][0]["tar_bytes"] += 1  # the store's tar is not the one preprocess wrote
    fs.pipe_file("/tiny/index.json", json.dumps(index).encode())
    val = ShardDataset(f"{url}/index.json", "val", cache_dir=tmp_path / "other")
    with pytest.raises(DatasetError, match=r"cannot fetch flakymem://tiny/synthetic-val-000000.tar.*lists"):
        val[0]
    assert not list((tmp_path / "other").rglob("*.partial"))


def test_ray_tasks_upload_the_same_objects(s3, tiny_index, tmp_path):
    """--engine ray into s3://: each task uploads its shard, then its done record; index.json comes last."""
    url = f"s3://{BUCKET}/tiny-ray"
    args = ["synthetic", "--out", url, "--staging", str(tmp_path), *TINY_SYNTHETIC, "--workers", "2"]
    run_preprocess(*args, "--engine", "ray")
    assert bucket_files(s3, "tiny-ray") == local_files(tiny_index.parent)
    records = [p.rsplit("/", 1)[1] for p in s3.find(f"{BUCKET}/tiny-ray/.records")]
    assert sorted(records) == ["plan.json", "synthetic-train-000000.json", "synthetic-val-000000.json"]
