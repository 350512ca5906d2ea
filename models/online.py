"""Online TSM: frames arrive one at a time, each costs one 2D forward (the TSM online-demo scheme).

Offline TSM moves 1/shift_div of the channels of frame t+1 and 1/shift_div of frame t-1 into frame t, so
a frame's features wait for the next frame at every shifted block. Online mode uses the uni-directional
shift instead: the from-previous fold still comes from frame t-1, and the from-next fold, which would need
frame t+1, is zero, as it is for the last frame of every clip in training. Each shift then needs only the
previous frame's fold at its own point of the network: it caches that fold and concatenates it to the new
frame's channels, so the backbone runs on one frame per step and keeps no other state.

The offline counterpart is `causal_model(model)`: the same weights with `causal_shift` over T frames. Frame
t's per-frame logits there depend only on frames 0..t, and OnlineTSM fed the same frames one by one returns
the same per-frame logits (tests/test_online.py). GC calibrators look at the future (ECal-L's 3x1x1
temporal conv and ECal-T's temporal kernel see frame t+1, ECal-S's temporal mean and ECal-G's clip pooling
average over all T frames), and so do the non-local blocks (every position attends to all T frames): gc_*,
ecal_* and *_nl models are refused.

Generic over the registry: any VideoNet whose temporal modules are TemporalShift (tsm_* on ResNets, ResNeXt
and MobileNetV2, the backbone of the TSM online demo; tsn_* have none and run as a plain per-frame 2D
network). A backbone built from other blocks needs only to use TemporalShift. GST (3D convolutions over the
clip) and TDN (differences of 5 frames a segment) have other temporal modules and are refused too.

    online = OnlineTSM(build_model("tsm_r50", 400, 8), window=8)
    for frame_CHW in frames:           # normalised like the training frames
        logits_K = online.step(frame_CHW)   # mean of the last 8 frames' logits
    online.reset()                     # before the next video

`python -m models.online` measures frames/s of the online mode on this machine (random weights, see
docs/inference.md); `python train.py predict CKPT VIDEO --stream` runs it on a real video or camera.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from . import build_model
from .nonlocal_ import NonLocal3d
from .temporal import Calibrator, TemporalShift
from .video import VideoNet


def causal_shift(x_BCHW: torch.Tensor, num_segments: int, shift_div: int = 8) -> torch.Tensor:
    """temporal_shift with only the past -> present direction: the fold temporal_shift fills from frame t+1
    is zero, the next fold comes from frame t-1 (zero at t=0), the rest stays; same channel layout."""
    channels = x_BCHW.shape[1]
    fold = channels // shift_div
    x5 = x_BCHW.unflatten(0, (-1, num_segments))
    from_next, from_prev, keep = x5.split([fold, fold, channels - 2 * fold], dim=2)
    # F.pad lists (before, after) pairs from the last dim backwards; the frame dim is dim 1 of 5.
    delayed = F.pad(from_prev[:, :-1], (0, 0) * 3 + (1, 0))
    return torch.cat([torch.zeros_like(from_next), delayed, keep], dim=2).flatten(0, 1)


class CausalShift(TemporalShift):
    """TemporalShift with causal_shift: the offline model of the online mode."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return causal_shift(x_BCHW, self.num_segments, self.shift_div)


class CachedShift(nn.Module):
    """causal_shift one frame at a time: rows of x are the current frames of independent streams, and the
    from-previous fold of the last call is kept for the next one."""

    def __init__(self, shift_div: int):
        super().__init__()
        self.shift_div = shift_div
        self.previous: torch.Tensor | None = None

    def forward(self, x_SCHW: torch.Tensor) -> torch.Tensor:
        channels = x_SCHW.shape[1]
        fold = channels // self.shift_div
        from_next, from_prev, keep = x_SCHW.split([fold, fold, channels - 2 * fold], dim=1)
        previous = torch.zeros_like(from_prev) if self.previous is None else self.previous
        self.previous = from_prev
        return torch.cat([torch.zeros_like(from_next), previous, keep], dim=1)

    def extra_repr(self) -> str:
        return f"shift_div={self.shift_div}"


_NOT_SHIFTS = {"gst": "GST's 3D convolutions", "tdn": "TDN's differences of 5 frames a segment"}


