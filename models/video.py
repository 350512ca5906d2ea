"""TSN head around a frame backbone: per-frame classifier, average consensus over the T frames, partial BN."""

from __future__ import annotations

import torch
from torch import nn


class VideoNet(nn.Module):
    """x_NTCHW (N, T, 3, H, W) -> logits (N, num_classes), T = num_segments * frames_per_segment; backbone: a
    frame network (ResNet, MobileNetV2, GST, TDN) with num_features output channels.

    backbone (frames as a batch of N*T images) -> global average pool -> dropout -> fc per frame -> mean
    over T. A backbone that takes frames_per_segment > 1 consecutive frames per segment (TDN: 5) returns one
    feature map per segment, and the classifier and the mean work on the num_segments segments.
    With partial_bn, every BatchNorm2d of the backbone except the first stays in eval mode with frozen affine
    parameters while training (TSN's partial BN).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_segments: int,
        *,
        dropout: float = 0.5,
        partial_bn: bool = False,
        frames_per_segment: int = 1,
    ):
        super().__init__()
        self.num_segments = num_segments
        self.frames_per_segment = frames_per_segment
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.num_features, num_classes)
        self._init_fc()
        self.partial_bn = partial_bn
        bn_names = [name for name, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
        self._partial_bn_names = bn_names[1:]
        if partial_bn:
            for bn in self.frozen_bns():
                bn.requires_grad_(False)

    def _init_fc(self) -> None:
        nn.init.normal_(self.fc.weight, 0.0, 0.001)
        nn.init.zeros_(self.fc.bias)

    def frozen_bns(self) -> list[nn.Module]:
        """The layers partial BN freezes: every BatchNorm2d of the backbone but the first. Looked up by the
        names recorded at construction, so they are the same modules after SyncBatchNorm conversion (which
        keeps names but not the BatchNorm2d class)."""
        modules = dict(self.backbone.named_modules())
        return [modules[name] for name in self._partial_bn_names]

    def train(self, mode: bool = True) -> VideoNet:
        super().train(mode)
        if mode and self.partial_bn:
            for bn in self.frozen_bns():
                bn.eval()
        return self

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier (for fine-tuning on another label set), on the old one's device and dtype."""
        old = self.fc
        self.fc = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        self._init_fc()

    def classifier_names(self) -> list[str]:
        """Names (in named_parameters) of the classifier's parameters, for 'fc lr x5' style policies."""
        return [f"fc.{name}" for name, _ in self.fc.named_parameters()]

    @property
    def input_frames(self) -> int:
        """Frames per clip the model takes: num_segments * frames_per_segment."""
        return self.num_segments * self.frames_per_segment

    def forward(self, x_NTCHW: torch.Tensor) -> torch.Tensor:
        n, t = x_NTCHW.shape[:2]
        if t != self.input_frames:
            per_segment = (
                f" x frames_per_segment={self.frames_per_segment} = {self.input_frames}"
                if self.frames_per_segment > 1
                else ""
            )
            raise ValueError(
                f"input has {t} frames per clip, the model was built for num_segments={self.num_segments}"
                f"{per_segment}"
            )
        features_BF = self.backbone(x_NTCHW.flatten(0, 1)).mean((2, 3))
        logits_BK = self.fc(self.dropout(features_BF))
        return logits_BK.unflatten(0, (n, self.num_segments)).mean(1)
