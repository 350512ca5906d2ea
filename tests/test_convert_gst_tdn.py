"""models.convert on the GC repository's GST / TDN state_dicts (built here with the release key names and
shapes: nets/GC_GST.py's Conv3d bottlenecks, ops_tdn's TDN_Net with layerN_bak / resnext_layer1 / conv1_5)."""

from __future__ import annotations

import re

import pytest
import torch

from models import build_model
from models.convert import convert_state_dict, detect_format, main

_EFT = {
    "ecal_l.conv": "eft1.conv",
    "ecal_l.bn": "eft1.bn1",
    "ecal_t.conv": "eft2.conv",
    "ecal_t.bn": "eft2.bn1",
}
_EFT |= {"ecal_s.conv": "eft3.conv", "ecal_g.linear": "eft4.conv", "ecal_g.bn": "eft4.bn1"}
_MSE = {  # our LongTermDifference -> TDN's mSEModule
    "reduce": "conv1",
    "reduce_bn": "bn1",
    "diff_conv": "conv2",
    "pooled_conv": "conv3_smallscale2",
    "pooled_bn": "bn3_smallscale2",
    "full_conv": "conv3_smallscale4",
    "full_bn": "bn3_smallscale4",
    "expand": "conv3",
    "expand_bn": "bn3",
}


def _calibrators(key: str) -> str:
    match = re.search(r"\.gc\.(ecal_\w\.\w+)\.", key)
    return key.replace(f".gc.{match[1]}.", f".{_EFT[match[1]]}.") if match else key


def gst_release(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GC_GST.py / GST.py names and shapes: every backbone conv a Conv3d ((o, i, 1, k, k) per frame)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            out["module.new_fc." + key.removeprefix("fc.")] = value
            continue
        if ".gc." not in key and value.dim() == 4:
            value = value.unsqueeze(2)
        release = "module.base_model." + key.removeprefix("backbone.").replace(".tconv.", ".Tconv.")
        out[_calibrators(release)] = value
    return out


def tdn_release(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ops_tdn's TDN_Net names, with its unused conv1_temp and GC's unused ECal-S BatchNorm."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            out["module.new_fc." + key.removeprefix("fc.")] = value
            continue
        key = key.removeprefix("backbone.")
        key = key.replace("short_term.conv.", "conv1_5.0.").replace("short_term.bn.", "conv1_5.1.")
        key = key.replace("short_term.layer1.", "resnext_layer1.")
        key = re.sub(r"^layer(\d)\.", r"layer\1_bak.", key).replace(".shift.weight", ".shift.conv.weight")
        key = re.sub(r"\.long_term\.(\w+)\.", lambda m: f".mse.{_MSE[m[1]]}.", key)
        out["module.base_model." + _calibrators(key)] = value
    width = out["module.base_model.conv1.weight"].shape[0]
    out["module.base_model.conv1_temp.weight"] = torch.randn(width, 3, 7, 7)
    out["module.base_model.conv1_temp.bias"] = torch.randn(width)
    for key in [k for k in out if ".eft3.conv.weight" in k]:
        c = out[key].shape[0]
        prefix = key.removesuffix("conv.weight") + "bn1."
        out |= {prefix + "weight": torch.ones(c), prefix + "bias": torch.zeros(c)}
    return out


RELEASES = {"gst": gst_release, "tdn": tdn_release}


@pytest.mark.parametrize("name", ["gst_mini", "gc_gst_mini", "tdn_mini", "gc_tdn_mini"])
def test_release_formats_load_strictly(name, caplog):
    torch.manual_seed(0)
    model = build_model(name, 6, num_segments=4)
    family = name.removeprefix("gc_").split("_")[0]
    release = RELEASES[family](model)
    assert detect_format([k.removeprefix("module.") for k in release]) == name.removesuffix("_mini")
    with caplog.at_level("INFO"):
        state, inferred = convert_state_dict({"state_dict": release}, name)
    assert inferred == name
    assert ("conv1_temp" in caplog.text) == (family == "tdn")
    fresh = build_model(name, 6, num_segments=4)
    fresh.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(1, model.input_frames, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


@pytest.mark.parametrize("name", ["gst_r50", "gc_gst_r50", "tdn_r50", "gc_tdn_r50"])
def test_model_name_inferred_from_keys(name):
    with torch.device("meta"):
        model = build_model(name, 174)
    family = name.removeprefix("gc_").split("_")[0]
    state, inferred = convert_state_dict(RELEASES[family](model))
    assert inferred == name
    with torch.device("meta"):
        build_model(name, 174).load_state_dict(state, strict=True)


def test_mismatches_are_named():
    model = build_model("gc_tdn_mini", 6, num_segments=4)
    release = tdn_release(model)
    del release["module.base_model.layer2_bak.0.mse.conv3_smallscale2.weight"]
    release["module.base_model.layer2_bak.0.mse.conv9.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        convert_state_dict(release, "gc_tdn_mini")
    message = str(err.value)
    assert "backbone.layer2.0.long_term.pooled_conv.weight" in message and "mse.conv9.weight" in message
    gst = gst_release(build_model("gst_mini", 6, num_segments=4))
    gst["module.base_model.layer1.0.Tconv.weight"] = torch.zeros(4, 8, 1, 3, 3)
    with pytest.raises(ValueError, match=r"wrong shapes.*layer1\.0\.tconv\.weight"):
        convert_state_dict(gst, "gst_mini")
    with pytest.raises(ValueError, match="does not match tdn_mini"):
        convert_state_dict(tdn_release(build_model("gc_tdn_mini", 6)), "tdn_mini")  # GC keys, plain model


def test_cli_converts_a_tdn_release(tmp_path, capsys):
    release = tdn_release(build_model("gc_tdn_mini", 174))
    src, dst = tmp_path / "GC_TDN_somethingv1.pth.tar", tmp_path / "gc_tdn_mini.pth"
    torch.save({"state_dict": release, "epoch": 60}, src)
    main([str(src), str(dst), "--model", "gc_tdn_mini"])
    build_model("gc_tdn_mini", 174).load_state_dict(torch.load(dst, weights_only=True), strict=True)
    del release["module.base_model.layer3_bak.0.conv3.weight"]
    torch.save(release, src)
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(dst)])  # inferred from the keys: a 1-block layer3 is no ResNet-50
    assert exit_.value.code == 2 and "GST / TDN exist as ResNet-50 only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(dst), "--model", "gc_tdn_mini"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "backbone.layer3.0.conv3.weight" in err and "Traceback" not in err
