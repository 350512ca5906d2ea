"""The other rows of the GC/TSM tables: MobileNetV2 (tsn/tsm/gc_tsm_mbv2), ResNet-50 with non-local blocks
(tsm_r50_nl) and ResNeXt-101 32x8d (tsn/tsm/gc_tsm_rx101): structure, blocks against references written here
from the formulas, counts against counts written here from the architectures (themselves checked against
torchvision's published parameter counts), ImageNet loading, gradients, channels_last / bf16 / compile."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runtime
from models import build_model, list_models, parse_name
from models.__main__ import count, main
from models.mobilenet import INVERTED_RESIDUAL_SETTING, InvertedResidual
from models.nonlocal_ import NonLocal3d
from models.resnet import Arch, ResNet
from models.temporal import CALIBRATOR_KINDS, GroupContext, TemporalShift
from models.video import VideoNet

NEW = ["tsn_mbv2", "tsm_mbv2", "gc_tsm_mbv2", "tsm_r50_nl", "tsn_rx101", "tsm_rx101", "gc_tsm_rx101"]
MBV2_RESIDUAL_BLOCKS = [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]  # stride 1 and in == out channels


def test_registry_names():
    assert set(NEW) <= set(list_models())
    assert parse_name("tsm_r50_nl") == {"arch": "r50_nl", "shift": True, "calibrators": ()}
    assert parse_name("gc_tsm_mbv2")["calibrators"] == ("l", "t", "s", "g")
    for name in ("gc_tsn_mbv2", "ecal_t_tsm_rx101", "tsn_r50_nl", "gc_tsm_r50_nl"):
        with pytest.raises(ValueError, match=f"unknown model '{name}'"):
            build_model(name, 5)
    with pytest.raises(ValueError, match="blockres"):
        build_model("tsm_mbv2", 5, shift_place="block")


# --- architectures written out layer by layer: (kind, in, out, kernel, groups, output side at 224) ----------


def mobilenet_v2_layers(size: int = 224) -> list[tuple]:
    """MobileNetV2 1.0 (paper table 2) as its convs / BNs, in order."""
    side = size // 2
    layers = [("conv", 3, 32, 3, 1, side), ("bn", 32)]
    inp = 32
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            hidden = inp * t
            if t != 1:
                layers += [("conv", inp, hidden, 1, 1, side), ("bn", hidden)]
            side = side // (s if i == 0 else 1)
            layers += [("conv", hidden, hidden, 3, hidden, side), ("bn", hidden)]
            layers += [("conv", hidden, c, 1, 1, side), ("bn", c)]
            inp = c
    return layers + [("conv", 320, 1280, 1, 1, side), ("bn", 1280)]


def resnext_layers(blocks, groups: int, width_per_group: int, size: int = 224) -> list[tuple]:
    """torchvision's ResNet / ResNeXt (bottleneck width planes * width_per_group / 64 * groups)."""
    side = size // 4
    layers = [("conv", 3, 64, 7, 1, size // 2), ("bn", 64)]
    inp = 64
    for stage, n in enumerate(blocks):
        planes = 64 * 2**stage
        width = planes * width_per_group // 64 * groups
        for i in range(n):
            stride = 2 if i == 0 and stage > 0 else 1
            out_side = side // stride
            layers += [("conv", inp, width, 1, 1, side), ("bn", width)]
            layers += [("conv", width, width, 3, groups, out_side), ("bn", width)]
            layers += [("conv", width, planes * 4, 1, 1, out_side), ("bn", planes * 4)]
            if i == 0:
                layers += [("conv", inp, planes * 4, 1, 1, out_side), ("bn", planes * 4)]
            inp, side = planes * 4, out_side
    return layers


def params_and_macs(layers, features: int, classes: int, frames: int = 8) -> tuple[int, int]:
    params = features * classes + classes
    macs = frames * features * classes
    for kind, *dims in layers:
        if kind == "bn":
            params += 2 * dims[0]
        else:
            cin, cout, k, groups, side = dims
            params += cout * cin // groups * k * k
            macs += frames * cout * cin // groups * k * k * side * side
    return params, macs


def non_local_params_and_macs(channels: int, side: int, frames: int = 8) -> tuple[int, int, int]:
    """(params, conv MACs, matmul MACs) of one embedded-Gaussian block with (1, 2, 2) sub-sampling."""
    inner, positions = channels // 2, frames * side * side
    params = 3 * (channels * inner + inner) + inner * channels + channels + 2 * channels
    conv_macs = 4 * positions * channels * inner  # theta, phi, g before pooling; W
    matmul_macs = 2 * positions * (positions // 4) * inner
    return params, conv_macs, matmul_macs


def gc_params_and_macs(width: int, side: int, frames: int = 8) -> tuple[int, int]:
    """GC (cdiv 4) on `width` channels of side x side frames: ECal-L Conv3d (3,1,1) + BN3d on every position,
    ECal-T Conv1d 3 + BN1d on the pooled frames, ECal-S dilated 3x3 on the temporally pooled map, ECal-G
    Linear + BN1d on the clip-pooled vector; c = width / 4 channels each."""
    c = width // 4
    params = (3 * c * c + 2 * c) + (3 * c * c + 2 * c) + 9 * c * c + (c * c + 2 * c)
    macs = 3 * c * c * frames * side * side + 3 * c * c * frames + 9 * c * c * side * side + c * c
    return params, macs


# (calibrated width, spatial side at 224, blocks) of the GC blocks: conv2's output in a bottleneck (every
# other block of a 23-block layer3), the depthwise output in MobileNetV2's residual blocks.
GC_BLOCKS = {
    "r50": [(64, 56, 3), (128, 28, 4), (256, 14, 6), (512, 7, 3)],
    "rx101": [(256, 56, 3), (512, 28, 4), (1024, 14, 12), (2048, 7, 3)],
    "mbv2": [(144, 56, 1), (192, 28, 2), (384, 14, 3), (576, 14, 2), (960, 7, 2)],
}


def test_written_architectures_have_torchvisions_published_parameter_counts():
    # torchvision's model docs: mobilenet_v2 3,504,872; resnext101_32x8d 88,791,336; resnet50 25,557,032.
    assert params_and_macs(mobilenet_v2_layers(), 1280, 1000)[0] == 3_504_872
    assert params_and_macs(resnext_layers((3, 4, 23, 3), 32, 8), 2048, 1000)[0] == 88_791_336
    assert params_and_macs(resnext_layers((3, 4, 6, 3), 1, 64), 2048, 1000)[0] == 25_557_032
    # ... and its GFLOPS (MACs) per 224 image, 0.30 / 16.41, to the digits it publishes.
    assert params_and_macs(mobilenet_v2_layers(), 1280, 1000, frames=1)[1] / 1e9 == pytest.approx(
        0.30, abs=5e-3
    )
    rx101 = params_and_macs(resnext_layers((3, 4, 23, 3), 32, 8), 2048, 1000, frames=1)[1]
    assert rx101 / 1e9 == pytest.approx(16.41, abs=5e-3)


def expected_counts(name: str) -> tuple[int, int, int]:
    """(params, conv+linear MACs, matmul MACs) of one 8 x 224 clip, 400 classes, from the written layers."""
    arch = name.split("_", 2 if name.startswith("gc_") else 1)[-1]
    if arch == "mbv2":
        params, macs = params_and_macs(mobilenet_v2_layers(), 1280, 400)
    elif arch == "rx101":
        params, macs = params_and_macs(resnext_layers((3, 4, 23, 3), 32, 8), 2048, 400)
    else:
        params, macs = params_and_macs(resnext_layers((3, 4, 6, 3), 1, 64), 2048, 400)
    matmul = 0
    if arch == "r50_nl":
        for channels, side, blocks in ((512, 28, 2), (1024, 14, 3)):
            p, c, m = non_local_params_and_macs(channels, side)
            params, macs, matmul = params + blocks * p, macs + blocks * c, matmul + blocks * m
    if name.startswith("gc_"):
        for width, side, blocks in GC_BLOCKS[arch]:
            p, c = gc_params_and_macs(width, side)
            params, macs = params + blocks * p, macs + blocks * c
    return params, macs, matmul


# docs/models.md's table figures (`python -m models NAME`): params, GMACs conv+linear, GMACs matmul.
TABLE = {
    "tsn_mbv2": (2_736_272, 2.40, 0.0),
    "tsm_mbv2": (2_736_272, 2.40, 0.0),
    "gc_tsm_mbv2": (5_786_984, 3.29, 0.0),
    "tsm_r50_nl": (31_686_096, 49.15, 11.96),
    "tsn_rx101": (87_561_936, 131.30, 0.0),
    "tsm_rx101": (87_561_936, 131.30, 0.0),
    "gc_tsm_rx101": (114_004_816, 140.67, 0.0),
}


@pytest.mark.parametrize("name", [*NEW, "gc_tsm_r50"])
def test_counts_equal_the_written_architectures(name):
    # gc_tsm_r50 checks the GC formula against the GC reference's count (25,590,768, test_models.py).
    counted = count(name)
    params, macs, matmul = expected_counts(name)
    assert counted["params"] == params == TABLE.get(name, (25_590_768,))[0]
    assert counted["conv_linear_gmacs"] == pytest.approx(macs / 1e9, rel=1e-9)
    assert counted["matmul_gmacs"] == pytest.approx(matmul / 1e9, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", NEW)
def test_readme_table_figures(name):
    counted = count(name)
    params, gmacs, matmul_gmacs = TABLE[name]
    assert counted["params"] == params
    assert round(counted["conv_linear_gmacs"], 2) == gmacs
    assert round(counted["matmul_gmacs"], 2) == matmul_gmacs


def test_counts_command(capsys):
    assert main(["tsm_mbv2", "--frames", "8"]) == 0
    out = capsys.readouterr().out
    assert "tsm_mbv2" in out and "2,736,272" in out and "2.40" in out
    assert main(["tsm_r18"]) == 2
    assert "unknown model" in capsys.readouterr().err


# --- structure ----------------------------------------------------------------------------------------------


def test_mobilenet_shift_and_gc_in_the_residual_blocks():
    with torch.device("meta"):
        model = build_model("gc_tsm_mbv2", 400)
    blocks = {i: b for i, b in enumerate(model.backbone.features) if isinstance(b, InvertedResidual)}
    assert sorted(blocks) == list(range(1, 18))
    assert [i for i, b in blocks.items() if b.use_residual] == MBV2_RESIDUAL_BLOCKS
    assert [i for i, b in blocks.items() if b.shift is not None] == MBV2_RESIDUAL_BLOCKS
    # GC on the expanded features: 6x the block's input channels, groups of a quarter of them.
    widths = [sum(blocks[i].gc.split_sizes) for i in MBV2_RESIDUAL_BLOCKS]
    assert widths == [144, 192, 192, 384, 384, 384, 576, 576, 960, 960]
    assert all(blocks[i].gc.split_sizes == [w // 4] * 4 for i, w in zip(MBV2_RESIDUAL_BLOCKS, widths))
    assert all(b.shift is None and b.gc is None for b in build_model("tsn_mbv2", 3).backbone.features[1:18])


def test_non_local_after_blocks_0_and_2_of_layer2_and_0_2_4_of_layer3():
    with torch.device("meta"):
        backbone = build_model("tsm_r50_nl", 400).backbone
    placed = {
        layer: [i for i, b in enumerate(getattr(backbone, layer)) if b.nl is not None]
        for layer in ("layer1", "layer2", "layer3", "layer4")
    }
    assert placed == {"layer1": [], "layer2": [0, 2], "layer3": [0, 2, 4], "layer4": []}
    assert backbone.layer3[4].nl.channels == 1024 and backbone.layer3[4].nl.theta.out_channels == 512
    assert all(b.shift is not None for layer in ("layer1", "layer4") for b in getattr(backbone, layer))


def test_fresh_non_local_blocks_are_the_identity():
    # The zero-initialised output BN: tsm_r50_nl with tsm_r50's weights computes tsm_r50.
    torch.manual_seed(0)
    plain = build_model("tsm_r50", 5, num_segments=2).eval()
    nl = build_model("tsm_r50_nl", 5, num_segments=2).eval()
    missing, unexpected = nl.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".nl." in k for k in missing)
    x = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nl(x), plain(x))


def test_resnext_grouped_conv2_shift_and_gc():
    with torch.device("meta"):
        backbone = build_model("gc_tsm_rx101", 400).backbone
    for stage, width in enumerate((256, 512, 1024, 2048)):
        block = getattr(backbone, f"layer{stage + 1}")[0]
        assert block.conv2.groups == 32 and block.conv2.out_channels == width
        assert block.conv3.out_channels == 256 * 2**stage
        assert sum(block.gc.split_sizes) == width and block.gc.split_sizes == [width // 4] * 4
    layer3 = backbone.layer3
    assert [i for i, b in enumerate(layer3) if b.shift is not None] == list(range(0, 23, 2))
    assert [i for i, b in enumerate(layer3) if b.gc is not None] == list(range(0, 23, 2))


# --- blocks against references from the formulas ----------------------------------------------------------


def randomise_bns(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(c, generator=generator) - 0.5)
    return module.eval()


def bn(x, m):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = m.weight / torch.sqrt(m.running_var + m.eps)
    return (x - m.running_mean.view(shape)) * scale.view(shape) + m.bias.view(shape)


def shift_reference(x_BCHW, frames, div):
    """out[t, :f] = x[t + 1, :f]; out[t, f:2f] = x[t - 1, f:2f]; zeros from outside the clip."""
    x = x_BCHW.unflatten(0, (-1, frames))
    fold = x.shape[2] // div
    out = x.clone()
    for t in range(frames):
        out[:, t, :fold] = x[:, t + 1, :fold] if t + 1 < frames else 0
        out[:, t, fold : 2 * fold] = x[:, t - 1, fold : 2 * fold] if t > 0 else 0
    return out.flatten(0, 1)


def test_inverted_residual_with_shift_against_the_formula():
    torch.manual_seed(0)
    frames, c, hidden = 3, 16, 96
    block = randomise_bns(InvertedResidual(c, c, 1, 6, shift=TemporalShift(frames, 8)))
    x = torch.randn(2 * frames, c, 7, 7)
    (w1, bn1, _), (w2, bn2, _), w3, bn3 = block.conv
    h = bn(F.conv2d(shift_reference(x, frames, 8), w1.weight), bn1).clamp(0, 6)
    h = bn(F.conv2d(h, w2.weight, padding=1, groups=hidden), bn2).clamp(0, 6)
    expected = x + bn(F.conv2d(h, w3.weight), bn3)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)
        block.shift = None  # the test can tell a shifted block from a plain one
        assert (block(x) - expected).abs().max() > 0.1


def test_non_local_block_against_the_formula():
    torch.manual_seed(0)
    frames, c, side = 4, 8, 6
    block = randomise_bns(NonLocal3d(c, frames))
    x_BCHW = torch.randn(2 * frames, c, side, side)
    x = x_BCHW.unflatten(0, (2, frames))  # (N, T, C, H, W)

    def conv(m, v):  # a 1x1x1 conv over channels, per position
        return torch.einsum("ntchw,dc->ntdhw", v, m.weight.flatten(1)) + m.bias.view(1, 1, -1, 1, 1)

    def pool(v):  # max over each 2x2 spatial window, per frame
        n, t, d, h, w = v.shape
        return v.reshape(n, t, d, h // 2, 2, w // 2, 2).amax((4, 6))

    theta = conv(block.theta, x).permute(0, 1, 3, 4, 2).reshape(2, -1, c // 2)  # (N, THW, D)
    phi = pool(conv(block.phi, x)).permute(0, 1, 3, 4, 2).reshape(2, -1, c // 2)  # (N, THW/4, D)
    g = pool(conv(block.g, x)).permute(0, 1, 3, 4, 2).reshape(2, -1, c // 2)
    weights = torch.softmax(torch.einsum("nqd,nkd->nqk", theta, phi), dim=-1)
    y = torch.einsum("nqk,nkd->nqd", weights, g).reshape(2, frames, side, side, c // 2).permute(0, 1, 4, 2, 3)
    w_y = conv(block.out_conv, y)
    expected = x + bn(w_y.transpose(1, 2), block.out_bn).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(block(x_BCHW), expected.flatten(0, 1))


# --- ImageNet weights -------------------------------------------------------------------------------------


def torchvision_mobilenet_v2_state(classes: int = 1000) -> dict[str, torch.Tensor]:
    """An ImageNet MobileNetV2 state_dict with torchvision's key names and shapes, written from its definition
    (features.N: Conv2dNormActivation = [conv, BN, ReLU6]; an inverted residual's `conv` = [expand CNA], dw
    CNA, project conv, BN; classifier = [Dropout, Linear])."""
    state = {}
    layers = iter(mobilenet_v2_layers())

    def put(name):
        kind, *dims = next(layers)
        if kind == "conv":
            cin, cout, k, groups, _ = dims
            state[f"{name}.weight"] = torch.randn(cout, cin // groups, k, k)
        else:
            (c,) = dims
            state.update(
                {
                    f"{name}.weight": torch.rand(c),
                    f"{name}.bias": torch.randn(c),
                    f"{name}.running_mean": torch.randn(c),
                    f"{name}.running_var": torch.rand(c) + 0.5,
                    f"{name}.num_batches_tracked": torch.tensor(7),
                }
            )

    put("features.0.0"), put("features.0.1")
    index = 1
    for t, _, n, _ in INVERTED_RESIDUAL_SETTING:
        for _ in range(n):
            p = f"features.{index}.conv"
            names = ["0.0", "0.1", "1.0", "1.1", "2", "3"] if t != 1 else ["0.0", "0.1", "1", "2"]
            for name in names:
                put(f"{p}.{name}")
            index += 1
    put("features.18.0"), put("features.18.1")
    state["classifier.1.weight"], state["classifier.1.bias"] = (
        torch.randn(classes, 1280),
        torch.randn(classes),
    )
    return state


def test_torchvision_mobilenet_v2_state_dict_loads_strictly(tmp_path, caplog):
    state = torchvision_mobilenet_v2_state()
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == (
        3_504_872
    )
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(state, path)
    with caplog.at_level("INFO"):
        model = build_model("gc_tsm_mbv2", 7, pretrained=str(path))
    assert "classifier.1.weight" in caplog.text
    loaded = model.backbone.state_dict()
    assert set(model.backbone.imagenet_keys()) == set(state) - {"classifier.1.weight", "classifier.1.bias"}
    for key in ("features.0.0.weight", "features.1.conv.1.weight", "features.16.conv.1.1.running_var"):
        assert torch.equal(loaded[key], state[key]), key
    del state["features.3.conv.2.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['features.3.conv.2.weight'\]"):
        build_model("tsm_mbv2", 7, pretrained=str(path))


def resnext_imagenet_shapes(blocks, groups, width_per_group) -> dict[str, tuple]:
    shapes = {"conv1.weight": (64, 3, 7, 7)}
    inp = 64
    for stage, n in enumerate(blocks):
        planes = 64 * 2**stage
        width = planes * width_per_group // 64 * groups
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            shapes[f"{p}.conv1.weight"] = (width, inp, 1, 1)
            shapes[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
            shapes[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            if i == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inp, 1, 1)
            inp = planes * 4
    return shapes


def test_resnext_and_nl_keep_the_torchvision_keys():
    with torch.device("meta"):
        rx = build_model("gc_tsm_rx101", 400).backbone
        nl = build_model("tsm_r50_nl", 400).backbone
    for backbone, shapes in (
        (rx, resnext_imagenet_shapes((3, 4, 23, 3), 32, 8)),
        (nl, resnext_imagenet_shapes((3, 4, 6, 3), 1, 64)),
    ):
        state = backbone.state_dict()
        keys = backbone.imagenet_keys()
        assert {k: tuple(state[k].shape) for k in keys if state[k].dim() == 4} == shapes
        assert not any(".gc." in k or ".nl." in k for k in keys)
    assert rx.torchvision_name == "resnext101_32x8d" and nl.torchvision_name == "resnet50"


# --- training at small sizes ------------------------------------------------------------------------------


def nl_mini(num_segments: int, **options) -> VideoNet:
    """A CPU-sized ResNet with one non-local block in each of layer2 and layer3 (not registered)."""
    arch = Arch((1, 1, 1, 1), 16, non_local=((), (0,), (0,), ()))
    return VideoNet(ResNet(arch, num_segments=num_segments, shift_div=8, **options), 5, num_segments)


def resnext_mini(num_segments: int, context=None) -> VideoNet:
    arch = Arch((1, 1, 1, 1), 16, groups=4, width_per_group=32)
    return VideoNet(ResNet(arch, num_segments=num_segments, shift_div=8, context=context), 5, num_segments)


def assert_every_parameter_trains(model: nn.Module, x: torch.Tensor) -> None:
    logits = model.train()(x)
    assert logits.shape == (x.shape[0], 5)
    logits.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", ["tsn_mbv2", "tsm_mbv2", "gc_tsm_mbv2", "tsm_r50_nl"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, num_segments=2)
    with torch.no_grad():  # a fresh NL block's output BN is zero, which stops the gradient to its convs
        for m in model.modules():
            if isinstance(m, NonLocal3d):
                m.out_bn.weight.fill_(0.5)
        model.fc.weight.normal_(0.0, 0.3)
    assert_every_parameter_trains(model, torch.randn(2, 2, 3, 32, 32))


def test_resnext_mini_with_gc_trains_every_parameter():
    torch.manual_seed(0)
    model = resnext_mini(2, lambda width, index: GroupContext(width, CALIBRATOR_KINDS, width // 4, 4, 2))
    assert model.backbone.layer1[0].conv2.groups == 4 and model.backbone.layer1[0].gc.split_sizes == [8] * 4
    with torch.no_grad():
        model.fc.weight.normal_(0.0, 0.3)
    assert_every_parameter_trains(model, torch.randn(2, 2, 3, 48, 48))


# --- execution modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gc_tsm_mbv2", "nl_mini"])
def test_channels_last_and_bf16_autocast(name):
    torch.manual_seed(0)
    model = nl_mini(4) if name == "nl_mini" else build_model(name, 6, num_segments=4)
    model = randomise_bns(model)
    x = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with runtime.autocast("bf16", "cpu"):
            out = model(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
        runtime.to_channels_last(model)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_compiled_mbv2_is_one_graph_and_matches_eager():
    # aot_eager: Dynamo + AOTAutograd without C++ code generation; fullgraph=True: a graph break is an error.
    torch.manual_seed(0)
    model = randomise_bns(build_model("gc_tsm_mbv2", 6, num_segments=4))
    x = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))


def gc_inverted_residual(num_segments: int) -> nn.Module:
    gc = GroupContext(96, CALIBRATOR_KINDS, 24, 4, num_segments)
    return InvertedResidual(16, 16, 1, 6, shift=TemporalShift(num_segments, 8), gc=gc)


@pytest.mark.parametrize("name", ["gc_inverted_residual", "nl_mini"])
def test_compiled_training_step_is_one_graph_and_matches_eager(name):
    # Forward and backward (BN in training mode) traced as one graph, gradients equal to eager's.
    def make():
        torch.manual_seed(0)
        if name == "nl_mini":
            model = nl_mini(4)
            model.dropout.p = 0.0  # the same outputs from both
            model.backbone.layer2[0].nl.out_bn.weight.data.fill_(0.5)  # a fresh one passes no gradient
        else:
            model = gc_inverted_residual(4)
        return model.train()

    model, reference = make(), make()
    x = torch.randn(2, 4, 3, 32, 32) if name == "nl_mini" else torch.randn(8, 16, 8, 8)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    ref_out = reference(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    grads = dict(model.named_parameters())
    for pname, p in reference.named_parameters():
        torch.testing.assert_close(grads[pname].grad, p.grad, atol=1e-4, rtol=1e-3, msg=pname)


def test_non_local_block_traces_without_graph_breaks():
    block = randomise_bns(NonLocal3d(16, 4))
    assert torch._dynamo.explain(block)(torch.randn(8, 16, 6, 6)).graph_break_count == 0


@pytest.mark.slow  # inductor's C++ code generation: ~20 s on 2 cores
def test_inductor_compiled_non_local_block_matches_eager():
    torch.manual_seed(0)
    block = randomise_bns(NonLocal3d(16, 4))
    x = torch.randn(8, 16, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), atol=1e-5, rtol=1e-4)


def test_imagenet_for_mbv2_and_rx101_asks_torchvision_for_their_weights(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    for name in ("tsm_mbv2", "tsm_rx101"):
        with torch.device("meta"), pytest.raises(RuntimeError, match="torchvision"):
            build_model(name, 7, pretrained="imagenet")
