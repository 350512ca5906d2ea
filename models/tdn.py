"""TDN ResNets (Wang et al., CVPR 2021: temporal difference networks) and GC-TDN.

Input contract: every one of the num_segments segments is frames_per_segment = 5 consecutive frames, so the
model takes x_NTCHW with T = 5 * num_segments (the loader takes 5 for a TDN name, config.frames_per_segment:
the 5 frames around each sampled index); the backbone sees them as N*T frames, segment-major, and returns one
feature map per segment. (The TDN release's loader draws each segment's first frame over the first L - 4
frames instead and takes the 4 after it; centring on the TSN index keeps one sampling rule for every model.)
Definitions follow the TDN release (MCG-NJU/TDN ops/tdn_net.py, ops/base_module.py) and its GC variant
(haoyanbin918/Group-Contextualization ops_tdn/tdn_net_gc.py, base_module_gc.py):

- Short-term difference module, on the input: the centre frame of each segment goes through the ResNet stem
  and layer1; the 4 differences of neighbouring frames (12 channels) go through a 2x2 average pool, a 7x7
  stride-2 conv -> BN -> ReLU -> max pool, and a layer1 of their own. After the stem and after layer1 the main
  path becomes alpha * main + beta * difference (nearest-upsampled to the main path's size): 0.5 / 0.5 with 8
  segments, 0.75 / 0.25 otherwise, as the release.
- Long-term difference module, in every block of layers 2-4 after conv1 -> bn1 -> ReLU: see
  LongTermDifference; then a learnable temporal shift (a depthwise temporal conv that starts as TSM's shift).
- GC-TDN: calibrators (with BatchNorm) in every block of the three layer1s and layers 2-4: after bn2 in layer1
  blocks (as GC-TSM), after bn1 (before the ReLU that feeds the long-term module) in layers 2-4.
- The ResNet convs have biases (TDN builds on the 'fbresnet'); ImageNet has none for them, so they keep
  PyTorch's default initialisation, as in the release. The difference modules' convs have no biases.

The 2D parts keep torchvision's names (conv1, bn1, layer1..4), so an ImageNet ResNet loads; the difference
path's layer1 is initialised from ImageNet's layer1 and its 12-channel conv from ImageNet's conv1 averaged
over RGB (the release's inflation), see TDNResNet.adapt_imagenet. The unused `conv1_temp` is left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import EXPANSION, Arch, BottleneckResNet, ContextFactory, init_backbone, make_stage, projection

FRAMES_PER_SEGMENT = 5


class LearnableShift(nn.Module):
    """Depthwise temporal conv (kernel 3 over T) started as TSM's shift: 1/shift_div of the channels from t+1,
    the next 1/shift_div from t-1, the rest unchanged (zeros at the clip ends); all its taps train."""

    def __init__(self, channels: int, num_segments: int, shift_div: int = 8):
        super().__init__()
        self.num_segments, self.fold = num_segments, channels // shift_div
        self.weight = nn.Parameter(torch.empty(channels, 1, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[: self.fold, 0, 2] = 1
            self.weight[self.fold : 2 * self.fold, 0, 0] = 1
            self.weight[2 * self.fold :, 0, 1] = 1

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_NCTHW = x_BCHW.unflatten(0, (-1, self.num_segments)).transpose(1, 2)
        kernel = self.weight[..., None, None]  # (C, 1, 3, 1, 1): over T only
        out = F.conv3d(x_NCTHW, kernel, padding=(1, 0, 0), groups=x_NCTHW.shape[1])
        return out.transpose(1, 2).flatten(0, 1)


class LongTermDifference(nn.Module):
    """TDN's long-term difference module: x + x * gate, the gate from feature differences between frames.

    r = C / 16 channels: b = BN(1x1 conv(x)); the forward difference of frame t is dw3x3(b)[t+1] - b[t] (zero
    for the last frame), the backward one dw3x3(b)[t-1] - b[t] (zero for the first). Each difference d gives
    sigmoid(BN(1x1 conv to C((d + up(BN(3x3(avgpool2(d)))) + BN(3x3(d))) / 3))) - 1/2 (the convs and BNs
    shared by both directions); the gate is the mean of the two.
    """

    def __init__(self, channels: int, num_segments: int, reduction: int = 16):
        super().__init__()
        self.num_segments = num_segments
        r = channels // reduction
        self.reduce = nn.Conv2d(channels, r, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(r)
        self.diff_conv = nn.Conv2d(r, r, 3, padding=1, groups=r, bias=False)
        self.pooled_conv = nn.Conv2d(r, r, 3, padding=1, bias=False)
        self.pooled_bn = nn.BatchNorm2d(r)
        self.full_conv = nn.Conv2d(r, r, 3, padding=1, bias=False)
        self.full_bn = nn.BatchNorm2d(r)
        self.expand = nn.Conv2d(r, channels, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(channels)

    def _gate(self, diff_BCHW: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled_bn(self.pooled_conv(F.avg_pool2d(diff_BCHW, 2)))
        pooled = F.interpolate(pooled, size=diff_BCHW.shape[-2:])
        full = self.full_bn(self.full_conv(diff_BCHW))
        return torch.sigmoid(self.expand_bn(self.expand((diff_BCHW + pooled + full) / 3))) - 0.5

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        b = self.reduce_bn(self.reduce(x_BCHW))
        b_NTCHW = b.unflatten(0, (-1, self.num_segments))
        conv_NTCHW = self.diff_conv(b).unflatten(0, (-1, self.num_segments))
        # F.pad lists (before, after) pairs from the last dim backwards; the frame dim is dim 1 of 5.
        forward_diff = F.pad(conv_NTCHW[:, 1:] - b_NTCHW[:, :-1], (0, 0) * 3 + (0, 1))
        backward_diff = F.pad(conv_NTCHW[:, :-1] - b_NTCHW[:, 1:], (0, 0) * 3 + (1, 0))
        gate = 0.5 * self._gate(forward_diff.flatten(0, 1)) + 0.5 * self._gate(backward_diff.flatten(0, 1))
        return x_BCHW + x_BCHW * gate


class TDNBottleneck(nn.Module):
    """A biased-conv bottleneck; with `temporal`, the long-term difference module and the learnable shift sit
    between conv1 and conv2 and the calibrators after bn1, otherwise the calibrators sit after bn2."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        *,
        num_segments: int,
        temporal: bool,
        gc: nn.Module | None = None,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.long_term = LongTermDifference(planes, num_segments) if temporal else None
        self.shift = LearnableShift(planes, num_segments) if temporal else None
        self.gc = gc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        if self.long_term is not None:
            if self.gc is not None:
                out = self.gc(out)
            out = self.shift(self.long_term(self.relu(out)))
        else:
            out = self.relu(out)
        out = self.bn2(self.conv2(out))
        if self.long_term is None and self.gc is not None:
            out = self.gc(out)
        out = self.relu(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ShortTermDifference(nn.Module):
    """The difference path: RGB differences of a segment's neighbouring frames -> 2x2 average pool -> 7x7
    stride-2 conv -> BN -> ReLU -> max pool (`stem`) -> its own layer1. Returns both outputs."""

    def __init__(self, width: int, frames_per_segment: int, layer1: nn.Sequential):
        super().__init__()
        self.conv = nn.Conv2d(3 * (frames_per_segment - 1), width, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = layer1

    def forward(self, x_SFCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diffs = (x_SFCHW[:, 1:] - x_SFCHW[:, :-1]).flatten(1, 2)  # (S, 3 (F - 1), H, W), frame-pair major
        stem = self.maxpool(self.relu(self.bn(self.conv(F.avg_pool2d(diffs, 2)))))
        return stem, self.layer1(stem)


class TDNResNet(BottleneckResNet):
    """Segments of frames_per_segment frames (N*S*F frames, segment-major) -> one feature map per segment."""

    def __init__(
        self,
        arch: Arch,
        *,
        num_segments: int = 8,
        context: ContextFactory | None = None,
        frames_per_segment: int = FRAMES_PER_SEGMENT,
    ):
        if frames_per_segment < 2:
            raise ValueError(
                f"TDN needs >= 2 frames per segment for its differences, got {frames_per_segment}"
            )
        super().__init__(arch, conv_bias=True)
        self.num_segments, self.frames_per_segment = num_segments, frames_per_segment
        self.main_weight, self.diff_weight = (0.5, 0.5) if num_segments == 8 else (0.75, 0.25)

        def block(stage: int, i: int, inplanes: int, planes: int, stride: int) -> nn.Module:
            index = sum(arch.layers[:stage]) + i  # GC's rotation counts every block
            gc = context(planes, index) if context is not None else None
            return TDNBottleneck(
                inplanes,
                planes,
                stride,
                projection(inplanes, planes, stride, bias=True),
                num_segments=num_segments,
                temporal=stage > 0,  # layer1 has no long-term module
                gc=gc,
            )

        # The difference path's layer1 comes from a second ResNet in the release: its own GC rotation count
        # (stage 0 again: it counts from 0, as the main layer1 does).
        diff_layer1 = make_stage(0, arch.width, arch.width, arch.layers[0], 1, block)
        self.short_term = ShortTermDifference(arch.width, frames_per_segment, diff_layer1)
        self.add_stages(arch, block)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv weights Kaiming (fan out), biases PyTorch's default, BN 1/0; calibrators and shifts: own."""
        init_backbone(self, own_init=(LearnableShift,))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_SFCHW = x_BCHW.unflatten(0, (-1, self.frames_per_segment))
        diff_stem, diff_layer1 = self.short_term(x_SFCHW)
        x = self.stem(x_SFCHW[:, self.frames_per_segment // 2])
        x = self.main_weight * x + self.diff_weight * F.interpolate(diff_stem, size=x.shape[-2:])
        x = self.layer1(x)
        x = self.main_weight * x + self.diff_weight * F.interpolate(diff_layer1, size=x.shape[-2:])
        return self.layer4(self.layer3(self.layer2(x)))

    def imagenet_keys(self) -> list[str]:
        """Keys an ImageNet ResNet provides (with adapt_imagenet): no conv biases, difference modules, shifts,
        calibrators or the difference stem's BN."""
        conv_biases = {f"{name}.bias" for name, m in self.named_modules() if isinstance(m, nn.Conv2d)}
        skip = (".gc.", ".long_term.", ".shift.", "short_term.bn.")
        return [k for k in self.state_dict() if k not in conv_biases and not any(s in k for s in skip)]

    def adapt_imagenet(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The release's init of the difference path: layer1 copied, the 12-channel conv = conv1 averaged over
        RGB and repeated for every input channel."""
        adapted = dict(state)
        adapted |= {f"short_term.{k}": v for k, v in state.items() if k.startswith("layer1.")}
        if "conv1.weight" in state:
            in_channels = self.short_term.conv.in_channels
            mean = state["conv1.weight"].mean(1, keepdim=True)
            adapted["short_term.conv.weight"] = mean.expand(-1, in_channels, -1, -1).contiguous()
        return adapted
