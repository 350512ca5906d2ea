"""Loader throughput: clips/s and sampled frames/s per backend and codec, against a plain PyAV baseline.

Datasets are built here with the preprocess CLI from the real Kinetics clips in ../shared/data (copied under
distinct names to make a few dozen samples) and, for the demo figure, a small synthetic dataset.
Baseline = what common repositories do: a torch DataLoader whose workers decode every frame of the video up to
the last sampled index with PyAV, converting each to RGB, then pick the sampled frames and crop/resize them.
Rows: one per (dataset, codec, keyframe interval, backend). Warm-up batches first, epochs restart as needed:
clips/s = median over rounds of (clips in a run of consecutive batches / its
time), since prefetching makes single-batch times meaningless.

--quick (CPU, about a minute): short side 128, 8 x 112 px clips, MJPEG (dali-cpu, torch, baseline) and H.264
(torch, baseline), and the demo config on synthetic 64x64 MJPEG clips. Full (GPU): short side 256,
8 x 224 px clips, dali-gpu on H.264 across keyframe intervals (the NVDEC figure), at GOP 16 also with 1, 2
and 7 decoding pipelines (dali-gpu-xP), plus torch and baseline.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import torch
from rich.progress import Progress

from benchmark.common import Plot, device_sync, summary, timeit, write_results
from pipeline import LoaderConfig, build_loader, sampling
from pipeline.loader import make_views
from pipeline.shards import ShardDataset
from pipeline.torch_loader import render_views

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "data" / "videos" / "kinetics"
GOPS_FULL = (4, 8, 16, 32, 128)


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--batch", type=int, default=None, help="clips per batch (default 8 quick, 32 full)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (TSN segments)")
    parser.add_argument(
        "--workers", type=int, default=None, help="DALI threads / DataLoader workers (default: every core)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="copies of each of the 5 Kinetics clips (default 4 quick, 16 full)",
    )
    parser.add_argument(
        "--gops",
        default=None,
        help=f"H.264 keyframe intervals (full default {','.join(map(str, GOPS_FULL))})",
    )
    parser.add_argument("--data-dir", default=None, help="keep the built datasets here (default: a temp dir)")


# ----------------------------------------------------------------------------------------------- datasets


def build_kinetics(out: Path, *, codec: str, short_side: int, gop: int, repeat: int) -> Path:
    """The 5 Kinetics clips x repeat, sharded by the preprocess CLI; returns index.json (reused if
    present)."""
    index = out / "index.json"
    if index.is_file():
        return index
    links = out.parent / f"{out.name}-videos"
    links.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(repeat):
        for src in sorted(VIDEOS.glob("*.m[pk][4v]")):
            link = links / f"r{r}_{src.name}"
            if not link.exists():
                link.symlink_to(src)
            rows.append(f"{link.name},{src.stem.split('_')[0]}")
    lst = out.parent / f"{out.name}.csv"
    lst.write_text("path,label\n" + "\n".join(rows) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "preprocess",
            "list",
            "--split",
            f"train={lst}",
            "--root",
            str(links),
            "--out",
            str(out),
            "--name",
            "bench",
            "--codec",
            codec,
            "--short-side",
            str(short_side),
            "--gop",
            str(gop),
            "--no-progress",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return index


def build_synthetic(out: Path) -> Path:
    index = out / "index.json"
    if not index.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "preprocess",
                "synthetic",
                "--out",
                str(out),
                "--train-per-class",
                "32",
                "--val-per-class",
                "4",
                "--no-progress",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return index


# ----------------------------------------------------------------------------------------------- baseline


class BaselineDataset(torch.utils.data.Dataset):
    """The common repository loader: decode every frame up to the last sampled one to RGB, then pick."""

    def __init__(self, cfg: LoaderConfig, ids: list[int]):
        self.cfg, self.ids, self.dataset = cfg, ids, ShardDataset(cfg.index, "train")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        sid = self.ids[i]
        sample = self.dataset[sid]
        views = make_views(self.cfg, "train", 0, sid, sample)
        idx = sampling.frame_indices(sample.num_frames, views.u, sampling="tsn").ravel()
        frames = []
        with av.open(io.BytesIO(bytes(sample.video))) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_rgb().to_ndarray())
                if len(frames) > idx.max():
                    break
        return render_views(np.stack([frames[j] for j in idx]), views, self.cfg.num_segments)[0], sample.label


def baseline_loader(cfg: LoaderConfig):
    n = len(ShardDataset(cfg.index, "train"))
    ids = list(range(n // cfg.batch_size * cfg.batch_size))
    return torch.utils.data.DataLoader(
        BaselineDataset(cfg, ids),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        drop_last=True,
        multiprocessing_context="forkserver" if cfg.workers else None,
    )


# ----------------------------------------------------------------------------------------------- measuring


def endless(loader, set_epoch: bool):
    """Batches forever, restarting epochs (what a training loop sees)."""
    epoch = 0
    while True:
        if set_epoch:
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(
    name: str, cfg: LoaderConfig, *, device: torch.device, warmup: int, iters: int, rounds: int
) -> dict:
    """Median over `rounds` of the throughput of `iters` consecutive batches, after `warmup` batches."""
    if name == "baseline":
        batches = endless(baseline_loader(cfg), set_epoch=False)
    else:
        batches = endless(
            build_loader(cfg, "train", "train", device=device, dtype=torch.float32), set_epoch=True
        )
    for _ in range(warmup):
        next(batches)

    def run_batches():  # many batches per timed call: prefetching makes single-batch times meaningless
        for _ in range(iters):
            next(batches)

    stats = summary(
        timeit(run_batches, warmup=0, iters=rounds, sync=device_sync(device)),
        items_per_call=cfg.batch_size * iters,
    )
    batches.close()
    return {
        "clips_per_s": stats["per_s"],
        "frames_per_s": stats["per_s"] * cfg.num_segments,
        "round_median_s": stats["median_s"],
    }


def main(args: argparse.Namespace) -> int:
    device = torch.device(getattr(args, "device", "cpu"))
    quick = getattr(args, "quick", device.type == "cpu")
    batch = getattr(args, "batch", None) or (8 if quick else 32)
    frames = getattr(args, "frames", 8)
    workers = getattr(args, "workers", None) or (os.cpu_count() or 2)
    repeat = getattr(args, "repeat", None) or (4 if quick else 16)
    warmup = args.warmup if getattr(args, "warmup", None) is not None else (3 if quick else 10)
    iters = args.iters if getattr(args, "iters", None) is not None else (6 if quick else 20)
    rounds = 3 if quick else 5
    gops_arg = getattr(args, "gops", None)
    gops = tuple(int(g) for g in gops_arg.split(",")) if gops_arg else ((16,) if quick else GOPS_FULL)
    short, crop = (128, 112) if quick else (256, 224)

    # (label, codec, gop, backends)
    plan: list[tuple[str, str, int, tuple[str, ...]]] = []
    if quick:
        plan.append(("kinetics", "mjpeg", 1, ("dali-cpu", "torch", "baseline")))
        plan += [("kinetics", "h264", g, ("torch", "baseline")) for g in gops]
        plan.append(("synthetic-demo", "mjpeg", 1, ("dali-cpu", "torch")))
    else:
        plan += [
            (
                "kinetics",
                "h264",
                g,
                ("dali-gpu",)
                + (("dali-gpu-x1", "dali-gpu-x2", "dali-gpu-x7", "torch", "baseline") if g == 16 else ()),
            )
            for g in gops
        ]
        plan.append(("kinetics", "mjpeg", 1, ("dali-cpu", "torch")))

    default_pipelines = LoaderConfig().dali_pipelines
    data_dir = getattr(args, "data_dir", None)
    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="gcvideo-bench-loader-")
    root = Path(data_dir or tmp.name)
    rows = []
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("loader benchmark", total=sum(len(p[3]) for p in plan))
            for label, codec, gop, backends in plan:
                progress.update(task, description=f"building {label} {codec} gop {gop}")
                if label == "synthetic-demo":
                    index = build_synthetic(root / "synthetic")
                    geometry = dict(crop_size=56, scale_size=64, scales=(1.0, 0.875), batch_size=32)
                else:
                    index = build_kinetics(
                        root / f"{codec}-{short}-g{gop}",
                        codec=codec,
                        short_side=short,
                        gop=gop,
                        repeat=repeat,
                    )
                    geometry = dict(crop_size=crop, scale_size=short, batch_size=batch)
                for backend in backends:
                    progress.update(task, description=f"{label} {codec} gop {gop}: {backend}")
                    # dali-gpu-xP: P decoding pipelines (default LoaderConfig.dali_pipelines)
                    name, _, pipes = backend.partition("-x")
                    cfg = LoaderConfig(
                        index=str(index),
                        backend=name if name != "baseline" else "torch",
                        dali_pipelines=int(pipes) if pipes else default_pipelines,
                        num_segments=frames,
                        workers=workers,
                        **geometry,
                    )
                    row = {
                        "series": f"{label} {codec}" + (f" gop {gop}" if codec == "h264" else ""),
                        "dataset": label,
                        "codec": codec,
                        "gop": gop,
                        "backend": backend,
                        "batch": cfg.batch_size,
                        "frames": frames,
                        "crop": cfg.crop_size,
                    }
                    row |= measure(
                        name,
                        cfg,
                        device=device if name == "dali-gpu" else torch.device("cpu"),
                        warmup=warmup,
                        iters=iters,
                        rounds=rounds,
                    )
                    rows.append(row)
                    log.info(
                        "%-15s %-5s gop %-4d %-9s %8.1f clips/s %9.1f frames/s",
                        label,
                        codec,
                        gop,
                        backend,
                        row["clips_per_s"],
                        row["frames_per_s"],
                    )
                    progress.advance(task)
    finally:
        if tmp is not None:
            tmp.cleanup()

    meta = {
        "device": str(device),
        "quick": quick,
        "frames": frames,
        "short_side": short,
        "workers": workers,
        "repeat": repeat,
        "warmup_batches": warmup,
        "batches_per_round": iters,
        "rounds": rounds,
        "baseline": "DataLoader + PyAV decoding every frame up to the last sampled one",
    }
    plots = [
        Plot(
            x="backend",
            y="clips_per_s",
            group="series",
            logy=True,
            title=f"Loader clips/s, {frames} frames per clip",
        )
    ]
    if not quick:
        plots.append(
            Plot(
                x="gop",
                y="clips_per_s",
                group="backend",
                logx=True,
                title=f"H.264 clips/s at {frames}x{crop} vs keyframe interval",
            )
        )
    write_results("loader", rows, meta=meta, plots=plots)
    return 0
