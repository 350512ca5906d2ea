"""Backend selection and build_loader: the only module that knows every backend (none of them imports it)."""

from __future__ import annotations

import logging

import torch

from pipeline.loader import Loader, LoaderConfig
from pipeline.shards import read_codec

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali-gpu", "dali-cpu", "torch")
# Codecs DALI's CPU decoder handles; only intra-only ones are fast enough there to pick by default.
DALI_CPU_CODECS = ("mjpeg", "vp9", "vp8")
INTRA_ONLY_CODECS = ("mjpeg",)
# What DALI 2.4's `mixed` (NVDEC) video decoder accepts: MJPEG is not among them (every sample would fail
# "Failed to create video decoder"), although the operator's docstring lists it.
NVDEC_CODECS = ("h264", "hevc", "h265", "vp8", "vp9", "av1", "mpeg4")


def select_backend(requested: str, *, codec: str, device: torch.device | str) -> str:
    """auto: a CUDA device -> dali-gpu for NVDEC codecs, dali-cpu for MJPEG (decoded on the CPU, moved to the
    GPU as a batch); a CPU with MJPEG -> dali-cpu; otherwise torch."""
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
    return "dali-cpu" if codec in INTRA_ONLY_CODECS else "torch"


def build_loader(
    cfg: LoaderConfig,
    split: str = "train",
    mode: str = "train",
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Loader:
    """Build the loader for ``split`` with the backend cfg.backend resolves to (see select_backend)."""
    device = torch.device(device)
    backend = select_backend(cfg.backend, codec=read_codec(cfg.index), device=device)
    kwargs = dict(split=split, mode=mode, rank=rank, world_size=world_size, device=device, dtype=dtype)
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
