"""Convert released TSM / GC checkpoints into state_dicts that load strictly into build_model models.

    python -m models.convert TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50.pth tsm_r50_k400.pth
    python -m models.convert ckpt.best.pth.tar gc_tsm_r50_k400.pth [--model gc_tsn_r50]

The format is recognised from the key names: 'module.base_model.*' + 'module.new_fc.*' (TSN/TSM/GC releases),
'.net.' (TSM's wrapped conv under blockres shift: a bottleneck's conv1, an inverted residual's conv.0),
'.eftN.' (GC calibrators: eft1..4 = ECal-L/T/S/G, their norm 'bn1', ECal-G's linear 'conv'). ECal-S's
BatchNorm is never applied by the reference: its entries are dropped. The GC repository's GST / TDN files
(GC or not) are recognised by '.Tconv.' (GST's temporal conv; its per-frame Conv3d weights (o, i, 1, k, k)
become Conv2d weights) and by 'layerN_bak.' / 'conv1_5.' (TDN: 'resnext_layer1' and 'conv1_5' are the
difference path, '.mse.' the long-term module, '.shift.conv' the learnable shift; the unused 'conv1_temp' is
dropped).

The backbone is recognised too: 'features.*' is the TSM release's MobileNetV2 (archs/mobilenet_v2.py: each
inverted residual's `conv` is one flat Sequential, conv.0/1/3/4[/6/7] for conv/BN pairs, renamed to
torchvision's nested conv.0.0, conv.0.1, conv.1.0, ...); 'layerX.Y.block.*' + 'layerX.Y.nl.*' is its
ResNet-50 with non-local blocks (ops/non_local.py: NL3DWrapper holds the bottleneck as `block` and the
NONLocalBlock3D as `nl`, whose g / phi are Sequential(conv, max-pool) and W is Sequential(conv, BN)); a
grouped conv2 in layer1 is ResNeXt-101 32x8d; otherwise a ResNet-50 / 101 by the number of layer3 blocks.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from . import build_model

log = logging.getLogger(__name__)

_EFT = re.compile(r"\.eft([1-4])\.(conv|bn1)\.")
_EFT_NAMES = {
    ("1", "conv"): ".gc.ecal_l.conv.",
    ("1", "bn1"): ".gc.ecal_l.bn.",
    ("2", "conv"): ".gc.ecal_t.conv.",
    ("2", "bn1"): ".gc.ecal_t.bn.",
    ("3", "conv"): ".gc.ecal_s.conv.",
    ("3", "bn1"): None,  # the unused ECal-S BatchNorm
    ("4", "conv"): ".gc.ecal_g.linear.",
    ("4", "bn1"): ".gc.ecal_g.bn.",
}


def detect_format(keys: list[str]) -> str:
    """'gc' | 'tsm' | 'tsn' | '[gc_]gst' | '[gc_]tdn' for release state_dict keys (without 'module.');
    ValueError otherwise."""
    if not any(k.startswith("base_model.") for k in keys) or not any(k.startswith("new_fc.") for k in keys):
        raise ValueError(
            "not a TSN/TSM/GC release checkpoint: expected keys 'module.base_model.*' and "
            f"'module.new_fc.*', found e.g. {keys[:5]}"
        )
    gc = any(_EFT.search(k) or ".eft" in k for k in keys)
    family = _gst_tdn_family(keys)
    if family is not None:
        return f"gc_{family}" if gc else family
    if gc:
        return "gc"
    return "tsm" if any(".net." in k for k in keys) else "tsn"


# ----- the GC repository's GST / TDN releases
_TDN_PREFIXES = {
    "backbone.conv1_5.0.": "backbone.short_term.conv.",
    "backbone.conv1_5.1.": "backbone.short_term.bn.",
    "backbone.resnext_layer1.": "backbone.short_term.layer1.",
}
_TDN_LAYER = re.compile(r"^backbone\.layer(\d)_bak\.")
_MSE = re.compile(r"\.mse\.(\w+?)\.(?=weight|bias|running_|num_batches)")
_MSE_NAMES = {  # TDN's mSEModule -> models.tdn.LongTermDifference
    "conv1": "reduce",
    "bn1": "reduce_bn",
    "conv2": "diff_conv",
    "conv3_smallscale2": "pooled_conv",
    "bn3_smallscale2": "pooled_bn",
    "conv3_smallscale4": "full_conv",
    "bn3_smallscale4": "full_bn",
    "conv3": "expand",
    "bn3": "expand_bn",
}


def _gst_tdn_family(keys: list[str]) -> str | None:
    if any(".Tconv." in k for k in keys):
        return "gst"
    if any(k.startswith(("base_model.layer1_bak.", "base_model.conv1_5.")) for k in keys):
        return "tdn"
    return None


def _tdn_name(ours: str) -> str | None:
    """A TDN release key (base_model. already backbone.) -> ours; None for the unused conv1_temp."""
    if ours.startswith("backbone.conv1_temp."):
        return None
    for old, new in _TDN_PREFIXES.items():
        if ours.startswith(old):
            ours = new + ours.removeprefix(old)
    ours = _TDN_LAYER.sub(r"backbone.layer\1.", ours).replace(".shift.conv.weight", ".shift.weight")
    match = _MSE.search(ours)
    if match:
        if match[1] not in _MSE_NAMES:
            raise KeyError(ours)
        ours = ours[: match.start()] + f".long_term.{_MSE_NAMES[match[1]]}." + ours[match.end() :]
    return ours


def _per_frame_weights(state: dict[str, torch.Tensor], expected: Mapping) -> dict[str, torch.Tensor]:
    """GST's (o, i, 1, k, k) Conv3d weights as the (o, i, k, k) Conv2d weights they are here."""
    return {
        k: v.squeeze(2)
        if v.dim() == 5 and v.shape[2] == 1 and k in expected and expected[k].dim() == 4
        else v
        for k, v in state.items()
    }


