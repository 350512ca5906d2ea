"""MobileNetV2 (width 1.0, torchvision parameter names) with the TSM release's shift and our GC placement.

Shift (TSM release, archs/mobilenet_v2.py + ops/models.py): on the input of every inverted residual block
that has a residual connection (stride 1, in == out channels; all of them expand by 6), before its first
(expansion) 1x1 conv; the identity path is not shifted. That is 10 of the 17 blocks: features 3, 5, 6, 8, 9,
10, 12, 13, 15, 16.

GC (our definition: neither the GC nor the TSM repository has a MobileNetV2 variant): the same 10 blocks get a
GroupContext on the expanded (hidden, 6 x in channels) features after the depthwise conv -> BN and before its
ReLU6, the analogue of a bottleneck's conv2 -> bn2 (the spatial conv of the block, on its widest features).

Parameter names are torchvision's (features.0.0.weight ... features.18.1.*; the classifier is VideoNet's fc),
so a torchvision ImageNet MobileNetV2 state_dict loads strictly into the 2D part (see resnet.load_imagenet).
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import ContextFactory, imagenet_keys, init_backbone
from .temporal import TemporalShift

# (expansion ratio t, output channels c, blocks n, stride of the first block s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS, LAST_CHANNELS = 32, 1280


def conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: keys <name>.0.weight (conv) and <name>.1.* (BN)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """[1x1 expand -> BN -> ReLU6] -> 3x3 depthwise -> BN -> (gc) -> ReLU6 -> 1x1 project -> BN (+ input).

    `shift` acts on the input of the residual branch (before the expansion), `gc` on the depthwise output.
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        shift: TemporalShift | None = None,
        gc: nn.Module | None = None,
    ):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [conv_bn_relu6(inp, hidden, 1)]
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)  # torchvision's layout, hence its key names
        self.shift = shift
        self.gc = gc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *expand, depthwise, project, project_bn = self.conv
        out = x if self.shift is None else self.shift(x)
        for module in expand:
            out = module(out)
        dw_conv, dw_bn, dw_relu = depthwise
        out = dw_bn(dw_conv(out))
        if self.gc is not None:
            out = self.gc(out)
        out = project_bn(project(dw_relu(out)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """features.0 (stem) -> features.1..17 (inverted residuals) -> features.18 (1x1 to 1280); returns the
    final feature map (no pooling, no classifier)."""

    imagenet_classifier = "classifier."  # torchvision's Dropout + Linear, skipped by load_imagenet
    torchvision_name = "mobilenet_v2"
    num_features = LAST_CHANNELS

    def __init__(
        self,
        *,
        num_segments: int = 8,
        shift_div: int | None = None,
        context: ContextFactory | None = None,
    ):
        super().__init__()
        features = [conv_bn_relu6(3, STEM_CHANNELS, 3, stride=2)]
        inp, temporal_index = STEM_CHANNELS, 0
        for expand_ratio, oup, num_blocks, first_stride in INVERTED_RESIDUAL_SETTING:
            for i in range(num_blocks):
                stride = first_stride if i == 0 else 1
                shift, gc = None, None
                if stride == 1 and inp == oup:  # a residual block: the TSM release shifts exactly these
                    if shift_div is not None:
                        shift = TemporalShift(num_segments, shift_div)
                    if context is not None:
                        gc = context(inp * expand_ratio, temporal_index)
                    temporal_index += 1
                features.append(InvertedResidual(inp, oup, stride, expand_ratio, shift, gc))
                inp = oup
        features.append(conv_bn_relu6(inp, LAST_CHANNELS, 1))
        self.features = nn.Sequential(*features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's (and the TSM release's) initialisation; the calibrators keep GC's own."""
        init_backbone(self, nonlinearity="leaky_relu")  # kaiming_normal_'s default, as torchvision's

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.features(x_BCHW)

    def imagenet_keys(self) -> list[str]:
        """state_dict keys of the 2D part (what a torchvision MobileNetV2 has, minus the classifier)."""
        return imagenet_keys(self)
