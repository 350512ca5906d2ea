"""GST ResNets (Luo & Yuille, ICCV 2019: grouped spatial-temporal aggregation) and GC-GST.

Each bottleneck's 3x3 conv becomes two grouped convs: the first planes // beta channels feed a spatial 3x3
conv (per frame) with planes * (alpha - 1) / alpha outputs, the other channels a 3x3x3 conv over (T, H, W)
with planes / alpha outputs; the two outputs are concatenated, spatial first (alpha = 4, beta = 2, as the GST
and GC releases train it; beta = 1 feeds all channels to both). Every block of every stage is a GST block.

GC-GST (the GC repository's nets/GC_GST.py) calibrates that concatenated output *before* bn2, with
calibrators that have no BatchNorm of their own (its `*nb` calibrators): bn2 normalises the result.

The 2D parts keep torchvision's names and shapes (the release's (1, k, k) Conv3d are per-frame Conv2d here);
`conv2` is the spatial group, initialised from ImageNet's 3x3 weight sliced to its first outputs and inputs,
as the GST release does (adapt_imagenet); `tconv` keeps its own initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .resnet import EXPANSION, Arch, BottleneckResNet, ContextFactory, init_backbone, projection


class GSTBottleneck(nn.Module):
    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        *,
        num_segments: int,
        alpha: int = 4,
        beta: int = 2,
        gc: nn.Module | None = None,
    ):
        super().__init__()
        if beta not in (1, 2) or planes % alpha or planes % beta:
            raise ValueError(
                f"GST needs beta 1 or 2 and planes divisible by alpha, beta; got {alpha}, {beta}"
            )
        self.num_segments, self.beta = num_segments, beta
        group_in = planes // beta
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(group_in, planes // alpha * (alpha - 1), 3, stride, 1, bias=False)
        self.tconv = nn.Conv3d(
            group_in, planes // alpha, 3, stride=(1, stride, stride), padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.gc = gc

    def grouped_conv(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The GST conv: spatial 3x3 on the first channel group, 3x3x3 over (T, H, W) on the other."""
        if self.beta == 2:
            spatial_in, temporal_in = x_BCHW.chunk(2, dim=1)
        else:
            spatial_in = temporal_in = x_BCHW
        x_NCTHW = temporal_in.unflatten(0, (-1, self.num_segments)).transpose(1, 2)
        temporal = self.tconv(x_NCTHW).transpose(1, 2).flatten(0, 1)
        return torch.cat([self.conv2(spatial_in), temporal], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.grouped_conv(out)
        if self.gc is not None:
            out = self.gc(out)
        out = self.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class GSTResNet(BottleneckResNet):
    """conv1 -> bn1 -> relu -> maxpool -> layer1..4 of GST bottlenecks; returns the final feature map."""

    def __init__(
        self,
        arch: Arch,
        *,
        num_segments: int = 8,
        context: ContextFactory | None = None,
        alpha: int = 4,
        beta: int = 2,
    ):
        super().__init__(arch)

        def block(stage: int, i: int, inplanes: int, planes: int, stride: int) -> nn.Module:
            downsample = projection(inplanes, planes, stride)
            index = sum(arch.layers[:stage]) + i  # every block is a GST block: GC's rotation counts them all
            gc = context(planes, index) if context is not None else None
            return GSTBottleneck(
                inplanes,
                planes,
                stride,
                downsample,
                num_segments=num_segments,
                alpha=alpha,
                beta=beta,
                gc=gc,
            )

        self.add_stages(arch, block)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_backbone(self, convs=(nn.Conv2d, nn.Conv3d))

    def imagenet_keys(self) -> list[str]:
        """Keys an ImageNet ResNet provides (conv2 sliced): all but the temporal convs and the calibrators."""
        return [k for k in self.state_dict() if ".gc." not in k and ".tconv." not in k]

    def adapt_imagenet(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ImageNet's 3x3 conv2 weights sliced to the spatial group's outputs and inputs (the GST init)."""
        own = self.state_dict()
        adapted = dict(state)
        for key, value in state.items():
            if key.endswith(".conv2.weight") and key in own and value.dim() == 4:
                out_channels, in_channels = own[key].shape[:2]
                adapted[key] = value[:out_channels, :in_channels]
        return adapted
