"""Preprocessing cost against the frame-folder route, throughput, and the keyframe-interval / quality
trade-off behind the defaults (preprocess.ffmpeg_args.EncodeSettings).

`python -m benchmark preprocess [--quick]`. The inputs are the five real Kinetics clips in ../shared/data
(repeated `--repeat` times) and the embedded synthetic dataset. Rows, by `measure`:

- `cpu cost`: CPU-seconds and MB per video of gcvideo's preprocessing (the runner in this process with
  `--cost-workers` workers: probe, ffmpeg transcode, validating decode, shard writing) against the TSN/TSM
  route it replaces (ffmpeg extracts every frame to JPEG `-q:v 2` at the same short side,
  benchmark.frame_folders), on the same clips, in one run, the routes alternating `--iters` times. CPU time
  is this process's and its reaped children's (rusage): the child ffmpeg processes and the pool workers. The
  baseline is charged its ffmpeg runs only (its frame size is computed beforehand). Ratios are ours over the
  baseline: throughput per CPU-second, storage, and PSNR (benchmark.quality) in dB.
- `stage`: where our CPU time per video goes (process start of an ffmpeg, the in-process probe, the
  transcode, the validating decode, and the rest: runner, shard writing, Python).
- `transcode`, `synthetic generation`: videos/s on every core (wall time of whole runs).
- `gop random access` and `crf`: storage, PSNR and the torch fallback's TSN-8 random-access decode per H.264
  keyframe interval (`--gops`) and quality (`--crfs`, at the default GOP).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmark.common import Plot, cpu_facts, load_note, median, rusage_cpu_s, write_results

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
    group.add_argument(
        "--crfs", default="17,19,21", help="H.264 CRFs to compare at the default GOP (default 17,19,21)"
    )
    group.add_argument(
        "--presets",
        default="veryfast,superfast",
        help="libx264 presets of the cost rows against the frame folders (default veryfast,superfast; "
        "the default preset is always one)",
    )
    group.add_argument(
        "--cost-workers", type=int, default=1, help="workers of the cost rows' runs (default 1)"
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


def _unique_jobs(dataset):
    """One job per source clip (the repeats are the same frames: quality is measured once per clip)."""
    return list({job.source: job for job in dataset.jobs}.values())


def frame_sizes(dataset, short_side: int) -> dict[str, tuple[int, int]]:
    """Source -> the (width, height) both routes store it at."""
    from benchmark.frame_folders import frame_size

    return {job.source: frame_size(job.source, short_side) for job in _unique_jobs(dataset)}


def _run_shards(dataset, settings, workers: int, out: Path) -> dict:
    """One preprocessing run into `out`; its CPU-seconds (this process and its reaped children), wall time
    and shard bytes."""
    from rich.console import Console

    from preprocess import transcode
    from preprocess.runner import ShardJob, run

    cfg = ShardJob(
        out=out, name="bench", settings=settings, shard_samples=64, workers=workers, progress=False
    )
    cpu, start = rusage_cpu_s(), time.perf_counter()
    summary = run(dataset, cfg, transcode.process, console=Console(stderr=True, quiet=True))
    return {
        "cpu_s": rusage_cpu_s() - cpu,
        "wall_s": time.perf_counter() - start,
        "bytes": sum(p.stat().st_size for p in out.glob("*.tar")),
        "failures": len(summary["failures"]),
    }


def _run_frame_folders(dataset, sizes: dict[str, tuple[int, int]], out: Path) -> dict:
    """The TSN/TSM route: one ffmpeg JPEG extraction per video into out/<key>/img_%05d.jpg."""
    from benchmark.frame_folders import extract_frames

    cpu, start = rusage_cpu_s(), time.perf_counter()
    for job in dataset.jobs:
        extract_frames(job.source, out / job.key, sizes[job.source])
    return {
        "cpu_s": rusage_cpu_s() - cpu,
        "wall_s": time.perf_counter() - start,
        "bytes": sum(p.stat().st_size for p in out.glob("*/img_*.jpg")),
        "failures": 0,
    }


def _route_quality(route: str, dataset, sizes, out: Path) -> float:
    from benchmark import quality

    if route == "frame folders":
        firsts = {job.source: out / job.key for job in reversed(dataset.jobs)}
        return quality.folders_psnr(firsts.items(), sizes)
    videos = {src: data for src, data in quality.shard_videos(out / "index.json")}
    return quality.videos_psnr(videos.items(), sizes)


def cost_routes(args: argparse.Namespace):
    """(route name, EncodeSettings or None for the frame folders): the default preset first."""
    from preprocess.ffmpeg_args import EncodeSettings

    default = EncodeSettings(short_side=args.short_side)
    presets = dict.fromkeys([default.preset, *(p for p in args.presets.split(",") if p)])
    routes = [(f"gcvideo h264 {p}", replace(default, preset=p)) for p in presets]
    return [*routes, ("frame folders", None)]


def cost_rows(args: argparse.Namespace, repeat: int, iters: int) -> list[dict]:
    """gcvideo's preprocessing against the frame-folder extraction: the routes alternate, `iters` rounds."""
    dataset = _kinetics_dataset(repeat)
    sizes = frame_sizes(dataset, args.short_side)
    routes = cost_routes(args)
    runs: dict[str, list[dict]] = {name: [] for name, _ in routes}
    psnr: dict[str, float] = {}
    for _ in range(iters):
        for name, settings in routes:
            with tempfile.TemporaryDirectory(prefix="gcvideo-bench-cost-") as tmp:
                out = Path(tmp)
                if settings is None:
                    runs[name].append(_run_frame_folders(dataset, sizes, out))
                else:
                    runs[name].append(_run_shards(dataset, settings, args.cost_workers, out))
                if name not in psnr:  # the outputs are deterministic: once
                    psnr[name] = _route_quality(name, dataset, sizes, out)
            log.info("cost %s: %.2f CPU-s per video", name, runs[name][-1]["cpu_s"] / len(dataset.jobs))
    rows = [
        _cost_row(name, settings, runs[name], psnr[name], len(dataset.jobs), repeat)
        for name, settings in routes
    ]
    baseline = rows[-1]
    for row in rows:
        row["throughput_per_cpu_s_vs_frame_folders"] = row["videos_per_cpu_s"] / baseline["videos_per_cpu_s"]
        row["storage_vs_frame_folders"] = row["mb_per_video"] / baseline["mb_per_video"]
        row["psnr_vs_frame_folders_db"] = row["psnr_db"] - baseline["psnr_db"]
    return rows


