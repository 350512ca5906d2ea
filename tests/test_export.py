"""models.export / models.checkpoint: ONNX graphs in the default domain, equal to PyTorch under ONNX Runtime,
dynamic batch and static T; the command line on checkpoints, state_dicts and files that are neither."""

from __future__ import annotations

import random

import onnx
import pytest
import torch
from torch import nn

import checkpoints
from models import build_model
from models.export import check_onnx, export_onnx, main
from models.resnet import Arch, ResNet
from models.video import VideoNet

# fp32 ONNX Runtime vs PyTorch on one CPU differ by summation order only: ~1e-6 of the largest logit (measured
# on these models); a tolerance of 1e-4 of it (at least 1) leaves room for other CPUs' kernels.
RTOL = 1e-4
FRAMES, SIZE = 4, 64


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters and a classifier with logits of order 1, so a
    wrong graph shows in the logits (fresh models have identity BNs and a near-zero classifier)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
        model.fc.weight.normal_(0.0, 0.3, generator=generator)
    return model.eval()


def exported(model: nn.Module, path, **kwargs) -> onnx.ModelProto:
    export_onnx(model, path, size=SIZE, **kwargs)
    return onnx.load(str(path))


def input_dims(graph: onnx.ModelProto) -> list[str | int]:
    (clips,) = graph.graph.input
    return [d.dim_param or d.dim_value for d in clips.type.tensor_type.shape.dim]


@pytest.mark.parametrize(
    "name",
    [
        "tsn_mini",
        "tsm_mini",
        "gc_tsm_mini",
        # The inverted residual's shift, depthwise convs, ReLU6 (Clip): ~20 s of CPU (17 blocks).
        pytest.param("tsm_mbv2", marks=pytest.mark.slow),
        # ~6 s each and ~30 s together on 2 cores, for ops that gc_tsm_mini (all four calibrators and the
        # shift) and the command-line test (ecal_t_tsm_mini) already export: slow.
        pytest.param("gc_tsn_mini", marks=pytest.mark.slow),
        pytest.param("ecal_l_tsm_mini", marks=pytest.mark.slow),
        pytest.param("ecal_t_tsn_mini", marks=pytest.mark.slow),
        pytest.param("ecal_s_tsm_mini", marks=pytest.mark.slow),
        pytest.param("ecal_g_tsm_mini", marks=pytest.mark.slow),
    ],
)
def test_export_matches_pytorch_in_the_default_domain(name, tmp_path):
    torch.manual_seed(0)
    model = randomise(build_model(name, num_classes=5, num_segments=FRAMES))
    graph = exported(model, tmp_path / "model.onnx")
    assert {node.domain for node in graph.graph.node} == {""}, "custom ops in the graph"
    assert {op.domain for op in graph.opset_import} == {""}
    assert input_dims(graph)[1:] == [FRAMES, 3, SIZE, SIZE] and isinstance(input_dims(graph)[0], str)
    diff, scale = check_onnx(model, tmp_path / "model.onnx", batches=(1, 3))
    assert scale > 0.1, "logits too small for the comparison to mean anything"
    assert diff < RTOL * max(1.0, scale)


def test_static_batch(tmp_path):
    model = randomise(build_model("tsn_mini", num_classes=3, num_segments=2))
    assert input_dims(exported(model, tmp_path / "m.onnx", batch=2)) == [2, 2, 3, SIZE, SIZE]
    diff, scale = check_onnx(model, tmp_path / "m.onnx", batches=(2,))
    assert diff < RTOL * max(1.0, scale)


def test_opset_below_18_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset 17"):
        export_onnx(build_model("tsn_mini", 3, 2), tmp_path / "m.onnx", opset=17)


@pytest.mark.slow  # ~40 s on 2 cores: the export of ResNet-50 and four 8-frame clips through it twice
def test_export_gc_tsm_r50(tmp_path):
    torch.manual_seed(0)
    model = randomise(build_model("gc_tsm_r50", num_classes=400, num_segments=8))
    export_onnx(model, tmp_path / "r50.onnx", size=112)
    diff, scale = check_onnx(model, tmp_path / "r50.onnx", batches=(1, 3))
    assert diff < RTOL * max(1.0, scale), (diff, scale)


