"""models.convert: TSM- and GC-release state_dicts (built here with the release key names) load strictly."""

from __future__ import annotations

import re

import pytest
import torch

from models import build_model
from models.convert import convert_state_dict, detect_format, main

_TO_RELEASE = {
    "ecal_l.conv": "eft1.conv",
    "ecal_l.bn": "eft1.bn1",
    "ecal_t.conv": "eft2.conv",
    "ecal_t.bn": "eft2.bn1",
    "ecal_s.conv": "eft3.conv",
    "ecal_g.linear": "eft4.conv",
    "ecal_g.bn": "eft4.bn1",
}


def release_state(model: torch.nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """Our state_dict renamed as the TSM / GC release files name it (DataParallel 'module.' included)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            out["module.new_fc." + key.removeprefix("fc.")] = value
            continue
        key = "module.base_model." + key.removeprefix("backbone.")
        if fmt == "tsm":
            key = re.sub(r"(layer\d\.\d+)\.conv1\.", r"\1.conv1.net.", key)
        match = re.search(r"\.gc\.(ecal_\w\.\w+)\.", key)
        if match:
            key = key.replace(f".gc.{match[1]}.", f".{_TO_RELEASE[match[1]]}.")
        out[key] = value
    if fmt == "gc":  # the ECal-S BatchNorm the reference creates but never applies
        for key in [k for k in out if ".eft3.conv.weight" in k]:
            c = out[key].shape[0]
            prefix = key.removesuffix("conv.weight") + "bn1."
            out.update(
                {
                    prefix + "weight": torch.ones(c),
                    prefix + "bias": torch.zeros(c),
                    prefix + "running_mean": torch.zeros(c),
                    prefix + "running_var": torch.ones(c),
                    prefix + "num_batches_tracked": torch.tensor(0),
                }
            )
    return out


@pytest.mark.parametrize("name, fmt", [("tsm_mini", "tsm"), ("gc_tsm_mini", "gc"), ("gc_tsn_mini", "gc")])
def test_release_formats_load_strictly(name, fmt, caplog):
    torch.manual_seed(0)
    model = build_model(name, 6, num_segments=4)
    release = release_state(model, fmt)
    assert detect_format([k.removeprefix("module.") for k in release]) == fmt
    with caplog.at_level("INFO"):
        state, inferred = convert_state_dict({"state_dict": release, "epoch": 50}, name)
    assert inferred == name
    assert ("ECal-S" in caplog.text) == (fmt == "gc")
    fresh = build_model(name, 6, num_segments=4)
    fresh.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize(
    "name, fmt", [("tsm_r50", "tsm"), ("gc_tsm_r50", "gc"), ("tsm_r101", "tsm"), ("gc_tsm_r101", "gc")]
)
def test_model_name_inferred_from_keys(name, fmt):
    with torch.device("meta"):
        model = build_model(name, 400)
    state, inferred = convert_state_dict(release_state(model, fmt))
    assert inferred == name
    with torch.device("meta"):
        build_model(name, 400).load_state_dict(state, strict=True)


def test_unknown_and_missing_keys_are_named():
    model = build_model("gc_tsm_mini", 6, num_segments=4)
    release = release_state(model, "gc")
    release["module.base_model.layer1.0.eft9.conv.weight"] = torch.zeros(1)
    release["module.base_model.layer2.0.mystery.weight"] = torch.zeros(1)
    del release["module.base_model.layer3.0.eft2.bn1.running_var"]
    with pytest.raises(ValueError) as err:
        convert_state_dict(release, "gc_tsm_mini")
    message = str(err.value)
    assert "layer1.0.eft9.conv.weight" in message and "layer2.0.mystery.weight" in message
    assert "backbone.layer3.0.gc.ecal_t.bn.running_var" in message
    with pytest.raises(ValueError, match="wrong shapes.*layer1.0.conv1.weight"):
        bad = release_state(model, "gc")
        bad["module.base_model.layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
        convert_state_dict(bad, "gc_tsm_mini")
    with pytest.raises(ValueError, match="not a TSN/TSM/GC release"):
        convert_state_dict(model.state_dict(), "gc_tsm_mini")


def test_cli_writes_a_loadable_state_dict(tmp_path):
    model = build_model("tsm_mini", 3, num_segments=8)
    src, dst = tmp_path / "TSM_release.pth", tmp_path / "out" / "tsm_mini.pth"
    torch.save({"state_dict": release_state(model, "tsm")}, src)
    main([str(src), str(dst), "--model", "tsm_mini"])
    build_model("tsm_mini", 3).load_state_dict(torch.load(dst, weights_only=True), strict=True)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.pth"), str(dst)])


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], "holds a list, not a checkpoint"),
        (torch.zeros(3), "holds a Tensor, not a checkpoint"),
        ({"state_dict": {"module.base_model.conv1.weight": torch.zeros(1)}}, "expected keys"),
    ],
)
def test_cli_names_files_that_are_not_release_checkpoints(content, message, tmp_path, capsys):
    src = tmp_path / "thing.pth"
    torch.save(content, src)
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "out.pth")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


# TSM release MobileNetV2 (archs/mobilenet_v2.py): an inverted residual's `conv` is one flat Sequential
# [pw conv, BN, ReLU6, dw conv, BN, ReLU6, pw-linear conv, BN] (or the last five for features.1, which does
# not expand); ops/models.py wraps conv[0] of every residual block in TemporalShift, hence 'conv.0.net.'.
_MBV2_RELEASE_INDEX = {
    True: {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"},
    False: {"0.0": "0", "0.1": "1", "1": "3", "2": "4"},
}
# TSM release NL (ops/non_local.py): NL3DWrapper(block) -> 'block.*' and 'nl.*'; g and phi are
# Sequential(conv, max-pool), W is Sequential(conv, BN).
_NL_RELEASE = {"nl.g.": "nl.g.0.", "nl.phi.": "nl.phi.0.", "nl.out_conv.": "nl.W.0.", "nl.out_bn.": "nl.W.1."}


def release_mbv2_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    shifted = {f"features.{i}." for i, b in enumerate(model.backbone.features) if getattr(b, "shift", None)}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            out["module.new_fc." + key.removeprefix("fc.")] = value
            continue
        key = key.removeprefix("backbone.")
        match = re.match(r"(features\.(\d+)\.)conv\.((?:\d\.)?\d)\.(\w+)$", key)
        if match:
            expanded = match[2] != "1"
            index = _MBV2_RELEASE_INDEX[expanded][match[3]]
            net = "net." if index == "0" and match[1] in shifted else ""
            key = f"{match[1]}conv.{index}.{net}{match[4]}"
        out["module.base_model." + key] = value
    return out


def release_nl_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    wrapped = {f"layer2.{i}." for i in (0, 2)} | {f"layer3.{i}." for i in (0, 2, 4)}
    out = {}
    for key, value in release_state(model, "tsm").items():
        match = re.match(r"module\.base_model\.(layer\d\.\d+\.)(.*)$", key)
        if match and match[1] in wrapped:
            rest = match[2]
            for ours, theirs in _NL_RELEASE.items():
                rest = rest.replace(ours, theirs) if rest.startswith(ours) else rest
            key = f"module.base_model.{match[1]}{rest if rest.startswith('nl.') else 'block.' + rest}"
        out[key] = value
    return out


@pytest.mark.parametrize("name", ["tsm_mbv2", "tsn_mbv2"])
def test_tsm_release_mobilenet_v2_loads_strictly(name):
    torch.manual_seed(0)
    model = build_model(name, 6, num_segments=4)
    release = release_mbv2_state(model)
    assert ("module.base_model.features.3.conv.0.net.weight" in release) == (name == "tsm_mbv2")
    assert "module.base_model.features.1.conv.3.weight" in release  # features.1: no expansion
    assert "module.base_model.features.16.conv.7.running_var" in release
    state, inferred = convert_state_dict({"state_dict": release}, num_segments=4)
    assert inferred == name
    fresh = build_model(name, 6, num_segments=4)
    fresh.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_tsm_release_non_local_loads_strictly():
    with torch.device("meta"):
        model = build_model("tsm_r50_nl", 400)
    release = release_nl_state(model)
    for key in (
        "module.base_model.layer2.0.block.conv1.net.weight",
        "module.base_model.layer2.0.nl.g.0.bias",
        "module.base_model.layer3.4.nl.W.1.running_var",
        "module.base_model.layer3.4.nl.theta.weight",
        "module.base_model.layer3.1.conv1.net.weight",
    ):
        assert key in release, key
    state, inferred = convert_state_dict(release)
    assert inferred == "tsm_r50_nl"
    assert (
        state["backbone.layer3.4.nl.out_bn.running_var"]
        is release["module.base_model.layer3.4.nl.W.1.running_var"]
    )
    assert state["backbone.layer2.2.conv2.weight"] is release["module.base_model.layer2.2.block.conv2.weight"]
    with torch.device("meta"):
        build_model("tsm_r50_nl", 400).load_state_dict(state, strict=True)
    del release["module.base_model.layer3.2.nl.phi.0.weight"]
    release["module.base_model.layer3.2.nl.psi.0.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing.*layer3.2.nl.phi.weight.*unknown.*layer3.2.nl.psi.0.weight"
    ):
        convert_state_dict(release)


def test_resnext_inferred_from_the_grouped_conv2():
    with torch.device("meta"):
        model = build_model("tsm_rx101", 400)
    state, inferred = convert_state_dict(release_state(model, "tsm"))
    assert inferred == "tsm_rx101"


def test_mobilenet_release_with_an_unknown_layer_is_named(tmp_path, capsys):
    release = release_mbv2_state(build_model("tsm_mbv2", 3, num_segments=8))
    release["module.base_model.features.5.conv.9.weight"] = torch.zeros(1)
    src = tmp_path / "TSM_kinetics_RGB_mobilenetv2_shift8_blockres_avg_segment8_e100_dense.pth"
    torch.save({"state_dict": release}, src)
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "out.pth")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "features.5.conv.9.weight" in err and "Traceback" not in err
    del release["module.base_model.features.5.conv.9.weight"]
    torch.save({"state_dict": release}, src)
    main([str(src), str(tmp_path / "out.pth")])
    build_model("tsm_mbv2", 3).load_state_dict(
        torch.load(tmp_path / "out.pth", weights_only=True), strict=True
    )
