"""Backend selection and build_loader: the only module that knows every backend (none of them imports it)."""

from __future__ import annotations

import logging

import torch

from pipeline.loader import Loader, LoaderConfig, TestViews
from pipeline.shards import read_codec

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali-gpu", "dali-cpu", "torch")
# Codecs DALI's CPU decoder handles (MJPEG through the JPEG-frames graph, VP8/VP9 through fn.decoders.video).
DALI_CPU_CODECS = ("mjpeg", "vp9", "vp8")
# The backends that decode on the CPU, per codec, fastest first, as `python -m benchmark dali_cpu` ranked
# them at Kinetics geometry side by side in alternating rounds (the figures: docs/benchmark.md, "dali_cpu",
# and its results file). `auto` reads this order instead of probing both backends at start-up: a probe costs
# seconds of pipeline and worker start-up per run, and on a shared machine its noise could pick a different
# backend from one run to the next. Decoding on the CPU is what is ranked, so the order serves CUDA machines
# too (MJPEG batches decoded on the CPU, moved to the GPU). A codec absent here goes to the torch fallback,
# which seeks to keyframes (DALI's CPU video decoder decodes every frame up to the last one asked for).
CPU_BACKENDS_FASTEST_FIRST: dict[str, tuple[str, ...]] = {
    "mjpeg": ("dali-cpu", "torch"),
}
# What DALI 2.4's `mixed` (NVDEC) video decoder accepts: MJPEG is not among them (every sample would fail
# "Failed to create video decoder"), although the operator's docstring lists it.
NVDEC_CODECS = ("h264", "hevc", "h265", "vp8", "vp9", "av1", "mpeg4")


def fastest_cpu_backend(codec: str, ranking: dict[str, tuple[str, ...]] | None = None) -> str:
    """The CPU-decoding backend ranked fastest for ``codec`` (CPU_BACKENDS_FASTEST_FIRST), among those
    that can decode it; torch where nothing was ranked."""
    order = (CPU_BACKENDS_FASTEST_FIRST if ranking is None else ranking).get(codec, ())
    usable = [b for b in order if b == "torch" or (b == "dali-cpu" and codec in DALI_CPU_CODECS)]
    return usable[0] if usable else "torch"


def select_backend(requested: str, *, codec: str, device: torch.device | str) -> str:
    """auto: a CUDA device with an NVDEC codec -> dali-gpu; otherwise the CPU-decoding backend ranked
    fastest for the codec (fastest_cpu_backend: dali-cpu for MJPEG today, torch for the rest)."""
    device = torch.device(device)
    codec = codec.lower()
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "dali-gpu" and device.type != "cuda":
        raise ValueError("backend dali-gpu decodes with NVDEC and needs a CUDA device; use dali-cpu or torch")
    if requested == "dali-gpu" and codec not in NVDEC_CODECS:
        raise ValueError(
            f"NVDEC (backend dali-gpu) cannot decode {codec!r} (only {', '.join(NVDEC_CODECS)}); use backend "
            f"dali-cpu (decodes on the CPU, then moves batches to the GPU), or re-shard with --codec h264"
        )
    if requested == "dali-cpu" and codec not in DALI_CPU_CODECS:
        raise ValueError(
            f"DALI's CPU video decoder cannot decode {codec!r} (only {DALI_CPU_CODECS}); "
            f"use backend torch, dali-gpu, or re-shard with codec mjpeg"
        )
    if requested != "auto":
        return requested
    if device.type == "cuda" and codec in NVDEC_CODECS:
        return "dali-gpu"
    return fastest_cpu_backend(codec)


def build_loader(
    cfg: LoaderConfig,
    split: str = "train",
    mode: str = "train",
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    views: TestViews | None = None,
) -> Loader:
    """Build the loader for ``split`` with the backend cfg.backend resolves to (see select_backend). In test
    mode each video gives ``views``' clips x crops (None: one clip, one centre crop; evaluation passes its
    EvalConfig, a TestViews); train and val ignore it."""
    device = torch.device(device)
    backend = select_backend(cfg.backend, codec=read_codec(cfg.index), device=device)
    kwargs = dict(
        split=split, mode=mode, rank=rank, world_size=world_size, device=device, dtype=dtype, views=views
    )
    if backend == "torch":
        from pipeline.torch_loader import TorchLoader

        loader: Loader = TorchLoader(cfg, **kwargs)
    else:
        from pipeline.dali_loader import DaliLoader

        loader = DaliLoader(cfg, gpu=backend == "dali-gpu", **kwargs)
    log.info(
        "%s loader for %s/%s (%s): %d samples, %d batches on rank %d/%d",
        backend,
        cfg.index,
        split,
        mode,
        loader.num_samples,
        len(loader),
        rank,
        world_size,
    )
    return loader
