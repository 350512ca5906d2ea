"""Temporal operators on frame batches: the TSM shift and the GC calibrators (ECal-L/T/S/G).

Every operator takes x_BCHW with B = N*T, frame-major inside each clip (row n*T + t is frame t of clip n), and
returns a tensor of the same shape and memory format. Nothing here allocates zeros and slice-assigns into
them: outputs are built with split / F.pad / torch.cat so autograd and torch.compile see plain functional ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CALIBRATOR_KINDS = ("l", "t", "s", "g")  # the GC group order: local, temporal, spatial, global


def temporal_shift(x_BCHW: torch.Tensor, num_segments: int, shift_div: int = 8) -> torch.Tensor:
    """Shift 1/shift_div of the channels from frame t+1, the next 1/shift_div from t-1 (zeros at ends)."""
    channels = x_BCHW.shape[1]
    fold = channels // shift_div
    if x_BCHW.is_contiguous(memory_format=torch.channels_last):
        # (N, T, H, W, C) is a free view of a channels_last batch; shifting there keeps the output
        # channels_last.
        x5, cdim = x_BCHW.permute(0, 2, 3, 1).unflatten(0, (-1, num_segments)), 4
    else:
        x5, cdim = x_BCHW.unflatten(0, (-1, num_segments)), 2
    from_next, from_prev, keep = x5.split([fold, fold, channels - 2 * fold], dim=cdim)
    # F.pad lists (before, after) pairs from the last dim backwards; the frame dim is dim 1 of 5.
    pad_end = (0, 0) * 3 + (0, 1)
    pad_start = (0, 0) * 3 + (1, 0)
    out5 = torch.cat([F.pad(from_next[:, 1:], pad_end), F.pad(from_prev[:, :-1], pad_start), keep], dim=cdim)
    out = out5.flatten(0, 1)
    return out.permute(0, 3, 1, 2) if cdim == 4 else out


class TemporalShift(nn.Module):
    """Parameter-free module form of temporal_shift (so it shows up in print(model))."""

    def __init__(self, num_segments: int, shift_div: int = 8):
        super().__init__()
        self.num_segments, self.shift_div = num_segments, shift_div

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return temporal_shift(x_BCHW, self.num_segments, self.shift_div)

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, shift_div={self.shift_div}"


class Calibrator(nn.Module):
    """x -> x * sigmoid(context(x)) on one channel group; subclasses define the context."""

    def __init__(self, channels: int, num_segments: int):
        super().__init__()
        self.channels, self.num_segments = channels, num_segments

    def reset_parameters(self) -> None:
        """The reference's initialisation: convs Xavier-normal, the linear N(0, 0.001), BN weight 1 bias 0."""
        for module in self.children():
            if isinstance(module, nn.modules.conv._ConvNd):
                nn.init.xavier_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.001)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_segments={self.num_segments}"


class ECalL(Calibrator):
    """Local: per-element gate from a temporal (3,1,1) conv over the group."""

    def __init__(self, channels: int, num_segments: int, norm: bool = True):
        super().__init__(channels, num_segments)
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.bn = nn.BatchNorm3d(channels) if norm else nn.Identity()
        self.reset_parameters()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # (N, C, T, H, W) view: for a channels_last batch this is channels_last_3d, so Conv3d needs no copy.
        x_NCTHW = x_BCHW.unflatten(0, (-1, self.num_segments)).transpose(1, 2)
        gate_NCTHW = torch.sigmoid(self.bn(self.conv(x_NCTHW)))
        return (x_NCTHW * gate_NCTHW).transpose(1, 2).flatten(0, 1)


class ECalT(Calibrator):
    """Temporal: per-frame, per-channel gate from a temporal conv over spatially pooled features."""

    def __init__(self, channels: int, num_segments: int, norm: bool = True):
        super().__init__(channels, num_segments)
        self.conv = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(channels) if norm else nn.Identity()
        self.reset_parameters()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        s_NCT = x_BCHW.mean((2, 3)).unflatten(0, (-1, self.num_segments)).transpose(1, 2)
        gate_NCT = torch.sigmoid(self.bn(self.conv(s_NCT)))
        gate_BC11 = gate_NCT.transpose(1, 2).flatten(0, 1)[:, :, None, None]
        return x_BCHW * gate_BC11


class ECalS(Calibrator):
    """Spatial: per-position gate from a dilated 3x3 conv over temporally pooled features, shared by frames.

    The reference also creates a BatchNorm2d here that its forward never applies; it is left out
    (models.convert drops its entries from released checkpoints).
    """

    def __init__(self, channels: int, num_segments: int, norm: bool = True):
        super().__init__(channels, num_segments)
        self.conv = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False)
        self.reset_parameters()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_NTCHW = x_BCHW.unflatten(0, (-1, self.num_segments))
        gate_NCHW = torch.sigmoid(self.conv(x_NTCHW.mean(1)))
        return (x_NTCHW * gate_NCHW.unsqueeze(1)).flatten(0, 1)


class ECalG(Calibrator):
    """Global: per-channel gate from clip-level pooled features."""

    def __init__(self, channels: int, num_segments: int, norm: bool = True):
        super().__init__(channels, num_segments)
        self.linear = nn.Linear(channels, channels, bias=False)
        self.bn = nn.BatchNorm1d(channels) if norm else nn.Identity()
        self.reset_parameters()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_NTCHW = x_BCHW.unflatten(0, (-1, self.num_segments))
        gate_NC = torch.sigmoid(self.bn(self.linear(x_NTCHW.mean((1, 3, 4)))))
        return (x_NTCHW * gate_NC[:, None, :, None, None]).flatten(0, 1)


CALIBRATORS: dict[str, type[Calibrator]] = {"l": ECalL, "t": ECalT, "s": ECalS, "g": ECalG}


class GroupContext(nn.Module):
    """Calibrate channel groups of a bottleneck's conv2 output, one calibrator per group, rest unchanged.

    The channels are split into `num_groups` groups of `group_channels` (plus any remainder, never
    calibrated); calibrator j of `kinds` acts on group (offset + j) % num_groups. GC: kinds l,t,s,g with
    num_groups = cdiv; a single-calibrator variant: one kind on the first planes // ratio channels
    (num_groups = 1). norm=False: calibrators without their BatchNorm (GC-GST's, which sit before bn2).
    """

    def __init__(
        self,
        planes: int,
        kinds: tuple[str, ...],
        group_channels: int,
        num_groups: int,
        num_segments: int,
        offset: int = 0,
        norm: bool = True,
    ):
        super().__init__()
        if group_channels < 1 or group_channels * num_groups > planes or len(kinds) > num_groups:
            raise ValueError(
                f"cannot place {len(kinds)} calibrator(s) of {group_channels} channels in "
                f"{num_groups} group(s) of a {planes}-channel conv: lower cdiv / ratio"
            )
        rest = planes - group_channels * num_groups
        self.split_sizes = [group_channels] * num_groups + ([rest] if rest else [])
        self.targets = [(offset + j) % num_groups for j in range(len(kinds))]
        self.kinds = tuple(kinds)
        for kind in kinds:
            self.add_module(f"ecal_{kind}", CALIBRATORS[kind](group_channels, num_segments, norm))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        groups = list(x_BCHW.split(self.split_sizes, dim=1))
        for kind, target in zip(self.kinds, self.targets):
            groups[target] = getattr(self, f"ecal_{kind}")(groups[target])
        return torch.cat(groups, dim=1)

    def extra_repr(self) -> str:
        return f"split_sizes={self.split_sizes}, targets={self.targets}"
