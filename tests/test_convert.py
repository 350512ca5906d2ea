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
