"""The one place where memory format, compilation, DDP, SyncBN and precision are applied to a model.

model = runtime.setup_model(build_model(...), device=device, channels_last=True, compile=True, ddp=True)
with runtime.autocast("bf16", device.type):
    loss = criterion(model(x_NTCHW), labels_N)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D parameters/buffers -> channels_last, 5-D (Conv3d) -> channels_last_3d; in place."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    for tensor in [*model.parameters(), *model.buffers()]:
        fmt = formats.get(tensor.dim())
        if fmt is not None:
            tensor.data = tensor.data.contiguous(memory_format=fmt)
    return model


def setup_model(
    model: nn.Module,
    *,
    device: torch.device | str,
    channels_last: bool = True,
    compile: bool = False,
    ddp: bool = False,
    sync_bn: bool = False,
    find_unused: bool = False,
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
            model, device_ids=device_ids, find_unused_parameters=find_unused
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
