"""Model registry: TSN / TSM / GC-TSN / GC-TSM / single-calibrator (ECal-x) ResNets for video clips, and the
other rows of the GC/TSM tables: MobileNetV2 (mbv2), ResNet-50 with non-local blocks (r50_nl), ResNeXt-101
32x8d (rx101), GST and TDN ResNet-50s (and their GC forms).

model = build_model("gc_tsm_r50", num_classes=400, num_segments=8)
logits_NK = model(x_NTCHW)
"""

from __future__ import annotations

import re
from functools import partial

from torch import nn

from . import gst, tdn
from .mobilenet import MobileNetV2
from .policy import param_groups
from .resnet import ARCHS, ResNet, load_imagenet, torchvision_imagenet_state
from .temporal import CALIBRATOR_KINDS, GroupContext
from .video import VideoNet

__all__ = ["build_model", "list_models", "load_imagenet", "param_groups", "parse_name", "VideoNet"]

_BASES = ("tsn", "tsm", "gc_tsn", "gc_tsm")
_ECAL_ARCHS = ("r50", "r101", "mini")  # registered with every base and the single-calibrator variants
# Backbones registered with only the bases of the tables' rows (mbv2 is MobileNetV2, the rest ARCHS).
_TABLE_ARCHS = {"mbv2": ("tsn", "tsm", "gc_tsm"), "r50_nl": ("tsm",), "rx101": ("tsn", "tsm", "gc_tsm")}
_NAME = re.compile(
    r"^(?:(?P<base>tsn|tsm|gc_tsn|gc_tsm)|ecal_(?P<kind>[ltsg])_(?P<ebase>tsn|tsm))"
    r"_(?P<arch>\w+)$"
)
# GST / TDN (and their GC forms): ResNet-50 and the CPU-sized mini
_FAMILY = re.compile(r"^(?P<gc>gc_)?(?P<family>gst|tdn)_(?P<arch>r50|mini)$")


def list_models() -> list[str]:
    names = [f"{base}_{arch}" for arch in _ECAL_ARCHS for base in _BASES]
    names += [
        f"ecal_{kind}_{base}_{arch}"
        for arch in _ECAL_ARCHS
        for kind in CALIBRATOR_KINDS
        for base in ("tsn", "tsm")
    ]
    names += [f"{base}_{arch}" for arch, bases in _TABLE_ARCHS.items() for base in bases]
    names += [
        f"{gc}{family}_{arch}" for arch in ("r50", "mini") for family in ("gst", "tdn") for gc in ("", "gc_")
    ]
    return names


def parse_name(name: str) -> dict:
    """'ecal_t_tsm_r50' -> {'arch': 'r50', 'shift': True, 'calibrators': ('t',)} (calibrators () for none);
    GST / TDN names add 'family' ('gst' | 'tdn') and 'frames_per_segment' (TDN: 5 input frames a segment)."""
    family = _FAMILY.match(name)
    if family is not None:
        return {
            "arch": family["arch"],
            "shift": False,
            "calibrators": CALIBRATOR_KINDS if family["gc"] else (),
            "family": family["family"],
            "frames_per_segment": tdn.FRAMES_PER_SEGMENT if family["family"] == "tdn" else 1,
        }
    match = _NAME.match(name)
    if match is None or name not in list_models():
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    base = match["base"] or match["ebase"]
    if match["kind"]:
        calibrators = (match["kind"],)
    else:
        calibrators = CALIBRATOR_KINDS if base.startswith("gc_") else ()
    return {"arch": match["arch"], "shift": base.endswith("tsm"), "calibrators": calibrators}


def _gc_context(
    planes: int, index: int, *, cdiv: int, loop: bool, num_segments: int, norm: bool = True
) -> nn.Module:
    offset = index % cdiv if loop else 0
    return GroupContext(
        planes, CALIBRATOR_KINDS, planes // cdiv, cdiv, num_segments, offset=offset, norm=norm
    )


def _single_context(planes: int, index: int, *, kind: str, ratio: int, num_segments: int) -> nn.Module:
    return GroupContext(planes, (kind,), planes // ratio, 1, num_segments)


def build_model(
    name: str,
    num_classes: int,
    num_segments: int = 8,
    *,
    dropout: float = 0.5,
    shift_div: int = 8,
    shift_place: str = "blockres",
    cdiv: int = 4,
    gc_loop: bool = False,
    ratio: int = 16,
    partial_bn: bool = False,
    pretrained: str | None = None,
) -> VideoNet:
    """Build a registered model (see list_models()).

    shift_div / shift_place: TSM families; cdiv / gc_loop: GC families (groups of planes // cdiv channels, the
    calibrator-to-group assignment rotating per block with gc_loop); ratio: single-calibrator families
    (planes // ratio channels); pretrained: a local ImageNet state_dict of the 2D network (torchvision
    names) or 'imagenet' (torchvision). mbv2 supports only shift_place 'blockres' (the release's placement).
    GST / TDN (models.gst, models.tdn) take cdiv / gc_loop; a TDN model takes num_segments * 5 frames per clip
    (model.input_frames).
    """
    spec = parse_name(name)
    kinds = spec["calibrators"]
    if len(kinds) == 4:
        if cdiv < 4:
            raise ValueError(f"cdiv must be >= 4 for GC (four calibrators on separate groups), got {cdiv}")
        # GC-GST's calibrators sit before bn2 and have no BatchNorm of their own
        norm = spec.get("family") != "gst"
        context = partial(_gc_context, cdiv=cdiv, loop=gc_loop, num_segments=num_segments, norm=norm)
    elif kinds:
        context = partial(_single_context, kind=kinds[0], ratio=ratio, num_segments=num_segments)
    else:
        context = None
    backbone = _backbone(
        spec,
        num_segments=num_segments,
        shift_div=shift_div if spec["shift"] else None,
        shift_place=shift_place,
        context=context,
    )
    if pretrained is not None:
        source = (
            torchvision_imagenet_state(backbone.torchvision_name) if pretrained == "imagenet" else pretrained
        )
        load_imagenet(backbone, source)
    return VideoNet(
        backbone,
        num_classes,
        num_segments,
        dropout=dropout,
        partial_bn=partial_bn,
        frames_per_segment=spec.get("frames_per_segment", 1),
    )


def _backbone(spec: dict, *, shift_place: str, shift_div: int | None, **options) -> nn.Module:
    arch, family = spec["arch"], spec.get("family")
    if family == "gst":
        return gst.GSTResNet(ARCHS[arch], **options)
    if family == "tdn":
        return tdn.TDNResNet(ARCHS[arch], **options)
    if arch == "mbv2":
        if shift_place != "blockres":
            raise ValueError(
                f"mbv2 shifts only the residual input (shift_place 'blockres'), not {shift_place!r}"
            )
        return MobileNetV2(shift_div=shift_div, **options)
    return ResNet(ARCHS[arch], shift_div=shift_div, shift_place=shift_place, **options)