def _cost_row(name: str, settings, runs: list[dict], psnr: float, videos: int, repeat: int) -> dict:
    cpu = median([r["cpu_s"] for r in runs]) / videos
    return {
        "measure": "cpu cost",
        "route": name,
        "input": f"5 Kinetics clips x{repeat}",
        "codec": settings.codec if settings else "jpeg q 2",
        "preset": settings.preset if settings else None,
        "gop": settings.gop if settings else None,
        "crf": settings.crf if settings else None,
        "videos": videos,
        "failures": max(r["failures"] for r in runs),
        "cpu_s_per_video": cpu,
        "cpu_s_per_video_min": min(r["cpu_s"] for r in runs) / videos,
        "cpu_s_per_video_max": max(r["cpu_s"] for r in runs) / videos,
        "videos_per_cpu_s": 1 / cpu,
        "wall_s_per_video": median([r["wall_s"] for r in runs]) / videos,
        "mb_per_video": median([r["bytes"] for r in runs]) / videos / 1e6,
        "psnr_db": psnr,
    }


def _self_cpu_s() -> float:
    return time.process_time()


def _children_cpu_s() -> float:
    return rusage_cpu_s() - time.process_time()


def startup_args() -> list[str]:
    """An ffmpeg run that does nothing (one 16x16 frame to the null muxer): the cost of starting one."""
    return ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "nullsrc=s=16x16", "-frames:v", "1"] + [
        "-f",
        "null",
        "-",
    ]


