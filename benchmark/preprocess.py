"""Preprocessing throughput: videos/s and hours of video per hour per core, synthetic-dataset generation time,
and the keyframe-interval trade-off (storage vs random-access decode) behind the default `--gop 4`.

`python -m benchmark preprocess [--quick]`. The inputs are the five real Kinetics clips in ../shared/data
(repeated `--repeat` times so that the pool has work for every core) and the embedded synthetic dataset.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmark.common import Plot, median, write_results

log = logging.getLogger("benchmark.preprocess")
KINETICS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "videos" / "kinetics"
TSN_SEGMENTS = 8


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="how many times each of the 5 Kinetics clips is listed (default: 2 quick, 8 full)",
    )
    group.add_argument("--short-side", type=int, default=256, help="transcode short side (default 256)")
    group.add_argument(
        "--gops",
        default="1,2,4,8,16,32,250",
        help="keyframe intervals to compare (default 1,2,4,8,16,32,250)",
    )


def _kinetics_dataset(repeat: int):
    from preprocess.jobs import Job
    from preprocess.runner import Dataset

    clips = sorted(p for p in KINETICS.iterdir() if p.suffix in (".mp4", ".mkv"))
    if not clips:
        raise SystemExit(f"no Kinetics clips in {KINETICS}: the benchmark needs ../shared/data")
    jobs = [
        Job(key=f"{p.stem.replace('.', '_')}_{r}", source=str(p), label=0, label_name="x", split="train")
        for r in range(repeat)
        for p in clips
    ]
    return Dataset(classes=["x"], splits=["train"], jobs=jobs)


def transcode_rows(args: argparse.Namespace, repeat: int, iters: int) -> list[dict]:
    from preprocess import transcode
    from preprocess.ffmpeg_args import EncodeSettings
    from preprocess.runner import ShardJob, run

    workers = os.cpu_count() or 1
    dataset = _kinetics_dataset(repeat)
    rows = []
    for codec in ("h264", "mjpeg"):
        walls, summary = [], None
        for _ in range(iters):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = ShardJob(
                    out=Path(tmp),
                    name="bench",
                    settings=EncodeSettings(codec=codec, short_side=args.short_side),
                    shard_samples=64,
                    workers=workers,
                    progress=False,
                )
                start = time.perf_counter()
                summary = run(dataset, cfg, transcode.process)
                walls.append(time.perf_counter() - start)
        wall = median(walls)
        videos = len(dataset.jobs)
        rows.append(
            {
                "measure": "transcode",
                "input": f"5 Kinetics clips x{repeat}",
                "codec": codec,
                "short_side": args.short_side,
                "workers": workers,
                "videos": videos,
                "failures": len(summary["failures"]),
                "wall_s": round(wall, 2),
                "videos_per_s": videos / wall,
                "realtime_x": summary["source_seconds"] / wall,
                "video_h_per_h_per_core": summary["source_seconds"] / wall / workers,
            }
        )
        log.info(
            "transcode %s: %.2f videos/s, %.1f hours of video per hour per core",
            codec,
            rows[-1]["videos_per_s"],
            rows[-1]["video_h_per_h_per_core"],
        )
    return rows


def synthetic_rows() -> list[dict]:
    from preprocess import synthetic
    from preprocess.ffmpeg_args import EncodeSettings
    from preprocess.runner import ShardJob, run

    workers = os.cpu_count() or 1
    dataset = synthetic.synthetic_dataset({"train": 384, "val": 64}, 16, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ShardJob(
            out=Path(tmp),
            name="synthetic",
            shard_samples=512,
            workers=workers,
            progress=False,
            settings=EncodeSettings(codec="mjpeg", short_side=None, size=(64, 64), mjpeg_quality=5),
        )
        start = time.perf_counter()
        run(dataset, cfg, synthetic.process)
        wall = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in Path(tmp).glob("*.tar")) / 1e6
    log.info("synthetic dataset (%d clips): %.1f s with %d workers", len(dataset.jobs), wall, workers)
    return [
        {
            "measure": "synthetic generation",
            "input": f"{len(dataset.jobs)} clips, 16x64x64",
            "codec": "mjpeg",
            "workers": workers,
            "videos": len(dataset.jobs),
            "wall_s": round(wall, 2),
            "videos_per_s": len(dataset.jobs) / wall,
            "size_mb": round(size_mb, 1),
        }
    ]


def tsn_centres(num_frames: int) -> np.ndarray:
    """The centre frames of the 8 TSN segments (val-mode sampling)."""
    return np.array([int((i + 0.5) * num_frames / TSN_SEGMENTS) for i in range(TSN_SEGMENTS)])


def gop_rows(args: argparse.Namespace, iters: int) -> list[dict]:
    from pipeline.torch_loader import decode_frames, decoded_frame_count
    from preprocess import transcode
    from preprocess.ffmpeg_args import EncodeSettings
    from preprocess.jobs import Sample

    dataset = _kinetics_dataset(1)
    rows = []
    for gop in (int(g) for g in args.gops.split(",")):
        settings = replace(EncodeSettings(short_side=args.short_side), gop=gop)
        samples = [
            r for r in map(lambda j: transcode.process(j, settings), dataset.jobs) if isinstance(r, Sample)
        ]
        # decoded as the torch fallback decodes: from the keyframe before each, straight from the sample table
        centres = [tsn_centres(s.info["num_frames"]) for s in samples]
        times = []
        for _ in range(iters):
            # CPU time of this process (the decoder runs single-threaded here): other jobs on the machine
            # change the wall time of a loop this short far more than the keyframe interval does
            start = time.process_time()
            for s, idx in zip(samples, centres):
                decode_frames(s.video, idx)
            times.append(time.process_time() - start)
        decoded = sum(decoded_frame_count(s.video, idx) for s, idx in zip(samples, centres))
        rows.append(
            {
                "measure": "gop random access",
                "codec": "h264",
                "gop": gop,
                "short_side": args.short_side,
                "videos": len(samples),
                "size_mb": round(sum(len(s.video) for s in samples) / 1e6, 2),
                "tsn8_clips_per_cpu_s": len(samples) / median(times),
                "frames_decoded_per_clip": decoded / len(samples),
            }
        )
        log.info(
            "gop %d: %.2f MB, %.1f TSN-8 clips per CPU second (the fallback's decode)",
            gop,
            rows[-1]["size_mb"],
            rows[-1]["tsn8_clips_per_cpu_s"],
        )
    return rows


def main(args: argparse.Namespace) -> int:
    repeat = args.repeat or (2 if args.quick else 8)
    iters = args.iters or (1 if args.quick else 3)
    rows = transcode_rows(args, repeat, iters) + synthetic_rows() + gop_rows(args, max(iters, 5))
    meta = {
        "repeat": repeat,
        "iters": iters,
        "short_side": args.short_side,
        "tsn_segments": TSN_SEGMENTS,
        "note": "wall time of whole runs (pool start-up, validation decode, shard writing included)",
    }
    path = write_results(
        "preprocess",
        rows,
        meta=meta,
        plots=[
            Plot(x="codec", y="videos_per_s", group="measure", title="Preprocessing throughput (all cores)"),
            Plot(
                x="gop",
                y="tsn8_clips_per_cpu_s",
                title="H.264 keyframe interval vs TSN-8 random-access decode (clips per CPU second)",
                logx=True,
            ),
        ],
    )
    log.info("results: %s", path)
    return 0
