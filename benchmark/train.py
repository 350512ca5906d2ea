"""End-to-end training throughput: clips/s of train.py's real step, on shards and on in-memory data.

    python -m benchmark train --quick                          # CPU: gc_tsm_mini, the demo's shapes
    python -m benchmark train --quick --kinetics               # CPU: gc_tsm_mini at Kinetics geometry
    python -m benchmark train --index data/k400/index.json     # GPU: gc_tsm_r50 / tsm_r50, bf16, compiled

--kinetics (CPU): the Kinetics recipe's data geometry (short side 256, multi-scale crop to 224, flip, T=8,
batch 8) with gc_tsm_mini, on H.264 shards (preprocess's default GOP) of the five Kinetics clips of
../shared/data x20, built into --data-dir unless --index names existing shards, read by the torch fallback
(auto on a CPU) with --workers DataLoader workers. On a CPU torch gets the cores the loader's workers leave
free (runtime.cpu_threads, as train.py does): oversubscribed cores make both sides wait.

For every model the step (optimisation.train_step: forward, loss, backward, clip, SGD, schedule) is timed with
a device synchronisation before each clock read, warm-up calls excluded (compilation happens there), medians
reported. "shards" rows pull each batch from the real loader (pipeline.build_loader) and report the share of
the step time spent waiting for it; "synthetic" rows reuse one batch on the device, the ceiling the loader is
measured against. Where nvidia-smi exists, GPU and NVDEC (decoder) utilisation and memory are sampled during
the timed calls.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

import checkpoints
import config
import optimisation
import runtime
from benchmark.common import Plot, median, nvidia_smi_id, timeit, write_results
from pipeline import build_loader
from pipeline.loader import explicit_device

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index",
        default=None,
        help="dataset index.json for the 'shards' rows (skipped when missing; default "
        "data/synthetic/index.json, with --kinetics H.264 shards of the Kinetics clips built for the run)",
    )
    parser.add_argument("--models", default=None, help="comma-separated model names (default by mode)")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step")
    parser.add_argument("--num-segments", type=int, default=8)
    parser.add_argument(
        "--precision", default=None, help="fp32 | bf16 | fp16 (default: bf16 on GPU, fp32 on CPU)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="do not torch.compile (compiled on GPU otherwise)"
    )
    parser.add_argument(
        "--kinetics",
        action="store_true",
        help="CPU: Kinetics geometry (224 crops of 256p shards, T=8, batch 8)",
    )
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's)")
    parser.add_argument("--backend", default=None, help="loader backend (default: the config's, auto)")
    parser.add_argument(
        "--data-dir", default=None, help="--kinetics: keep the built shards here (default: a temp dir)"
    )


class GpuSampler:
    """nvidia-smi sampled every 200 ms in a thread: GPU and decoder utilisation (%), memory used (MiB)."""

    FIELDS = ("utilization.gpu", "utilization.decoder", "memory.used")

    def __init__(self, device: torch.device):
        self.samples: list[tuple[float, ...]] = []
        self.enabled = device.type == "cuda"
        self.id = nvidia_smi_id(explicit_device(device).index) if self.enabled else ""

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={self.id}",
                    f"--query-gpu={','.join(self.FIELDS)}",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(tuple(float(v) for v in line.split(",")))
            except ValueError:
                continue

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        cols = list(zip(*self.samples))
        return {
            "gpu_util_pct": statistics.median(cols[0]),
            "nvdec_util_pct": statistics.median(cols[1]),
            "gpu_mem_used_mib": max(cols[2]),
        }


def bench_config(args: argparse.Namespace, model: str) -> config.Config:
    quick = args.quick or args.device == "cpu"
    cfg = config.demo() if quick else config.gc_tsm_r50_k400_8f()
    overrides = [
        "--model.name",
        model,
        "--data.index",
        args.index,
        "--data.num_segments",
        str(args.num_segments),
        "--model.pretrained",
        "",
        "--run.precision",
        args.precision or ("fp32" if quick else "bf16"),
        "--run.device",
        args.device,
        "--model.compile",
        str(not (quick or args.no_compile)),
    ]
    if getattr(args, "kinetics", False):
        overrides += KINETICS_GEOMETRY
    if args.batch_size:
        overrides += ["--data.batch_size", str(args.batch_size)]
    elif not quick:
        overrides += ["--data.batch_size", "32"]
    for option, value in (
        ("workers", getattr(args, "workers", None)),
        ("backend", getattr(args, "backend", None)),
    ):
        if value is not None:
            overrides += [f"--data.{option}", str(value)]
    return config.validate(config.apply_overrides(cfg, overrides))


# The Kinetics recipe's data geometry (config._kinetics) on top of the CPU demo config.
KINETICS_GEOMETRY = [
    "--data.crop_size=224",
    "--data.scale_size=256",
    "--data.scales=1.0,0.875,0.75,0.66",
    "--data.flip=true",
    "--data.batch_size=8",
]


def kinetics_index(args: argparse.Namespace, root: Path) -> str:
    """--index if given, else H.264 shards (preprocess's default GOP) of the Kinetics clips x20 (never the
    demo set: its 64x64 clips are not Kinetics geometry)."""
    if args.index is not None:
        return args.index
    from benchmark.loader import build_shards, repeated_index
    from preprocess.ffmpeg_args import EncodeSettings

    gop = EncodeSettings().gop
    log.info("building H.264 shards (GOP %d) of the Kinetics clips x20 in %s", gop, root)
    return str(repeated_index(build_shards(root / f"h264-256-g{gop}", codec="h264", gop=gop), 20))


def torch_threads(cfg: config.Config) -> int:
    """As train.py: the cores the loader's workers leave free, for the synthetic row too, so that the two
    rows differ by the loader alone (measured on 2 shared cores: 2 threads made the synthetic step 4x slower
    than 1, which would say nothing about the loader)."""
    return runtime.cpu_threads(cfg.run.threads, cfg.data.workers)


def run_one(cfg: config.Config, data: str, args: argparse.Namespace, warmup: int, iters: int) -> dict:
    """One row: training steps of cfg's model on `data` (shards through the loader, or one fixed synthetic
    batch), timed after a first step that compiles and starts the loader."""
    device = torch.device(args.device)
    precision = runtime.resolve_precision(cfg.run.precision, device)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.set_num_threads(torch_threads(cfg))
    loader = build_loader(cfg.data, split="train", mode="train", device=device) if data == "shards" else None
    num_classes = len(loader.classes) if loader is not None else (400 if cfg.data.crop_size > 100 else 8)
    net, opt = model_and_optimiser(cfg, num_classes, device, precision)
    waits: list[float] = []
    next_batch = batch_source(cfg, loader, num_classes, device, waits)

    def step() -> None:
        x, y = next_batch()
        optimisation.train_step(net, x, y, opt, precision, device.type)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timeit(step, warmup=warmup, iters=1, sync=sync)  # compilation and loader start-up
    waits.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with GpuSampler(device) as gpu:
        times = timeit(step, warmup=0, iters=iters, sync=sync)
    row = {
        "model": cfg.model.name,
        "data": data,
        "batch_size": cfg.data.batch_size,
        "num_segments": cfg.data.num_segments,
        "crop": cfg.data.crop_size,
        "precision": precision,
        "compile": cfg.model.compile,
        "step_ms": 1000 * median(times),
        "clips_per_s": cfg.data.batch_size / median(times),
        "data_wait": sum(waits) / sum(times) if waits else 0.0,
        "torch_threads": torch.get_num_threads(),
    }
    if loader is not None:
        row["backend"] = getattr(loader, "backend", "?")
        row["workers"] = cfg.data.workers
    if device.type == "cuda":
        row["torch_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    row.update(gpu.summary())
    return row


def model_and_optimiser(cfg: config.Config, num_classes: int, device: torch.device, precision: str):
    """The model as train.py wraps it (channels last, compiled if asked), in train mode, and its optimiser."""
    model = checkpoints.build_model(cfg, num_classes)
    net = runtime.setup_model(
        model, device=device, channels_last=cfg.model.channels_last, compile=cfg.model.compile
    )
    opt = optimisation.Optimisation.build(
        model,
        cfg,
        steps_per_epoch=1000,
        global_batch=cfg.data.batch_size,
        precision=precision,
        device=device,
    )
    net.train()
    return net, opt


def batch_source(cfg: config.Config, loader, num_classes: int, device: torch.device, waits: list[float]):
    """A function giving the next (x, y): the loader's batches epoch after epoch (each wait appended to
    `waits`), or without a loader one fixed random batch."""
    if loader is None:
        b, t, s = cfg.data.batch_size, cfg.data.num_segments, cfg.data.crop_size
        # laid out as the loaders deliver it (channels last in memory: pipeline.loader.Loader.to_output), so
        # the rows differ by the loader alone (CPU convolutions run at different speeds on the two layouts)
        x_NTHWC = torch.randn(b, t, s, s, 3, device=device)
        fixed = (x_NTHWC.permute(0, 1, 4, 2, 3), torch.randint(0, num_classes, (b,), device=device))
        return lambda: fixed

    def epochs():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    batches = epochs()

    def next_batch():
        t0 = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - t0)
        return batch

    return next_batch


def main(args: argparse.Namespace) -> int:
    quick = args.quick or args.device == "cpu"
    warmup = args.warmup if args.warmup is not None else (3 if quick else 15)
    iters = args.iters if args.iters is not None else (10 if quick else 50)
    tmp = None
    if getattr(args, "kinetics", False):
        data_dir = getattr(args, "data_dir", None)
        tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="gcvideo-bench-train-")
        args.index = kinetics_index(args, Path(data_dir or tmp.name))
    elif args.index is None:
        args.index = "data/synthetic/index.json"
    try:
        return run_all(args, quick, warmup, iters)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run_all(args: argparse.Namespace, quick: bool, warmup: int, iters: int) -> int:
    if args.models:
        names = args.models.split(",")
    elif getattr(args, "kinetics", False):
        names = ["gc_tsm_mini"]
    else:
        names = ["gc_tsm_mini", "tsn_mini"] if quick else ["gc_tsm_r50", "tsm_r50"]
    datas = ["synthetic"] + (["shards"] if Path(args.index).exists() else [])
    if "shards" not in datas:
        log.warning(
            "%s not found: only synthetic-data rows (build shards with python -m preprocess)", args.index
        )
    rows = []
    for name, data in itertools.product(names, datas):
        cfg = bench_config(args, name)
        row = run_one(cfg, data, args, warmup, iters)
        log.info("%s", row)
        rows.append(row)
    meta = {
        "quick": quick,
        "warmup": warmup,
        "iters": iters,
        "index": args.index,
        "kinetics_geometry": bool(getattr(args, "kinetics", False)),
        "device": args.device,
        "what": "clips/s of optimisation.train_step (median over timed steps, synchronised), data_wait = "
        "share of step time spent in next(loader)",
    }
    path = write_results(
        "train_kinetics" if meta["kinetics_geometry"] else "train",
        rows,
        meta=meta,
        plots=[Plot(x="model", y="clips_per_s", group="data", title="Training throughput")],
    )
    log.info("results: %s", path)
    return 0
