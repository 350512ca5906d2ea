"""Bottleneck ResNet / ResNeXt backbones (torchvision parameter names) with hook points for temporal modules.

Each bottleneck may carry `shift` (TemporalShift: on the residual input for 'blockres', on the block output
for 'block'), `gc` (a GroupContext after conv2 -> bn2, before the ReLU; on ResNeXt it calibrates the grouped
conv2's output, groups * width_per_group * planes / 64 channels) and `nl` (a NonLocal3d on the block's output,
the TSM release's NL models). None of them renames torchvision parameters, so an ImageNet ResNet / ResNeXt
state_dict loads strictly into the 2D part (see load_imagenet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .nonlocal_ import NonLocal3d
from .temporal import Calibrator, TemporalShift

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    layers: tuple[int, int, int, int]
    width: int = 64  # planes of layer1; doubled per stage
    torchvision_name: str | None = None
    groups: int = 1  # ResNeXt: conv2 is a grouped conv of groups * width_per_group * planes / 64 channels
    width_per_group: int = 64
    # Per stage, the indices of the blocks followed by a NonLocal3d.
    non_local: tuple[tuple[int, ...], ...] = ((), (), (), ())


ARCHS: dict[str, Arch] = {
    "r50": Arch((3, 4, 6, 3), 64, "resnet50"),
    "r101": Arch((3, 4, 23, 3), 64, "resnet101"),
    "rx101": Arch((3, 4, 23, 3), 64, "resnext101_32x8d", groups=32, width_per_group=8),
    # The TSM release's make_non_local: after blocks 0 and 2 of layer2 and 0, 2 and 4 of layer3.
    "r50_nl": Arch((3, 4, 6, 3), 64, "resnet50", non_local=((), (0, 2), (0, 2, 4), ())),
    # CPU-sized bottleneck ResNet for the embedded demo (64x64-ish inputs, ~0.5 M parameters).
    "mini": Arch((1, 1, 1, 1), 16),
}

# (channels, index among temporal blocks) -> GroupContext or None; channels: the calibrated width (conv2's
# output). The index counts blocks that carry temporal modules, across stages, which is what GC's 'loop'
# rotation steps through.
ContextFactory = Callable[[int, int], nn.Module | None]


EXPANSION = 4  # a bottleneck's output channels per plane (conv3), in every ResNet family here
# (stage, index in the stage, inplanes, planes, stride) -> one block of a stage (see make_stage)
BlockFactory = Callable[[int, int, int, int, int], nn.Module]


def projection(inplanes: int, planes: int, stride: int, *, bias: bool = False) -> nn.Module | None:
    """A block's shortcut: None where the identity fits, else 1x1 conv (at the block's stride) -> BN."""
    if stride == 1 and inplanes == planes * EXPANSION:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=bias),
        nn.BatchNorm2d(planes * EXPANSION),
    )


def make_stage(
    stage: int, inplanes: int, planes: int, num_blocks: int, stride: int, make_block: BlockFactory
) -> nn.Sequential:
    """One stage (layer1..4): its first block takes `inplanes` at `stride`, the others planes * EXPANSION at
    stride 1 (so projection() gives only the first a projection shortcut)."""
    return nn.Sequential(
        *(
            make_block(stage, i, inplanes if i == 0 else planes * EXPANSION, planes, stride if i == 0 else 1)
            for i in range(num_blocks)
        )
    )


class BottleneckResNet(nn.Module):
    """What the ResNet families (ResNet, GST, TDN) share: torchvision's stem, conv1 -> bn1 -> relu -> maxpool,
    and four stages of bottlenecks, layer1..4, planes doubling and stride 2 from layer2 on. A family adds its
    stages with add_stages, giving how one block is built."""

    imagenet_classifier = "fc."  # the torchvision classifier's prefix, skipped by load_imagenet

    def __init__(self, arch: Arch, *, conv_bias: bool = False):
        super().__init__()
        self.torchvision_name = arch.torchvision_name  # its ImageNet weights (None: no torchvision twin)
        self.conv1 = nn.Conv2d(3, arch.width, 7, stride=2, padding=3, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(arch.width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.num_features = arch.width * 8 * EXPANSION

    def add_stages(self, arch: Arch, make_block: BlockFactory) -> None:
        inplanes = arch.width
        for stage, num_blocks in enumerate(arch.layers):
            planes, stride = arch.width * 2**stage, 1 if stage == 0 else 2
            self.add_module(
                f"layer{stage + 1}", make_stage(stage, inplanes, planes, num_blocks, stride, make_block)
            )
            inplanes = planes * EXPANSION

    def stem(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x_BCHW))))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x_BCHW)))))


class Bottleneck(nn.Module):
    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        shift: TemporalShift | None = None,
        shift_place: str = "blockres",
        gc: nn.Module | None = None,
        nl: nn.Module | None = None,
        width: int | None = None,
        groups: int = 1,
    ):
        super().__init__()
        width = width or planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.shift = shift
        self.shift_place = shift_place
        self.gc = gc
        self.nl = nl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        if self.shift is not None and self.shift_place == "blockres":
            out = self.shift(out)
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        if self.gc is not None:
            out = self.gc(out)
        out = self.relu(out)
        out = self.bn3(self.conv3(out))
        out = self.relu(out + identity)
        if self.shift is not None and self.shift_place == "block":
            out = self.shift(out)
        if self.nl is not None:
            out = self.nl(out)
        return out


class ResNet(BottleneckResNet):
    """conv1 -> bn1 -> relu -> maxpool -> layer1..4; returns the final feature map (no pooling, no fc)."""

    def __init__(
        self,
        arch: Arch,
        *,
        num_segments: int = 8,
        shift_div: int | None = None,
        shift_place: str = "blockres",
        context: ContextFactory | None = None,
    ):
        if shift_place not in ("blockres", "block"):
            raise ValueError(f"shift_place must be 'blockres' or 'block', not {shift_place!r}")
        super().__init__(arch)
        temporal_index = 0  # counts the blocks that carry temporal modules, across stages

        def block(stage: int, i: int, inplanes: int, planes: int, stride: int) -> nn.Module:
            nonlocal temporal_index
            conv_width = planes * arch.width_per_group // 64 * arch.groups
            downsample = projection(inplanes, planes, stride)
            # The reference puts shift and GC in every other block of very deep stages (ResNet-101 layer3).
            every = 2 if arch.layers[stage] >= 23 else 1
            shift, gc = None, None
            if i % every == 0:
                if shift_div is not None:
                    shift = TemporalShift(num_segments, shift_div)
                if context is not None:
                    gc = context(conv_width, temporal_index)
                temporal_index += 1
            nl = NonLocal3d(planes * EXPANSION, num_segments) if i in arch.non_local[stage] else None
            return Bottleneck(
                inplanes,
                planes,
                stride,
                downsample,
                shift,
                shift_place,
                gc,
                nl=nl,
                width=conv_width,
                groups=arch.groups,
            )

        self.add_stages(arch, block)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_backbone(self)

    def imagenet_keys(self) -> list[str]:
        """state_dict keys of the 2D part (what a torchvision ResNet has, minus fc)."""
        return imagenet_keys(self)


# Submodule names of the temporal modules that backbones add to a torchvision 2D network.
TEMPORAL_PARTS = (".gc.", ".nl.")


def imagenet_keys(backbone: nn.Module) -> list[str]:
    """state_dict keys of a backbone's 2D part: all but those of its temporal modules."""
    return [k for k in backbone.state_dict() if not any(part in f".{k}" for part in TEMPORAL_PARTS)]