def stage_rows(args: argparse.Namespace, total_cpu_s: float) -> list[dict]:
    """Our CPU-seconds per video by stage, each timed on its own over the five clips; `total_cpu_s` (the
    default route's cost row) less the stages is the runner's share (shard writing, records, Python)."""
    from preprocess import transcode
    from preprocess.ffmpeg_args import EncodeSettings, output_size, transcode_args
    from preprocess.probe import probe

    settings = EncodeSettings(short_side=args.short_side)
    jobs = _kinetics_dataset(1).jobs
    spent = dict.fromkeys(
        ("ffmpeg process start", "probe (in-process)", "transcode (ffmpeg)", "validating decode"), 0.0
    )
    for job in jobs:
        before = _children_cpu_s()
        subprocess.run(startup_args(), check=True, capture_output=True)
        spent["ffmpeg process start"] += _children_cpu_s() - before
        before = _self_cpu_s()
        stream = probe(job.source)
        spent["probe (in-process)"] += _self_cpu_s() - before
        size = output_size(stream.width, stream.height, stream.sar, stream.rotation, settings)
        with tempfile.TemporaryDirectory(prefix="gcvideo-bench-stage-") as tmp:
            dst = os.path.join(tmp, "out.mp4")
            cmd = transcode_args(job.source, dst, stream_index=stream.index, size=size, settings=settings)
            before = _children_cpu_s()
            data = transcode.run_ffmpeg(cmd, dst)
            spent["transcode (ffmpeg)"] += _children_cpu_s() - before
        before = _self_cpu_s()
        transcode.inspect_video(data, settings.threads)
        spent["validating decode"] += _self_cpu_s() - before
    per_video = {stage: cpu / len(jobs) for stage, cpu in spent.items()}
    rest = total_cpu_s - sum(v for k, v in per_video.items() if k != "ffmpeg process start")
    per_video["runner, shard writing, Python (the rest)"] = rest
    rows = [
        {"measure": "stage", "stage": k, "cpu_s_per_video": v, "share_of_total": v / total_cpu_s}
        for k, v in per_video.items()
    ]
    rows[0]["note"] = "part of the transcode's figure"
    for row in rows:
        log.info("stage %-42s %.3f CPU-s per video", row["stage"], row["cpu_s_per_video"])
    return rows


def transcode_rows(args: argparse.Namespace, repeat: int, iters: int) -> list[dict]:
    from rich.console import Console

    from preprocess import transcode
    from preprocess.ffmpeg_args import EncodeSettings
    from preprocess.runner import ShardJob, run

    workers = os.cpu_count() or 1
    dataset = _kinetics_dataset(repeat)
    sizes = frame_sizes(dataset, args.short_side)
    rows = []
    for codec in ("h264", "mjpeg"):
        walls, summary, psnr, size_mb = [], None, None, 0.0
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
                summary = run(dataset, cfg, transcode.process, console=Console(stderr=True, quiet=True))
                walls.append(time.perf_counter() - start)
                size_mb = sum(p.stat().st_size for p in Path(tmp).glob("*.tar")) / 1e6
                if psnr is None:
                    psnr = _route_quality(codec, dataset, sizes, Path(tmp))
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
                "mb_per_video": size_mb / videos,
                "psnr_db": psnr,
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


def encode_variants(args: argparse.Namespace):
    """(measure, EncodeSettings): each --gops interval at the default CRF, each --crfs at the default GOP."""
    from preprocess.ffmpeg_args import EncodeSettings

    default = EncodeSettings(short_side=args.short_side)
    variants = [("gop random access", replace(default, gop=int(g))) for g in args.gops.split(",") if g]
    crfs = [int(c) for c in args.crfs.split(",") if c and int(c) != default.crf]
    return variants + [("crf", replace(default, crf=c)) for c in crfs]


