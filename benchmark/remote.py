"""Past one machine, measured on this one: preprocessing throughput of `--engine ray` against the local
process pool (the same videos; videos/s and CPU-seconds per video), and the shard cache reading a dataset
from an S3 server on loopback (moto's ThreadedMotoServer through s3fs): samples/s of the first epoch (shards
fetched on first use) against later epochs (read from the local cache), and of a cache too small to hold the
dataset (least-recently-used shards fetched again), next to the same dataset read from a local folder.

`python -m benchmark remote [--quick]` (needs the dev extras: ray, moto, s3fs). Ray is started before the
timed runs (on a cluster it is already up) and its start-up time is a row of its own. CPU-seconds count this
process, the children it reaped and every live process under it (Ray's raylet and workers, ffmpeg), from
/proc. The machine may be shared: the load averages before and after are in the results.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmark.common import Plot, median, process_tree_cpu_s, rusage_cpu_s, write_results
from benchmark.preprocess import _kinetics_dataset

log = logging.getLogger("benchmark.remote")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--repeat", type=int, default=None, help="Kinetics clip repeats (default 2 quick, 8 full)"
    )
    group.add_argument("--epochs", type=int, default=3, help="reader epochs over the S3 dataset (default 3)")


def _cpu_seconds() -> float:
    """This process, the children it reaped, and every live process under it (Ray's raylet and workers)."""
    return rusage_cpu_s() + process_tree_cpu_s(os.getpid(), include_root=False, with_reaped=True)


def engine_rows(repeat: int, iters: int) -> list[dict]:
    import ray

    from preprocess import transcode
    from preprocess.ffmpeg_args import EncodeSettings
    from preprocess.runner import ShardJob, run

    dataset = _kinetics_dataset(repeat)
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    root = str(Path(__file__).resolve().parents[1] / "preprocess")
    ray.init(
        num_cpus=workers, include_dashboard=False, runtime_env={"py_modules": [root]}, log_to_driver=False
    )
    ray.get(ray.remote(lambda: None).remote())  # a worker is up
    rows = [{"measure": "ray start", "engine": "ray", "wall_s": round(time.perf_counter() - start, 2)}]
    try:
        for engine in ("local", "ray"):
            walls, cpus = [], []
            for _ in range(iters):
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = ShardJob(
                        out=Path(tmp),
                        name="bench",
                        settings=EncodeSettings(codec="h264", short_side=256),
                        shard_samples=4,
                        workers=workers,
                        progress=False,
                        engine=engine,
                    )
                    cpu, t0 = _cpu_seconds(), time.perf_counter()
                    run(dataset, cfg, transcode.process)
                    walls.append(time.perf_counter() - t0)
                    cpus.append(_cpu_seconds() - cpu)
            videos = len(dataset.jobs)
            rows.append(
                {
                    "measure": "preprocess",
                    "engine": engine,
                    "input": f"5 Kinetics clips x{repeat}, h264 256 px, 4 per shard",
                    "workers": workers,
                    "videos": videos,
                    "wall_s": round(median(walls), 2),
                    "videos_per_s": videos / median(walls),
                    "cpu_s_per_video": median(cpus) / videos,
                }
            )
            log.info(
                "%s engine: %.2f videos/s, %.2f CPU-s/video",
                engine,
                rows[-1]["videos_per_s"],
                rows[-1]["cpu_s_per_video"],
            )
    finally:
        ray.shutdown()
    return rows


def _read_epoch(ds, epoch: int) -> tuple[float, int]:
    order = np.random.default_rng(epoch).permutation(len(ds))
    start, size = time.perf_counter(), 0
    for i in order:
        size += ds[int(i)].video.size
    return time.perf_counter() - start, size


def cache_rows(epochs: int, quick: bool) -> list[dict]:
    from moto.server import ThreadedMotoServer

    from pipeline.shards import ShardDataset
    from preprocess.__main__ import main as preprocess_main

    per_class = 32 if quick else 128
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = dict(os.environ)
    rows = []
    try:
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
        )
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "local"
            common = ["--train-per-class", str(per_class), "--val-per-class", "1", "--shard-size", "32"]
            common += ["--no-progress", "--workers", "1"]
            assert preprocess_main(["synthetic", "--out", str(local), *common]) == 0
            url = "s3://bench/synthetic"
            assert preprocess_main(["synthetic", "--out", url, "--staging", f"{tmp}/staging", *common]) == 0
            total = sum(p.stat().st_size for p in local.glob("synthetic-train-*.tar"))
            cases = [
                ("local folder", str(local / "index.json"), None),
                ("s3, cache holds all", f"{url}/index.json", 2 * total),
            ]
            cases.append(("s3, cache holds half", f"{url}/index.json", total // 2))
            for name, index, cache_bytes in cases:
                cache = Path(tmp) / f"cache-{len(rows)}"
                ds = ShardDataset(index, "train", cache_dir=cache, cache_bytes=cache_bytes or 10**12)
                for epoch in range(epochs):
                    wall, size = _read_epoch(ds, epoch)
                    rows.append(
                        {
                            "measure": "reader",
                            "source": name,
                            "epoch": epoch + 1,
                            "samples": len(ds),
                            "dataset_mb": round(total / 1e6, 1),
                            "samples_per_s": len(ds) / wall,
                            "mb_per_s": size / wall / 1e6,
                        }
                    )
                    log.info("%s epoch %d: %.0f samples/s", name, epoch + 1, rows[-1]["samples_per_s"])
                ds.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
    return rows


def main(args: argparse.Namespace) -> None:
    repeat = args.repeat or (2 if args.quick else 8)
    iters = args.iters or (1 if args.quick else 3)
    load_before = os.getloadavg()
    rows = engine_rows(repeat, iters) + cache_rows(args.epochs, args.quick)
    load_after = os.getloadavg()
    meta = {
        "iters": iters,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "note": "the CPU is shared with other jobs: compare rows of one file, not across files",
    }
    plots = [
        Plot(x="epoch", y="samples_per_s", group="source", title="shard reader: first vs later epochs"),
    ]
    path = write_results("remote", rows, meta=meta, plots=plots)
    log.info("wrote %s", path)
