"""DALI CPU on MJPEG: why the video decoder is slow, what the JPEG-frames graph gains (Kinetics geometry).

    python -m benchmark dali_cpu --quick [--repeat 4] [--rounds 5] [--data-dir DIR]

Two parts, on MJPEG shards (short side 256) of the five Kinetics clips of ../shared/data:
- "seek" rows: milliseconds for DALI's CPU ``fn.decoders.video`` to return one frame k of the longest clip
  (k = first, quarter, half, last) with build_index on and off. Growing with k means it decodes every frame
  before k.
- "loader" rows: clips/s of the training loader (crop 224, T=8, batch 8) for the video graph the loader
  used before (``fn.decoders.video``), the JPEG-frames graph (sampled frames' JPEGs, ROI-decoded) with 1 and
  2 DALI threads, and the torch fallback on the same shards, measured in alternating rounds in one process
  (medians), so load from other jobs on the machine hits every row alike. Their order is what
  pipeline.build.CPU_BACKENDS_FASTEST_FIRST records for `auto`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmark.common import write_results
from benchmark.loader import build_shards, endless
from pipeline import LoaderConfig
from pipeline.dali_loader import DaliLoader
from pipeline.shards import ShardDataset
from pipeline.torch_loader import TorchLoader

log = logging.getLogger(__name__)
GEOMETRY = dict(crop_size=224, scale_size=256, num_segments=8, batch_size=8)
VIDEO_GRAPH = "dali-cpu video graph, 2 threads"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--repeat", type=int, default=4, help="copies of each of the 5 Kinetics clips")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the loader rows")
    parser.add_argument("--data-dir", default=None, help="keep the built shards here (default: a temp dir)")


def _one_frame_pipeline(video: np.ndarray, wanted: list[np.ndarray], build_index: bool):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_async=False, exec_pipelined=False)
    def pipe():
        data, idx = fn.external_source(
            source=lambda: ([video], [wanted[0]]), num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32]
        )
        return fn.decoders.video(data, frames=idx, pad_mode="none", build_index=build_index)

    p = pipe()
    p.build()
    return p


def seek_rows(index: Path, reps: int) -> list[dict]:
    """Time to decode frame k alone, by k: the video decoder's cost of reaching a frame."""
    ds = ShardDataset(index, "train")
    sample = max((ds[i] for i in range(min(5, len(ds)))), key=lambda s: s.num_frames)
    n = sample.num_frames
    rows = []
    for build_index in (True, False):
        wanted: list[np.ndarray] = []
        p = _one_frame_pipeline(sample.video, wanted, build_index)
        for k in (0, n // 4, n // 2, n - 1):
            wanted[:] = [np.array([k], np.int32)]
            times = []
            for _ in range(reps + 1):
                start = time.perf_counter()
                p.run()
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "part": "seek",
                    "series": f"fn.decoders.video build_index={build_index}",
                    "frame": k,
                    "num_frames": n,
                    "ms": 1000 * statistics.median(times[1:]),
                }
            )
    return rows


def loaders(index: Path) -> dict[str, object]:
    """name -> a loader over the same shards and geometry."""

    def cfg(workers: int) -> LoaderConfig:
        return LoaderConfig(index=str(index), workers=workers, **GEOMETRY)

    kw = dict(split="train", mode="train")
    video = DaliLoader(cfg(2), gpu=False, **kw)
    video.jpeg = False  # the graph it used before: fn.decoders.video on the whole file
    return {
        VIDEO_GRAPH: video,
        "dali-cpu jpeg frames, 1 thread": DaliLoader(cfg(1), gpu=False, **kw),
        "dali-cpu jpeg frames, 2 threads": DaliLoader(cfg(2), gpu=False, **kw),
        "torch fallback, 2 workers": TorchLoader(cfg(2), **kw),
    }


def loader_rows(index: Path, rounds: int, clips_per_round: int) -> list[dict]:
    streams = {name: endless(loader, set_epoch=True) for name, loader in loaders(index).items()}
    for stream in streams.values():  # start-up (pipelines, workers) and page cache, untimed
        for _ in range(2):
            next(stream)
    per_s: dict[str, list[float]] = {name: [] for name in streams}
    batches = max(1, clips_per_round // GEOMETRY["batch_size"])
    for _ in range(rounds):
        for name, stream in streams.items():
            start = time.perf_counter()
            for _ in range(batches):
                next(stream)
            per_s[name].append(batches * GEOMETRY["batch_size"] / (time.perf_counter() - start))
    for stream in streams.values():
        stream.close()
    return [
        {
            "part": "loader",
            "series": name,
            "clips_per_s": statistics.median(v),
            "rounds": ", ".join(f"{x:.1f}" for x in v),
            "ratio_to_video_graph": statistics.median(v) / statistics.median(per_s[VIDEO_GRAPH]),
        }
        for name, v in per_s.items()
    ]


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    data_dir = getattr(args, "data_dir", None)
    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="gcvideo-bench-dali-cpu-")
    root = Path(data_dir or tmp.name)
    try:
        index = build_shards(root / f"mjpeg-256-x{args.repeat}", codec="mjpeg", gop=1, copies=args.repeat)
        rows = seek_rows(index, reps=args.iters or 3)
        rows += loader_rows(index, rounds=args.rounds, clips_per_round=16)
    finally:
        if tmp is not None:
            tmp.cleanup()
    for row in rows:
        log.info("%s", row)
    meta = {
        "geometry": GEOMETRY,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "what": "seek: ms to decode frame k alone with DALI's CPU video decoder; loader: clips/s, "
        "alternating rounds in one process, medians (other jobs may share the CPU: compare ratios)",
    }
    write_results("dali_cpu", rows, meta=meta)
    return 0
