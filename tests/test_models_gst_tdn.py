"""models.gst / models.tdn: counts at 224, each new block against a reference written here from the formulas,
calibrator placement, ImageNet initialisation, the 5-frames-per-segment contract, channels_last / bf16 /
compile."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from torch.utils.flop_counter import FlopCounterMode

import runtime
from models import build_model, load_imagenet, parse_name
from models.gst import GSTBottleneck
from models.resnet import ARCHS
from models.tdn import LearnableShift, LongTermDifference, ShortTermDifference, TDNResNet
from models.temporal import temporal_shift

MODELS_DOC = (ROOT / "docs" / "models.md").read_text()
NAMES = ("gst_mini", "gc_gst_mini", "tdn_mini", "gc_tdn_mini")


def _counts(name: str, num_classes: int = 400) -> tuple[int, float]:
    """Parameters and conv/linear GMACs of one 8-segment 224x224 clip (TDN: 40 input frames)."""
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes, num_segments=8).eval()
        x = torch.empty(1, model.input_frames, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert {str(op) for op in counter.get_flop_counts()["Global"]} <= {
        "aten.convolution",
        "aten.addmm",
        "aten.mm",
    }
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2e9


def gc_addition(width: int, side: int, norm: bool, frames: int = 8) -> tuple[int, int]:
    """Parameters and MACs GC (cdiv 4, c = width / 4 channels a calibrator) adds on `width` channels of
    side x side frames: ECal-L Conv3d (3,1,1) on every position, ECal-T Conv1d 3 on the pooled frames, ECal-S
    dilated 3x3 on the temporally pooled map, ECal-G Linear on the clip-pooled vector; with `norm` the
    BatchNorms of L, T and G (2c parameters each)."""
    c = width // 4
    params = 3 * c * c + 3 * c * c + 9 * c * c + c * c + (3 * 2 * c if norm else 0)
    macs = 3 * c * c * frames * side * side + 3 * c * c * frames + 9 * c * c * side * side + c * c
    return params, macs


# (width, side at 224, blocks) of the calibrated maps. GC-GST: conv2's output as in GC-TSM, without norms.
# GC-TDN: layer1's bn2 output (56) and the difference path's own layer1 (after a 2x2 pool, a stride-2 conv and
# a max pool: 28), then bn1's output in layers 2-4, before the stride-2 conv2 in each stage's first block.
GC_MAPS = {
    "gst": ([(64, 56, 3), (128, 28, 4), (256, 14, 6), (512, 7, 3)], False),
    "tdn": (
        [(64, 56, 3), (64, 28, 3), (128, 56, 1), (128, 28, 3), (256, 28, 1), (256, 14, 5), (512, 14, 1)]
        + [(512, 7, 2)],
        True,
    ),
}


@pytest.mark.parametrize(
    "name, params, gmacs", [("gst_r50", 21_498_320, 29.00), ("tdn_r50", 24_873_648, 35.64)]
)
def test_counts_per_8x224_clip(name, params, gmacs):
    got_params, got_gmacs = _counts(name)
    assert got_params == params and got_gmacs == pytest.approx(gmacs, abs=0.005)


@pytest.mark.parametrize("family", ["gst", "tdn"])
def test_gc_adds_what_the_formula_says(family):
    maps, norm = GC_MAPS[family]
    params = sum(blocks * gc_addition(w, side, norm)[0] for w, side, blocks in maps)
    macs = sum(blocks * gc_addition(w, side, norm)[1] for w, side, blocks in maps)
    (base_params, base_gmacs), (gc_params, gc_gmacs) = _counts(f"{family}_r50"), _counts(f"gc_{family}_r50")
    assert gc_params - base_params == params
    assert gc_gmacs - base_gmacs == pytest.approx(macs / 1e9, rel=1e-9)
    # docs/models.md's table rows (gc_gst_r50 22,755,792 / 29.43, gc_tdn_r50 26,149,360 / 36.33)
    row = re.search(rf"\| `gc_{family}_r50`[^|]* \| ([\d,]+) \| ([\d.]+) \|", MODELS_DOC)
    assert row.groups() == (f"{gc_params:,}", f"{gc_gmacs:.2f}")


def test_counts_agree_with_the_papers():
    # GST paper (Luo & Yuille 2019, Something-Something, 174 classes): GST-R50 8 frames 21.0 M, 29.5 G;
    # TDN paper (Wang et al. 2021): TDN-R50 8 frames 36 G. FLOP counts there include BN / pooling (thop).
    gst_params, gst_gmacs = _counts("gst_r50", 174)
    assert gst_params / 1e6 == pytest.approx(21.0, rel=0.01) and gst_gmacs == pytest.approx(29.5, rel=0.02)
    assert _counts("tdn_r50", 174)[1] == pytest.approx(36.0, rel=0.02)


def test_names_and_input_contract():
    assert (
        parse_name("gc_tdn_r50")["frames_per_segment"] == 5
        and parse_name("gst_r50")["frames_per_segment"] == 1
    )
    assert parse_name("gc_gst_mini")["calibrators"] == ("l", "t", "s", "g")
    with pytest.raises(ValueError, match="unknown model 'tdn_r101'"):
        build_model("tdn_r101", 4)
    model = build_model("tdn_mini", 3, num_segments=2)
    assert model.input_frames == 10
    with pytest.raises(ValueError, match=r"num_segments=2 x frames_per_segment=5 = 10"):
        model(torch.randn(1, 2, 3, 64, 64))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_trains(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, num_segments=3).train()
    logits = model(torch.randn(2, model.input_frames, 3, 64, 64))
    assert logits.shape == (2, 4)
    logits.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# ----- GST


def _temporal_conv_reference(x_NTCHW, weight, stride):
    """3x3x3 conv over (T, H, W), zero-padded, as a sum over the 3 time taps of per-frame 2D convs."""
    n, t = x_NTCHW.shape[:2]
    frames = []
    for i in range(t):
        acc = 0
        for tap in range(3):
            j = i + tap - 1
            if 0 <= j < t:
                acc = acc + F.conv2d(x_NTCHW[:, j], weight[:, :, tap], stride=stride, padding=1)
        frames.append(acc)
    return torch.stack(frames, 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_gst_conv_against_reference(stride):
    torch.manual_seed(0)
    block = GSTBottleneck(16, 16, stride, None, num_segments=3)
    x = torch.randn(2 * 3, 16, 8, 8)
    out = block.grouped_conv(x)
    assert block.conv2.weight.shape == (12, 8, 3, 3) and block.tconv.weight.shape == (4, 8, 3, 3, 3)
    spatial = F.conv2d(x[:, :8], block.conv2.weight, stride=stride, padding=1)
    temporal = _temporal_conv_reference(x[:, 8:].unflatten(0, (2, 3)), block.tconv.weight, stride)
    torch.testing.assert_close(out, torch.cat([spatial, temporal.flatten(0, 1)], 1), atol=1e-5, rtol=1e-4)


def test_gc_gst_calibrates_before_bn2_without_norms():
    torch.manual_seed(0)
    model = build_model("gc_gst_mini", 4, num_segments=2, gc_loop=True).eval()
    block = model.backbone.layer2[0]
    assert not any("bn" in k for k in block.gc.state_dict())  # GC_GST's calibrators have no BatchNorm
    assert [b.gc.targets[0] for layer in (model.backbone.layer1, model.backbone.layer2) for b in layer] == [
        0,
        1,
    ]
    seen = {}
    block.gc.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    block.bn2.register_forward_hook(lambda m, i, o: seen.update(bn2_in=i[0]))
    x = torch.randn(4, 64, 16, 16)
    block(x)
    h = block.relu(block.bn1(block.conv1(x)))
    torch.testing.assert_close(seen["inp"], block.grouped_conv(h))
    torch.testing.assert_close(seen["bn2_in"], seen["out"])


def _fake_imagenet() -> dict[str, torch.Tensor]:
    """A torchvision-named ResNet state_dict of the mini width with random values."""
    state = build_model("tsn_mini", 2).backbone.state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v + 7 for k, v in state.items()}


def test_gst_imagenet_slices_conv2():
    torch.manual_seed(0)
    imagenet = _fake_imagenet()
    imagenet["fc.weight"] = torch.randn(1000, 512)
    model = build_model("gc_gst_mini", 4, num_segments=2)
    load_imagenet(model.backbone, imagenet)
    own = model.backbone.state_dict()
    w = imagenet["layer3.0.conv2.weight"]  # 64 planes: 48 spatial outputs from the first 32 inputs
    torch.testing.assert_close(own["layer3.0.conv2.weight"], w[:48, :32])
    torch.testing.assert_close(own["layer1.0.conv1.weight"], imagenet["layer1.0.conv1.weight"])
    del imagenet["layer2.0.bn2.weight"]
    with pytest.raises(ValueError, match=r"missing \['layer2.0.bn2.weight'\]"):
        load_imagenet(model.backbone, imagenet)


# ----- TDN


def test_learnable_shift_starts_as_tsm_shift_and_is_a_temporal_conv():
    torch.manual_seed(0)
    shift = LearnableShift(16, num_segments=4)
    x = torch.randn(2 * 4, 16, 3, 3)
    torch.testing.assert_close(shift(x), temporal_shift(x, 4, 8))
    with torch.no_grad():
        shift.weight.normal_()
    x5 = x.unflatten(0, (2, 4))
    w = shift.weight[:, 0]  # (C, 3): taps for t-1, t, t+1
    expected = torch.zeros_like(x5)
    for t in range(4):
        for tap, j in enumerate((t - 1, t, t + 1)):
            if 0 <= j < 4:
                expected[:, t] += w[:, tap, None, None] * x5[:, j]
    torch.testing.assert_close(shift(x), expected.flatten(0, 1), atol=1e-5, rtol=1e-4)


def _long_term_reference(m: LongTermDifference, x_BCHW: torch.Tensor, t: int) -> torch.Tensor:
    b = m.reduce_bn(m.reduce(x_BCHW)).unflatten(0, (-1, t))
    conv = m.diff_conv(b.flatten(0, 1)).unflatten(0, (-1, t))
    zero = torch.zeros_like(b[:, 0])
    forward = [conv[:, i + 1] - b[:, i] if i + 1 < t else zero for i in range(t)]
    backward = [conv[:, i - 1] - b[:, i] if i > 0 else zero for i in range(t)]

    def gate(d):
        h, w = d.shape[-2:]
        pooled = m.pooled_bn(m.pooled_conv(F.avg_pool2d(d, 2)))
        rows, cols = torch.arange(h) * pooled.shape[-2] // h, torch.arange(w) * pooled.shape[-1] // w
        pooled = pooled[:, :, rows][:, :, :, cols]  # nearest upsampling
        full = m.full_bn(m.full_conv(d))
        return torch.sigmoid(m.expand_bn(m.expand(d / 3 + pooled / 3 + full / 3))) - 0.5

    y = 0.5 * gate(torch.stack(forward, 1).flatten(0, 1)) + 0.5 * gate(torch.stack(backward, 1).flatten(0, 1))
    return x_BCHW * (1 + y)


@pytest.mark.parametrize("size", [6, 7])
def test_long_term_difference_against_reference(size):
    torch.manual_seed(0)
    m = LongTermDifference(32, num_segments=3).eval()
    for bn in (m.reduce_bn, m.pooled_bn, m.full_bn, m.expand_bn):  # non-trivial BN statistics
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2 * 3, 32, size, size)
    torch.testing.assert_close(m(x), _long_term_reference(m, x, 3), atol=1e-5, rtol=1e-4)


def test_short_term_difference_against_reference():
    torch.manual_seed(0)
    m = ShortTermDifference(8, 5, torch.nn.Identity()).eval()
    x = torch.randn(3, 5, 3, 16, 16)
    diffs = torch.cat([x[:, 1] - x[:, 0], x[:, 2] - x[:, 1], x[:, 3] - x[:, 2], x[:, 4] - x[:, 3]], 1)
    pooled = (
        diffs[..., ::2, ::2] + diffs[..., 1::2, ::2] + diffs[..., ::2, 1::2] + diffs[..., 1::2, 1::2]
    ) / 4
    stem = F.max_pool2d(F.relu(m.bn(F.conv2d(pooled, m.conv.weight, stride=2, padding=3))), 3, 2, 1)
    got_stem, got_layer1 = m(x)
    torch.testing.assert_close(got_stem, stem, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_layer1, stem, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_segments, weights", [(8, (0.5, 0.5)), (2, (0.75, 0.25))])
def test_tdn_fuses_centre_frame_and_differences(num_segments, weights):
    torch.manual_seed(0)
    backbone = build_model("gc_tdn_mini", 3, num_segments=num_segments).backbone.eval()
    assert (backbone.main_weight, backbone.diff_weight) == weights
    x = torch.randn(num_segments * 5, 3, 64, 64)
    seg = x.unflatten(0, (-1, 5))
    diff_stem, diff_layer1 = backbone.short_term(seg)
    a, b = weights
    h = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(seg[:, 2]))))
    h = backbone.layer1(a * h + b * diff_stem.repeat_interleave(2, -1).repeat_interleave(2, -2))
    h = a * h + b * diff_layer1.repeat_interleave(2, -1).repeat_interleave(2, -2)
    expected = backbone.layer4(backbone.layer3(backbone.layer2(h)))
    torch.testing.assert_close(backbone(x), expected, atol=1e-5, rtol=1e-4)


def test_gc_tdn_placement():
    torch.manual_seed(0)
    backbone = build_model("gc_tdn_mini", 3, num_segments=2).backbone.eval()
    assert all(b.gc is not None for b in backbone.short_term.layer1)
    assert all(b.long_term is None for b in backbone.layer1) and backbone.layer2[0].long_term is not None
    for block, expected_input in (
        (backbone.layer2[0], lambda b, x: b.bn1(b.conv1(x))),  # after bn1, before the long-term module
        (backbone.layer1[0], lambda b, x: b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))),  # after bn2
    ):
        inputs = []
        handle = block.gc.register_forward_hook(lambda m, i, o, inputs=inputs: inputs.append(i[0]))
        x = torch.randn(2 * 2, block.conv1.in_channels, 8, 8)
        block(x)
        handle.remove()
        torch.testing.assert_close(inputs[0], expected_input(block, x))
    assert "bn" in "".join(backbone.layer2[0].gc.state_dict())  # GC-TDN's calibrators keep their BN


def test_tdn_imagenet_initialises_the_difference_path():
    torch.manual_seed(0)
    imagenet = _fake_imagenet()
    model = build_model("tdn_mini", 4, num_segments=2)
    bias_before = model.backbone.layer2[0].conv1.bias.clone()
    load_imagenet(model.backbone, imagenet)
    own = model.backbone.state_dict()
    for key in ("layer1.0.conv2.weight", "layer4.0.bn3.running_var"):
        torch.testing.assert_close(own[key], imagenet[key])
    torch.testing.assert_close(own["short_term.layer1.0.conv3.weight"], imagenet["layer1.0.conv3.weight"])
    inflated = imagenet["conv1.weight"].mean(1, keepdim=True).expand(-1, 12, -1, -1)
    torch.testing.assert_close(own["short_term.conv.weight"], inflated)
    torch.testing.assert_close(own["layer2.0.conv1.bias"], bias_before)  # ImageNet has no conv biases
    imagenet["layer2.0.long_term.reduce.weight"] = torch.zeros(2, 32, 1, 1)
    with pytest.raises(ValueError, match="unknown.*long_term"):
        load_imagenet(model.backbone, imagenet)


def test_tdn_backbone_needs_frame_differences():
    with pytest.raises(ValueError, match="2 frames per segment"):
        TDNResNet(ARCHS["mini"], frames_per_segment=1)


# ----- execution modes


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_bf16(name):
    torch.manual_seed(0)
    model = build_model(name, 6, num_segments=2).eval()
    x = torch.randn(2, model.input_frames, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        runtime.to_channels_last(model)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
        with runtime.autocast("bf16", "cpu"):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.05)


@pytest.mark.parametrize("name", ["gc_gst_mini", "gc_tdn_mini"])  # the GC forms run every plain-form module
def test_training_step_traces_as_one_graph(name):
    # aot_eager: forward and backward through AOTAutograd without C++ code generation; fullgraph=True makes
    # any graph break an error.
    torch.manual_seed(0)
    model = build_model(name, 5, num_segments=2, dropout=0.0).train()
    reference = build_model(name, 5, num_segments=2, dropout=0.0).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, model.input_frames, 3, 64, 64)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    ref_out = reference(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    grads = dict(model.named_parameters())
    for pname, p in reference.named_parameters():
        torch.testing.assert_close(grads[pname].grad, p.grad, atol=1e-4, rtol=1e-3, msg=pname)


@pytest.mark.slow
def test_inductor_compiled_gc_tdn_matches_eager():
    # about 100 s on 2 cores (gc_gst_mini: 120 s); the aot_eager test above covers GC-GST's graph
    torch.manual_seed(0)
    model = runtime.to_channels_last(build_model("gc_tdn_mini", 5, num_segments=2).eval())
    x = torch.randn(1, model.input_frames, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