def training_checkpoint(model: nn.Module, name: str, num_classes: int, path) -> None:
    """What train.py saves: weights, optimiser, RNG states (as tensors and lists) and the config dicts."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = {
        "preset": "demo",
        "model": {"name": name, "num_classes": num_classes, "dropout": 0.5, "shift_div": 8, "cdiv": 4},
        "data": {"num_segments": FRAMES, "crop_size": SIZE},
        "optim": {"lr_steps": (20, 40)},
    }
    rng = checkpoints.rng_state()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": [rng], "config": config},
        path,
    )


def test_cli_exports_a_training_checkpoint(tmp_path, capsys):
    model = randomise(build_model("ecal_t_tsm_mini", num_classes=6, num_segments=FRAMES))
    training_checkpoint(model, "ecal_t_tsm_mini", 6, tmp_path / "best.pt")
    assert main([str(tmp_path / "best.pt"), str(tmp_path / "m.onnx"), "--size", str(SIZE)]) == 0
    out = capsys.readouterr().out
    assert "ecal_t_tsm_mini (6 classes, T=4)" in out and "batch dynamic" in out
    assert "max abs diff" in out


def test_state_dict_needs_a_model_name_and_takes_classes_from_fc(tmp_path):
    model = randomise(build_model("tsm_mini", num_classes=9, num_segments=3))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    with pytest.raises(checkpoints.CheckpointError, match="--model NAME"):
        checkpoints.load_model(tmp_path / "w.pth")
    got = checkpoints.load_model(tmp_path / "w.pth", name="tsm_mini", num_segments=3)
    loaded, name = got.model, got.cfg.model.name
    clips = torch.randn(1, 3, 3, 32, 32)
    assert name == "tsm_mini" and loaded.fc.out_features == 9 and not loaded.training
    torch.testing.assert_close(loaded(clips), model(clips), rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["{tmp}/missing.pt", "{tmp}/m.onnx"], 2, "missing.pt not found"),
        (["{tmp}/notes.txt", "{tmp}/m.onnx"], 1, "is not a weights file that loads with"),
        (["{tmp}/w.pth", "{tmp}/m.onnx", "--model", "tsm_r18"], 2, "unknown model 'tsm_r18'"),
        (["{tmp}/w.pth", "{tmp}/m.onnx", "--model", "gc_tsm_mini"], 1, "does not fit model gc_tsm_mini"),
        (["{tmp}/w.pth", "{tmp}/m.onnx", "--model", "tsm_mini", "--opset", "17"], 2, "opset 18 or later"),
        (["{tmp}/unpickled.pt", "{tmp}/m.onnx"], 1, "Unsupported global"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, code, message):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save(build_model("tsm_mini", 4, 2).state_dict(), tmp_path / "w.pth")
    torch.save({"model": {}, "config": {}, "hook": random.Random}, tmp_path / "unpickled.pt")  # a class
    assert main([a.format(tmp=tmp_path) for a in args]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_non_local_export_matches_pytorch(tmp_path):
    # A CPU-sized ResNet with a non-local block in layer2 and layer3 (tsm_r50_nl's blocks: MaxPool, MatMul,
    # Softmax), not a registered name.
    torch.manual_seed(0)
    arch = Arch((1, 1, 1, 1), 16, non_local=((), (0,), (0,), ()))
    model = randomise(VideoNet(ResNet(arch, num_segments=FRAMES, shift_div=8), 5, FRAMES))
    graph = exported(model, tmp_path / "nl.onnx")
    assert {node.domain for node in graph.graph.node} == {""}
    assert {"MatMul", "Softmax", "MaxPool"} <= {node.op_type for node in graph.graph.node}
    diff, scale = check_onnx(model, tmp_path / "nl.onnx", batches=(1, 2))
    assert scale > 0.1 and diff < RTOL * max(1.0, scale)