def gop_rows(args: argparse.Namespace, iters: int, frame_folders: dict | None = None) -> list[dict]:
    """Storage, PSNR and TSN-8 random-access decode per keyframe interval and CRF; `frame_folders` (the
    baseline's cost row) adds the ratios to it."""
    from benchmark import quality
    from pipeline.torch_loader import decode_frames, decoded_frame_count
    from preprocess import transcode
    from preprocess.jobs import Sample

    dataset = _kinetics_dataset(1)
    sizes = frame_sizes(dataset, args.short_side)
    rows = []
    for measure, settings in encode_variants(args):
        samples = [r for r in (transcode.process(j, settings) for j in dataset.jobs) if isinstance(r, Sample)]
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
        mb = sum(len(s.video) for s in samples) / 1e6
        row = {
            "measure": measure,
            "codec": "h264",
            "preset": settings.preset,
            "gop": settings.gop,
            "crf": settings.crf,
            "short_side": args.short_side,
            "videos": len(samples),
            "size_mb": round(mb, 2),
            "mb_per_video": mb / len(samples),
            "psnr_db": quality.videos_psnr(((s.info["source"], s.video) for s in samples), sizes),
            "tsn8_clips_per_cpu_s": len(samples) / median(times),
            "frames_decoded_per_clip": decoded / len(samples),
        }
        if frame_folders:
            row["storage_vs_frame_folders"] = row["mb_per_video"] / frame_folders["mb_per_video"]
            row["psnr_vs_frame_folders_db"] = row["psnr_db"] - frame_folders["psnr_db"]
        rows.append(row)
        log.info(
            "gop %d crf %d: %.2f MB, %.2f dB, %.1f TSN-8 clips per CPU second (the fallback's decode)",
            settings.gop,
            settings.crf,
            row["size_mb"],
            row["psnr_db"],
            row["tsn8_clips_per_cpu_s"],
        )
    return rows


def main(args: argparse.Namespace) -> int:
    repeat = args.repeat or (2 if args.quick else 8)
    iters = args.iters or (2 if args.quick else 3)
    load_before = load_note()
    cost = cost_rows(args, repeat, iters)
    rows = cost + stage_rows(args, cost[0]["cpu_s_per_video"])
    rows += transcode_rows(args, repeat, iters) + synthetic_rows() + gop_rows(args, max(iters, 5), cost[-1])
    meta = {
        "repeat": repeat,
        "iters": iters,
        "short_side": args.short_side,
        "tsn_segments": TSN_SEGMENTS,
        "cost_workers": args.cost_workers,
        "note": "cpu cost: CPU-seconds (rusage of this process and its reaped children), the routes "
        "alternating; ratios ours / frame folders; transcode: wall time of whole runs on every core (pool "
        "start-up, validation decode, shard writing included); psnr_db: benchmark.quality, RGB, against the "
        "source frames at the stored geometry",
        "load_average_1_5_15min": f"{load_before} at the start, {load_note()} at the end (other jobs on the "
        "CPU raise CPU-seconds a little and wall times a lot)",
        **cpu_facts(),
    }
    path = write_results(
        "preprocess",
        rows,
        meta=meta,
        plots=[
            Plot(x="route", y="cpu_s_per_video", title="Preprocessing CPU-seconds per video (1 worker)"),
            Plot(x="codec", y="videos_per_s", group="measure", title="Preprocessing throughput (all cores)"),
            Plot(
                x="gop",
                y="tsn8_clips_per_cpu_s",
                group="measure",
                title="H.264 keyframe interval vs TSN-8 random-access decode (clips per CPU second)",
                logx=True,
            ),
            Plot(
                x="mb_per_video",
                y="psnr_db",
                group="measure",
                title="Storage vs quality: PSNR against the source frames (shard formats, frame folders)",
            ),
        ],
    )
    log.info("results: %s", path)
    return 0