def init_backbone(
    backbone: nn.Module,
    convs: tuple[type[nn.Module], ...] = (nn.Conv2d,),
    nonlinearity: str = "relu",
    own_init: tuple[type[nn.Module], ...] = (),
) -> None:
    """torchvision's initialisation of a 2D network: convs Kaiming-normal (fan out), BatchNorm2d weight 1 and
    bias 0; then the temporal modules (calibrators, and `own_init` types) reset to their own, since the first
    loop also matched their convs."""
    for m in backbone.modules():
        if isinstance(m, convs):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in backbone.modules():
        if isinstance(m, (Calibrator, *own_init)):
            m.reset_parameters()


def load_imagenet(backbone: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision-named ImageNet state_dict (a local file or a mapping) into a backbone's 2D part.

    Any backbone with imagenet_keys() and imagenet_classifier (ResNet, MobileNetV2). Strict: every 2D key
    must be present with its shape and nothing else may be (the ImageNet classifier, fc.* or classifier.*, is
    skipped with a note). Temporal modules keep their own initialisation.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights {path} not found: pass a local ImageNet "
                "state_dict (.pth) or pretrained='imagenet' where torchvision is "
                "installed"
            )
        import checkpoints  # the one reader of weight files (imported here: it imports this package)

        source = checkpoints.load(path, "pretrained weights")
        if isinstance(source, dict) and "state_dict" in source:
            source = source["state_dict"]
    state = {k.removeprefix("module."): v for k, v in source.items()}
    classifier = backbone.imagenet_classifier
    skipped = [k for k in state if k.startswith(classifier)]
    if skipped:
        log.info("ImageNet weights: skipping the ImageNet classifier (%s)", ", ".join(skipped))
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    adapt = getattr(backbone, "adapt_imagenet", None)  # GST / TDN: derived tensors (sliced, copied, inflated)
    if adapt is not None:
        state = adapt(state)
    expected = backbone.state_dict()
    wanted = backbone.imagenet_keys()
    wanted_set = set(wanted)
    missing = [k for k in wanted if k not in state]
    unknown = [k for k in state if k not in wanted_set]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unknown or wrong:
        raise ValueError(
            "ImageNet weights do not match this backbone (is it the right depth?): "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unknown {unknown[:8]}{'...' if len(unknown) > 8 else ''}, wrong shape {wrong[:8]}"
        )
    backbone.load_state_dict(state, strict=False)


def torchvision_imagenet_state(torchvision_name: str | None) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision (imported only here; it may download to torchvision's cache)."""
    if torchvision_name is None:
        raise ValueError("pretrained='imagenet' exists only for the r50 / r101 / rx101 / mbv2 backbones")
    try:
        import torchvision.models as tvm
    except Exception as err:  # the PyPI wheel is a CUDA build that can fail to import on CPU-only machines
        raise RuntimeError(
            "pretrained='imagenet' needs an importable torchvision "
            "(pip install gcvideo[imagenet]); otherwise pass pretrained=<path to a local "
            "ImageNet state_dict>"
        ) from err
    weights = tvm.get_model_weights(torchvision_name).IMAGENET1K_V1
    return weights.get_state_dict(progress=False)
