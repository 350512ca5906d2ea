"""The one place where distribution, memory format, compilation, DDP, SyncBN and precision are decided.

dist, device = runtime.init_distributed(cfg.run.device, cfg.run.dist_backend)
precision = runtime.resolve_precision(cfg.run.precision, device)
model = runtime.setup_model(build_model(...), device=device, channels_last=True, compile=True, ddp=True)
with runtime.autocast(precision, device.type):
    loss = criterion(model(x_NTCHW), labels_N)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """The requested device cannot be used here; the message says what to pass instead."""


# ------------------------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0, option: str = "--run.device") -> torch.device:
    """The one device rule of training, evaluation and prediction: auto = cuda if available; a plain `cuda`
    means this process's GPU (torchrun's LOCAL_RANK); any other torch device name as given. `option` is the
    command-line option the name came from, for the error message."""
    want = requested
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    except RuntimeError:
        raise DeviceError(f"{option} {requested!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"{option} {requested} asks for a GPU but torch sees none; use {option} cpu or auto"
        )
    return device


def init_distributed(device: str = "auto", backend: str = "auto") -> tuple[Dist, torch.device]:
    """Read torchrun's environment and start the process group once (NCCL on GPUs, gloo on CPUs)."""
    dist = Dist(
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )
    dev = resolve_device(device, dist.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.enabled and not torch_dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        with default_sigterm():
            torch_dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    return dist, dev


@contextlib.contextmanager
def default_sigterm():
    """SIGTERM's default action (end now) while a rank waits for its peers in init_process_group: Python runs
    signal handlers only between bytecodes, so inside gloo's C++ handshake the handler never ran and a
    SIGTERM waited for torchrun's SIGKILL 30 s later. Nothing is trained yet, so nothing is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


# -------------------------------------------------------------------------------------------------- precision


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 autocast is emulated (measured ~10x slower than fp32)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto = bf16 on CUDA, fp32 on CPUs (bf16 helps only some CPUs and hurts the rest by ~10x)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "%s autocast on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and ~10x slower than "
            "fp32: consider --run.precision fp32",
            precision,
        )
    return precision


def cpu_threads(requested: int, loader_workers: int) -> int:
    """torch's intra-op threads on a CPU: `requested`, or (0) the cores the loader's workers leave free.

    Oversubscription is what hurts: torch's OpenMP threads spin at their barriers, so while loader threads
    hold a core the whole step waits (the measured cost: docs/benchmark.md, "demo").
    """
    if requested:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores - loader_workers)


def use_cpu_threads(device: torch.device, requested: int, loader_workers: int) -> None:
    """The one threads policy of training and evaluation: on a CPU, torch gets cpu_threads(...) threads."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(requested, loader_workers))


# ---------------------------------------------------------------------------------------------------- models


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D parameters/buffers -> channels_last, 5-D (Conv3d) -> channels_last_3d; in place.

    The layout is written out explicitly: `.contiguous(memory_format=...)` is a no-op for 1x1 kernels (their
    strides already pass as channels_last), their gradients then come back in the other layout and DDP copies
    each one ("Grad strides do not match bucket view strides").
    """
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    for tensor in [*model.parameters(), *model.buffers()]:
        fmt = formats.get(tensor.dim())
        if fmt is not None:
            tensor.data = torch.empty_like(tensor.data, memory_format=fmt).copy_(tensor.data)
    return model


def setup_model(
    model: nn.Module,
    *,
    device: torch.device | str,
    channels_last: bool = True,
    compile: bool = False,
    ddp: bool = False,
    sync_bn: bool = False,
) -> nn.Module:
    """Move to device, then (in this order) SyncBN, channels_last, DDP, torch.compile.

    With channels_last the convolution weights are channels_last, so every conv output (and everything the
    model builds from it) stays channels_last even for a contiguous input. Use unwrap_model() to reach the
    plain module (state_dict keys, reset_classifier, param_groups).
    """
    device = torch.device(device)
    model = model.to(device)
    if sync_bn:
        if not ddp:
            raise ValueError("sync_bn=True needs ddp=True (SyncBatchNorm synchronises across DDP ranks)")
        if device.type != "cuda":
            raise ValueError(
                f"sync_bn=True needs CUDA devices (DDP accepts SyncBatchNorm on GPUs only), got "
                f"{device}: set sync_bn=False"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        to_channels_last(model)
    if ddp:
        if not torch.distributed.is_initialized():
            raise RuntimeError(
                "ddp=True needs torch.distributed.init_process_group() first (torchrun sets it up)"
            )
        device_ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=False
        )
    if compile:
        # Static shapes: training batches never change shape (drop_last), and automatic dynamic shapes after a
        # recompile (e.g. a smaller last eval batch) are slower and have failed to lower in inductor on CPU.
        model = torch.compile(model, dynamic=False)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """One autocast context for the whole step: fp32 = none, bf16 / fp16 = torch.autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (whose small range underflows gradients); None for fp32 / bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
