"""The embedded-Gaussian non-local block of the TSM release's NL models, over (N, C, T, H, W).

z = x + BN(W(y)), y_i = sum_j softmax_j(theta(x_i) . phi(x)_j) g(x)_j: theta, phi and g are 1x1x1 convs (with
bias) to C/2 channels; phi and g are max-pooled (1, 2, 2) first ('sub_sample'), so each of the T*H*W positions
attends to the T*H/2*W/2 pooled positions of the whole clip (no 1/sqrt(d) scaling, as the release). The output
BatchNorm3d starts at weight 0, bias 0, so a new block is the identity and an ImageNet backbone is unchanged.
The module name is `nonlocal_` because `nonlocal` is a Python keyword.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NonLocal3d(nn.Module):
    """x_BCHW (B = N*T, frame-major) -> same shape; the attention runs over all T*H*W positions of a clip."""

    def __init__(self, channels: int, num_segments: int):
        super().__init__()
        self.channels, self.num_segments = channels, num_segments
        inner = max(channels // 2, 1)
        self.theta = nn.Conv3d(channels, inner, 1)
        self.phi = nn.Conv3d(channels, inner, 1)
        self.g = nn.Conv3d(channels, inner, 1)
        self.out_conv = nn.Conv3d(inner, channels, 1)
        self.out_bn = nn.BatchNorm3d(channels)
        # The convs keep PyTorch's default initialisation, as in the release (its NL blocks are added after
        # torchvision's ResNet init).
        nn.init.zeros_(self.out_bn.weight)
        nn.init.zeros_(self.out_bn.bias)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_NCTHW = x_BCHW.unflatten(0, (-1, self.num_segments)).transpose(1, 2)
        theta_NDQ = self.theta(x_NCTHW).flatten(2)  # Q = T*H*W query positions
        phi_NDK = F.max_pool3d(self.phi(x_NCTHW), (1, 2, 2)).flatten(2)  # K = T*(H/2)*(W/2) keys
        g_NDK = F.max_pool3d(self.g(x_NCTHW), (1, 2, 2)).flatten(2)
        attention_NQK = torch.softmax(theta_NDQ.transpose(1, 2) @ phi_NDK, dim=-1)
        y_NDQ = g_NDK @ attention_NQK.transpose(1, 2)
        y_NDTHW = y_NDQ.unflatten(2, x_NCTHW.shape[2:])
        z_NCTHW = x_NCTHW + self.out_bn(self.out_conv(y_NDTHW))
        return z_NCTHW.transpose(1, 2).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_segments={self.num_segments}"