# NL3DWrapper (release) -> Bottleneck.nl / NonLocal3d (ours).
_NL_NAMES = (
    (".block.", "."),
    (".nl.g.0.", ".nl.g."),
    (".nl.phi.0.", ".nl.phi."),
    (".nl.W.0.", ".nl.out_conv."),
    (".nl.W.1.", ".nl.out_bn."),
)
# The release's flat inverted-residual Sequential index -> torchvision's nested one, without / with expansion.
_INVERTED_RESIDUAL = {
    False: {"0": "0.0", "1": "0.1", "3": "1", "4": "2"},
    True: {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"},
}
_MBV2_CONV = re.compile(r"^backbone\.features\.(\d+)\.conv\.(\d+)\.(?:net\.)?")


def _expanded_blocks(keys) -> set[str]:
    """MobileNetV2 feature indices whose inverted residual has an expansion conv (a conv.6 in the release)."""
    return {m[1] for k in keys if (m := re.match(r"base_model\.features\.(\d+)\.conv\.6\.", k))}


def _tsm_name(ours: str, key: str, expanded: set[str]) -> str:
    """A TSN/TSM/GC release key (base_model. already backbone.) -> ours: wrapped convs, non-local blocks,
    MobileNetV2's flat inverted residuals."""
    ours = ours.replace(".conv1.net.", ".conv1.")
    for release, our in _NL_NAMES:
        ours = ours.replace(release, our)
    match = _MBV2_CONV.match(ours)
    if match:
        index = _INVERTED_RESIDUAL[match[1] in expanded].get(match[2])
        if index is None:
            raise KeyError(key)
        ours = f"backbone.features.{match[1]}.conv.{index}." + ours[match.end() :]
    return ours


def _rename(key: str, fmt: str, expanded: set[str]) -> str | None:
    """Release key (no 'module.') -> our key; None to drop; KeyError for keys with no counterpart."""
    if key.startswith("new_fc."):
        return "fc." + key.removeprefix("new_fc.")
    if not key.startswith("base_model."):
        raise KeyError(key)
    ours = "backbone." + key.removeprefix("base_model.")
    if fmt.endswith("tdn"):
        ours = _tdn_name(ours)
        if ours is None:
            return None
    elif fmt.endswith("gst"):
        ours = ours.replace(".Tconv.", ".tconv.")
    else:
        ours = _tsm_name(ours, key, expanded)
    match = _EFT.search(ours)
    if match:
        target = _EFT_NAMES[match.groups()]
        return None if target is None else ours[: match.start()] + target + ours[match.end() :]
    if ".eft" in ours:
        raise KeyError(key)
    return ours


def release_state(source: str | Path | Mapping) -> dict[str, torch.Tensor]:
    """The raw state_dict of a release file or loaded object, without the DataParallel 'module.' prefix."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        import checkpoints  # the one reader of weight files (imported here: it imports this package)

        try:
            source = checkpoints.load(path, "release checkpoint")
        except checkpoints.CheckpointError as err:
            raise ValueError(str(err)) from None
    state = source.get("state_dict", source) if isinstance(source, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(
            f"the file holds a {type(source).__name__}, not a checkpoint: expected a state_dict (a dict of "
            f"tensors), possibly under 'state_dict', as the TSM and GC releases are"
        )
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def infer_model_name(state: Mapping[str, torch.Tensor], fmt: str) -> str:
    """The build_model name whose keys a release state_dict has (GC releases are GC-TSM unless told)."""
    prefix = {"gc": "gc_tsm"}.get(fmt, fmt)
    if fmt in ("gc", "tsm", "tsn"):
        if any(k.startswith("base_model.features.") for k in state):
            return f"{prefix}_mbv2"
        if any(".nl." in k for k in state):
            return f"{prefix}_r50_nl"
    blocks = [int(m[1]) for k in state if (m := re.match(r"base_model\.layer3(?:_bak)?\.(\d+)\.", k))]
    if not blocks:
        raise ValueError("no base_model.layer3.* or base_model.features.* keys: not a ResNet or MobileNetV2")
    depth = 1 + max(blocks)
    conv2 = state.get("base_model.layer1.0.conv2.weight")
    if depth == 23 and conv2 is not None and conv2.shape[1] != conv2.shape[0]:  # a grouped conv
        return f"{prefix}_rx101"
    arch = {6: "r50", 23: "r101"}.get(depth)
    if arch is None or (arch != "r50" and _gst_tdn_family(list(state))):
        raise ValueError(
            f"layer3 has {depth} blocks: neither ResNet-50 (6) nor ResNet-101 (23); GST / TDN exist as "
            f"ResNet-50 only"
        )
    return f"{prefix}_{arch}"


def convert_state_dict(
    source: str | Path | Mapping, model_name: str | None = None, **model_options
) -> tuple[dict[str, torch.Tensor], str]:
    """Release checkpoint -> (state_dict for build_model(model_name, ...), model_name).

    The result is checked against the model built on the meta device: missing, unknown or mis-shaped keys
    raise a ValueError naming them.
    """
    state = release_state(source)
    fmt = detect_format(list(state))
    model_name = model_name or infer_model_name(state, fmt)
    converted, dropped, unknown = {}, [], []
    expanded = _expanded_blocks(state)
    for key, value in state.items():
        try:
            ours = _rename(key, fmt, expanded)
        except KeyError:
            unknown.append(key)
            continue
        if ours is None:
            dropped.append(key)
        else:
            converted[ours] = value
    if dropped:
        log.info(
            "dropped %d entries the reference never applies (ECal-S's BatchNorm, TDN's conv1_temp; e.g. %s)",
            len(dropped),
            dropped[0],
        )
    if "fc.weight" not in converted:
        raise ValueError(
            f"the {fmt.upper()} checkpoint has no classifier (new_fc.weight / fc.weight), so its number of "
            f"classes is unknown: is it a backbone-only file? Load it with --pretrained instead"
        )
    num_classes = converted["fc.weight"].shape[0]
    num_segments = model_options.pop("num_segments", 8)
    with torch.device("meta"):
        expected = build_model(model_name, num_classes, num_segments, **model_options).state_dict()
    if fmt.endswith("gst"):
        converted = _per_frame_weights(converted, expected)
    missing = [k for k in expected if k not in converted]
    unknown += [k for k in converted if k not in expected]
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unknown or wrong:
        raise ValueError(
            f"{fmt.upper()} checkpoint does not match {model_name} ({num_classes} classes): "
            f"missing keys {missing}, unknown keys {unknown}, wrong shapes {wrong}"
        )
    log.info(
        "converted a %s-format checkpoint to %s (%d classes, %d tensors)",
        fmt.upper(),
        model_name,
        num_classes,
        len(converted),
    )
    return converted, model_name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="released checkpoint (.pth / .pth.tar)")
    parser.add_argument("dst", type=Path, help="where to write the converted state_dict")
    parser.add_argument("--model", default=None, help="build_model name (default: inferred from the keys)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        state, name = convert_state_dict(args.src, args.model)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.dst)
    log.info(
        "wrote %s: model.load_state_dict(torch.load(%r)) for build_model(%r, ...)",
        args.dst,
        str(args.dst),
        name,
    )


if __name__ == "__main__":
    main()
