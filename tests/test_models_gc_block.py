"""GC in the ResNet / ResNeXt bottleneck against a block written here from the paper's definition
(../shared/docs/gc-architecture.md): conv1 -> bn1 -> ReLU -> conv2 -> bn2 -> GC -> ReLU -> conv3 -> bn3,
plus the identity, ReLU; TSM's shift on the residual input. GC splits conv2's output into cdiv = 4 groups of
c channels and gates group j with calibrator j (ECal-L, T, S, G), x * sigmoid(context), or group
(k + j) mod 4 in block k with 'loop'. The calibrators are computed with functional ops on their weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from models.resnet import Arch, ResNet
from models.temporal import CALIBRATOR_KINDS, GroupContext


def randomise_bns(module: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode with random BN statistics and affine parameters: every BN is a visible per-channel map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return module.eval()


def bn(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """Eval-mode BatchNorm over dim 1, written out."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = m.weight / torch.sqrt(m.running_var + m.eps)
    return (x - m.running_mean.view(shape)) * scale.view(shape) + m.bias.view(shape)


def shift(x_BCHW: torch.Tensor, frames: int, div: int = 8) -> torch.Tensor:
    """out[t, :f] = x[t + 1, :f], out[t, f:2f] = x[t - 1, f:2f], zeros from outside the clip."""
    x = x_BCHW.unflatten(0, (-1, frames))
    fold = x.shape[2] // div
    out = x.clone()
    for t in range(frames):
        out[:, t, :fold] = x[:, t + 1, :fold] if t + 1 < frames else 0
        out[:, t, fold : 2 * fold] = x[:, t - 1, fold : 2 * fold] if t > 0 else 0
    return out.flatten(0, 1)


def calibrate(kind: str, cal: nn.Module, x_BCHW: torch.Tensor, frames: int) -> torch.Tensor:
    """x * sigmoid(context) for one group; x seen as (N, c, T, H, W)."""
    x = x_BCHW.unflatten(0, (-1, frames)).transpose(1, 2)  # N, c, T, H, W
    if kind == "l":  # BN3d(Conv3d (3,1,1))(x): per element
        gate = bn(F.conv3d(x, cal.conv.weight, padding=(1, 0, 0)), cal.bn)
    elif kind == "t":  # BN1d(Conv1d 3)(mean over H, W): per frame and channel
        gate = bn(F.conv1d(x.mean((3, 4)), cal.conv.weight, padding=1), cal.bn)[..., None, None]
    elif kind == "s":  # dilated 3x3 conv of the mean over T: per position and channel, shared by frames
        gate = F.conv2d(x.mean(2), cal.conv.weight, padding=2, dilation=2)[:, :, None]
    else:  # BN1d(Linear)(mean over T, H, W): per channel
        gate = bn(F.linear(x.mean((2, 3, 4)), cal.linear.weight), cal.bn)[..., None, None, None]
    return (x * torch.sigmoid(gate)).transpose(1, 2).flatten(0, 1)


def gc_reference(gc: GroupContext, x_BCHW: torch.Tensor, frames: int, offset: int) -> torch.Tensor:
    c = x_BCHW.shape[1] // 4
    groups = list(x_BCHW.split(c, dim=1))
    for j, kind in enumerate(CALIBRATOR_KINDS):
        target = (offset + j) % 4
        groups[target] = calibrate(kind, getattr(gc, f"ecal_{kind}"), groups[target], frames)
    return torch.cat(groups, dim=1)


def bottleneck_reference(block: nn.Module, x: torch.Tensor, frames: int, offset: int = 0) -> torch.Tensor:
    h = torch.relu(bn(F.conv2d(shift(x, frames), block.conv1.weight), block.bn1))
    conv2 = block.conv2
    h = bn(F.conv2d(h, conv2.weight, stride=conv2.stride, padding=1, groups=conv2.groups), block.bn2)
    h = torch.relu(gc_reference(block.gc, h, frames, offset))  # GC before the ReLU that follows bn2
    h = bn(F.conv2d(h, block.conv3.weight), block.bn3)
    identity = x
    if block.downsample is not None:
        conv, norm = block.downsample
        identity = bn(F.conv2d(x, conv.weight, stride=conv.stride), norm)
    return torch.relu(h + identity)


FRAMES = 4


def gc_tsm_mini(loop: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bns(build_model("gc_tsm_mini", 5, num_segments=FRAMES, gc_loop=loop))


def resnext_mini() -> nn.Module:
    """ResNeXt bottlenecks (grouped conv2 of 4 x 32 * planes / 64 channels) with GC on conv2's output."""
    torch.manual_seed(0)
    arch = Arch((1, 1, 1, 1), 16, groups=4, width_per_group=32)
    context = lambda width, index: GroupContext(width, CALIBRATOR_KINDS, width // 4, 4, FRAMES)  # noqa: E731
    return randomise_bns(ResNet(arch, num_segments=FRAMES, shift_div=8, context=context))


def blocks(backbone: nn.Module) -> list[nn.Module]:
    return [
        b for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for b in layer
    ]


@pytest.mark.parametrize("which", ["layer1", "layer2", "layer4"])
def test_gc_tsm_bottleneck_against_the_definition(which):
    model = gc_tsm_mini()
    block = getattr(model.backbone, which)[0]
    x = torch.randn(2 * FRAMES, block.conv1.in_channels, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x), bottleneck_reference(block, x, FRAMES), rtol=1e-4, atol=1e-5)


def test_resnext_bottleneck_with_gc_against_the_definition():
    backbone = resnext_mini()
    for block in blocks(backbone)[:2]:
        assert block.conv2.groups == 4 and block.gc.split_sizes == [block.conv2.out_channels // 4] * 4
        x = torch.randn(2 * FRAMES, block.conv1.in_channels, 10, 10)
        with torch.no_grad():
            torch.testing.assert_close(block(x), bottleneck_reference(block, x, FRAMES), rtol=1e-4, atol=1e-5)


def test_loop_rotates_the_groups_by_one_per_block():
    model = gc_tsm_mini(loop=True)
    for k, block in enumerate(blocks(model.backbone)):
        assert block.gc.targets == [(k + j) % 4 for j in range(4)]
        x = torch.randn(2 * FRAMES, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            got = block(x)
            torch.testing.assert_close(got, bottleneck_reference(block, x, FRAMES, k), rtol=1e-4, atol=1e-5)
            if k:  # the block would compute something else without its rotation
                assert (got - bottleneck_reference(block, x, FRAMES, 0)).abs().max() > 1e-3


def test_the_reference_tells_gc_before_the_relu_from_gc_after_it():
    # the check above has teeth: the same block with GC moved after the ReLU is visibly different
    model = gc_tsm_mini()
    block = model.backbone.layer2[0]
    x = torch.randn(2 * FRAMES, block.conv1.in_channels, 12, 12)
    with torch.no_grad():
        h = torch.relu(bn(F.conv2d(shift(x, FRAMES), block.conv1.weight), block.bn1))
        h = bn(F.conv2d(h, block.conv2.weight, stride=2, padding=1), block.bn2)
        after = gc_reference(block.gc, torch.relu(h), FRAMES, 0)
        before = torch.relu(gc_reference(block.gc, h, FRAMES, 0))
        assert (after - before).abs().max() > 1e-2
