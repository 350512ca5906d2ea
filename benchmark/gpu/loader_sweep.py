"""The loader sweep of the GPU suite: clips/s at 8x224 (short side 256, TSN-8, multi-scale crop, flip,
normalise) on the kit's H.264 shards, for NVDEC (`dali-gpu`) by keyframe interval and by number of DALI
pipelines, the PyAV fallback with a worker per spare core, and DALI's CPU decoder, with GPU and NVDEC
utilisation sampled while each row is timed.

Rows run one after another (build, warm up, then `rounds` timed runs of `iters` batches, median); every
loader is closed before the next is built, so rows do not share the GPU or the cores.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from benchmark.common import device_sync, median
from benchmark.loader import PREFETCH, endless
from benchmark.train import GpuSampler
from pipeline import LoaderConfig, build_loader
from pipeline.loader import make_views, view_frame_indices
from pipeline.shards import ShardDataset
from pipeline.torch_loader import decoded_frame_count

ESTIMATE_SAMPLES = 100  # draws the decoded-frames estimate averages over


def plan(gops: list[int], default: int, *, gpu: bool) -> list[dict]:
    """(backend, gop, loader settings) per row: the GOP sweep at the default pipelines, the pipeline sweep
    at the default GOP, the fallback with all spare cores, DALI's CPU decoder."""
    cores = os.cpu_count() or 2
    rows = []
    if gpu:
        rows += [{"backend": "dali-gpu", "gop": g, "dali_pipelines": 4, "workers": 8} for g in gops]
        rows += [
            {"backend": "dali-gpu", "gop": default, "dali_pipelines": p, "workers": 8} for p in (1, 2, 8)
        ]
    rows.append({"backend": "torch", "gop": default, "workers": max(1, cores - 2)})
    rows.append({"backend": "dali-cpu", "gop": default, "workers": max(1, cores - 2)})
    return rows


def decoded_frames_estimate(cfg: LoaderConfig) -> float:
    """Frames decoded per clip when each sampled frame is reached from the keyframe before it (what the
    fallback does, and NVDEC's seek-then-decode), over the first ESTIMATE_SAMPLES training draws."""
    ds = ShardDataset(cfg.index, "train")
    counts = []
    for sid in range(min(len(ds), ESTIMATE_SAMPLES)):
        sample = ds[sid]
        views = make_views(cfg, "train", 0, sid, sample)
        counts.append(decoded_frame_count(sample.video, view_frame_indices(cfg, sample.num_frames, views)))
    return float(np.mean(counts))


def measure(cfg: LoaderConfig, device: torch.device, iters: int, rounds: int) -> dict:
    loader = build_loader(cfg, "train", "train", device=device, dtype=torch.float32)
    batches = endless(loader, set_epoch=True)
    sync = device_sync(device)
    t0 = time.perf_counter()
    for _ in range(3 + PREFETCH):
        next(batches)
    warm_s = time.perf_counter() - t0
    times = []
    with GpuSampler(device) as gpu:
        for _ in range(rounds):
            if sync is not None:
                sync()
            start = time.perf_counter()
            for _ in range(iters):
                next(batches)
            if sync is not None:
                sync()
            times.append(time.perf_counter() - start)
    batches.close()
    clips_per_s = cfg.batch_size * iters / median(times)
    return {"clips_per_s": clips_per_s, "build_and_warmup_s": warm_s, **gpu.summary()}


def sweep(indexes: dict[int, Path], sizes, *, gpu: bool) -> Iterator[dict]:
    from benchmark.gpu.steps import default_gop

    default = default_gop(indexes)
    base = LoaderConfig(
        num_segments=8, batch_size=sizes.loader_batch, crop_size=sizes.crop, scale_size=sizes.scale
    )
    estimates: dict[int, float] = {}
    for spec in plan(sorted(indexes), default, gpu=gpu):
        gop = spec.pop("gop")
        cfg = dataclasses.replace(base, index=str(indexes[gop]), **spec)
        row = {"backend": cfg.backend, "gop": gop, "workers": cfg.workers, "batch": cfg.batch_size}
        if cfg.backend == "dali-gpu":
            row["dali_pipelines"] = cfg.dali_pipelines
        device = torch.device("cuda" if cfg.backend == "dali-gpu" else "cpu")
        try:
            row.update(measure(cfg, device, sizes.loader_iters, sizes.loader_rounds))
        except ValueError as err:  # a backend that cannot decode this codec says so (pipeline.build)
            yield {**row, "not_possible": str(err)}
            continue
        if gop not in estimates:
            estimates[gop] = decoded_frames_estimate(cfg)
        row["sampled_frames_per_s"] = row["clips_per_s"] * cfg.clip_length
        row["decoded_frames_per_clip_est"] = estimates[gop]
        row["decoded_frames_per_s_est"] = row["clips_per_s"] * estimates[gop]
        yield row