def check_online(model: nn.Module) -> None:
    """ValueError when the model has temporal modules online mode cannot run: GST's 3D convolutions and TDN's
    frame differences (5 frames a segment) are not shifts, GC calibrators and non-local blocks need future
    frames."""
    families = sorted({type(m).__module__.rpartition(".")[2] for m in model.modules()} & set(_NOT_SHIFTS))
    if families:
        raise ValueError(
            f"{families[0]}_* models cannot run online: their temporal modules ({_NOT_SHIFTS[families[0]]}) "
            "are not temporal shifts that a one-frame cache can replace; online mode supports tsm_* and "
            "tsn_* models"
        )
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, Calibrator)})
    if kinds:
        raise ValueError(
            f"this model has GC calibrators ({', '.join(kinds)}), which need future frames: ECal-L's 3x1x1 "
            "temporal conv and ECal-T's temporal kernel see frame t+1, ECal-S's temporal mean and ECal-G's "
            "clip pooling average over all frames of the clip; online mode supports tsm_* and tsn_* models"
        )
    if any(isinstance(m, NonLocal3d) for m in model.modules()):
        raise ValueError(
            "this model has non-local blocks, which need future frames (every position attends to all "
            "frames of the clip); online mode supports tsm_* and tsn_* models without them"
        )


def _replace_shifts(model: nn.Module, make) -> nn.Module:
    """A deep copy of `model` in eval mode with every TemporalShift m replaced by make(m)."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if type(module) is TemporalShift:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make(module))
    return model


def causal_model(model: VideoNet) -> VideoNet:
    """The offline counterpart of OnlineTSM(model): a copy in eval mode with causal shifts over T frames."""
    check_online(model)
    return _replace_shifts(model, lambda shift: CausalShift(shift.num_segments, shift.shift_div))


def frame_logits(model: VideoNet, frames_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-frame logits (B, num_classes) of VideoNet's head in eval mode (before the average over T)."""
    return model.fc(model.backbone(frames_BCHW).mean((2, 3)))


class OnlineTSM:
    """One stream of frames through a copy of `model` with cached shifts; step() returns the mean logits of
    the last `window` frames (default: the model's num_segments; 1: per-frame logits)."""

    def __init__(self, model: VideoNet, window: int | None = None):
        check_online(model)
        self.model = _replace_shifts(model, lambda shift: CachedShift(shift.shift_div))
        self.recent_logits: deque[torch.Tensor] = deque(maxlen=window or model.num_segments)

    def reset(self) -> None:
        """Forget the past frames (call between videos)."""
        self.recent_logits.clear()
        for module in self.model.modules():
            if isinstance(module, CachedShift):
                module.previous = None

    @torch.no_grad()
    def step(self, frame_CHW: torch.Tensor) -> torch.Tensor:
        """The next frame (3, H, W) in -> mean logits (num_classes,) of the last `window` frames."""
        self.recent_logits.append(frame_logits(self.model, frame_CHW[None])[0])
        return torch.stack(tuple(self.recent_logits)).mean(0)


def _median_seconds(call, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.online",
        description="Frames/s of the online mode (one frame per step) against re-running the offline model "
        "on the last T frames for every new frame; random weights, fp32, this machine's CPU threads.",
    )
    parser.add_argument("--model", default="tsm_r50", help="a tsm_* or tsn_* registry name")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--num-segments", type=int, default=8, help="T of the offline sliding window")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: one frame's forward is too small to share out; measured on 2 "
        "cores, tsm_mbv2: 0.5 frames/s with torch's default of a thread per core, 19.6 with 1)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        model = build_model(args.model, 400, args.num_segments).eval()
        online = OnlineTSM(model)
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    frame = torch.randn(3, args.size, args.size)
    clip = torch.randn(1, args.num_segments, 3, args.size, args.size)
    with torch.inference_mode():
        step = _median_seconds(lambda: online.step(frame), args.warmup, args.iters)
        window = _median_seconds(lambda: model(clip), max(1, args.warmup // 2), max(3, args.iters // 4))
    sys.stdout.write(
        f"{args.model} {args.size}x{args.size}, {torch.get_num_threads()} thread(s), median seconds per "
        f"frame after {args.warmup} untimed steps:\n"
        f"  online (one frame per step):            {1 / step:7.1f} frames/s ({step * 1e3:.1f} ms/frame)\n"
        f"  offline on the last {args.num_segments} frames per frame: {1 / window:7.1f} frames/s "
        f"({window * 1e3:.1f} ms/frame)\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
