"""models/: registry, shapes, gradients, reference counts, pretrained weights, partial BN, param groups."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import runtime
from models import build_model, list_models, param_groups, parse_name
from models.temporal import GroupContext, TemporalShift

MINI = [n for n in list_models() if n.endswith("_mini")]
BIG = [n for n in list_models() if not n.endswith("_mini")]
MODELS_DOC = (ROOT / "docs" / "models.md").read_text()


def test_registry_names():
    names = set(list_models())
    for arch in ("r50", "r101", "mini"):
        for base in ("tsn", "tsm", "gc_tsn", "gc_tsm"):
            assert f"{base}_{arch}" in names
        for kind in "ltsg":
            assert {f"ecal_{kind}_tsn_{arch}", f"ecal_{kind}_tsm_{arch}"} <= names
    for family in ("gst", "tdn"):
        assert {f"{family}_r50", f"gc_{family}_r50", f"{family}_mini", f"gc_{family}_mini"} <= names
    assert (
        len(names) == 36 + 8 + 7
    )  # + GST/TDN (r50, mini, GC or not), tsn/tsm/gc_tsm_mbv2, tsm_r50_nl, tsn/tsm/gc_tsm_rx101
    with pytest.raises(ValueError, match="unknown model 'gc_tsm_r18'"):
        build_model("gc_tsm_r18", 10)


@pytest.mark.parametrize("name", MINI)
def test_mini_trains_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, num_segments=4).train()
    logits = model(torch.randn(2, model.input_frames, 3, 48, 48))
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


def mini_params(classes: int, gc: bool) -> int:
    """The mini bottleneck ResNet (one block per stage, planes 16-128) written out: stem conv + BN; per block
    conv1 1x1, conv2 3x3, conv3 1x1 (x4), their BNs, the first block's 1x1 downsample + BN; with GC (cdiv 4,
    c = planes / 4 each) ECal-L Conv3d (3,1,1) + BN, ECal-T Conv1d 3 + BN, ECal-S 3x3, ECal-G Linear + BN;
    then the classifier on 512 features."""
    params, inp = 3 * 16 * 49 + 2 * 16, 16
    for planes in (16, 32, 64, 128):
        params += (
            inp * planes + 9 * planes * planes + planes * 4 * planes + 2 * (planes + planes + 4 * planes)
        )
        params += inp * 4 * planes + 2 * 4 * planes
        c = planes // 4
        params += gc * ((3 * c * c + 2 * c) + (3 * c * c + 2 * c) + 9 * c * c + (c * c + 2 * c))
        inp = 4 * planes
    return params + 512 * classes + classes


def test_mini_size():
    # docs/models.md's "0.53 M parameters as gc_tsm_mini" (8 classes: the demo's synthetic set)
    params = sum(p.numel() for p in build_model("gc_tsm_mini", 8).parameters())
    assert params == mini_params(8, gc=True) == 532_608
    assert round(params / 1e6, 2) == 0.53 and "(0.53 M parameters as `gc_tsm_mini`)" in MODELS_DOC
    assert sum(p.numel() for p in build_model("tsm_mini", 8).parameters()) == mini_params(8, gc=False)


def test_big_models_shapes():
    # Shapes through the whole forward for every r50/r101 name on the meta device (no compute, no init cost);
    # real numbers for r50 and r101 are checked below and in test_r50_backward_every_parameter.
    for name in BIG:
        with torch.device("meta"):
            model = build_model(name, num_classes=3, num_segments=2).eval()
            # 64 px: TDN's long-term module pools layer4's 2x2 maps by 2 (at 32 px they are 1x1)
            logits = model(torch.empty(1, model.input_frames, 3, 64, 64))
        assert logits.shape == (1, 3), name


def test_r101_forward_is_finite():
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_model("gc_tsm_r101", num_classes=3, num_segments=2).eval()
        logits = model(torch.randn(1, 2, 3, 32, 32))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_r50_backward_every_parameter():
    model = build_model("gc_tsm_r50", num_classes=3, num_segments=2).train()
    model(torch.randn(2, 2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_wrong_number_of_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="num_segments=8"):
        build_model("tsm_mini", 4, num_segments=8)(torch.randn(1, 4, 3, 32, 32))


@pytest.mark.parametrize(
    "name, params",
    [
        ("tsn_r50", 24_327_632),
        ("tsm_r50", 24_327_632),
        ("gc_tsm_r50", 25_590_768),
        ("gc_tsn_r50", 25_590_768),
    ],
)
def test_reference_parameter_counts(name, params):
    with torch.device("meta"):
        model = build_model(name, num_classes=400, num_segments=8)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name, gmacs", [("tsm_r50", 32.70), ("gc_tsm_r50", 33.13)])
def test_reference_macs(name, gmacs):
    with torch.device("meta"):
        model = build_model(name, num_classes=400, num_segments=8).eval()
        x = torch.empty(1, 8, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        model(x)
    counted = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert counted <= {"aten.convolution", "aten.addmm", "aten.mm"}
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, rel=0.01)


def _temporal_blocks(model):
    return [(name, b) for name, b in model.backbone.named_modules() if hasattr(b, "conv3")]


def test_r101_deep_stage_every_other_block():
    with torch.device("meta"):
        model = build_model("gc_tsm_r101", 400, gc_loop=True)
    layer3 = model.backbone.layer3
    assert len(layer3) == 23
    assert [i for i, b in enumerate(layer3) if b.shift is not None] == list(range(0, 23, 2))
    assert [i for i, b in enumerate(layer3) if b.gc is not None] == list(range(0, 23, 2))
    assert all(b.shift is not None and b.gc is not None for b in model.backbone.layer2)
    # 'loop' steps only through blocks that carry GC: 3 + 4 + 12 + 3 of them.
    offsets = [b.gc.targets[0] for _, b in _temporal_blocks(model) if b.gc is not None]
    assert offsets == [k % 4 for k in range(22)]


def test_gc_groups_and_single_calibrators():
    model = build_model("gc_tsm_mini", 4, cdiv=4)
    gc = model.backbone.layer1[0].gc
    assert gc.split_sizes == [4, 4, 4, 4] and gc.targets == [0, 1, 2, 3]
    gc8 = build_model("gc_tsn_mini", 4, cdiv=8).backbone.layer2[0].gc
    assert gc8.split_sizes == [4] * 8 and gc8.targets == [0, 1, 2, 3]
    looped = build_model("gc_tsm_mini", 4, gc_loop=True)
    assert [b.gc.targets for _, b in _temporal_blocks(looped)] == [
        [0, 1, 2, 3],
        [1, 2, 3, 0],
        [2, 3, 0, 1],
        [3, 0, 1, 2],
    ]
    single = build_model("ecal_t_tsm_r50", 4).backbone.layer3[0].gc
    assert single.kinds == ("t",) and single.split_sizes == [16, 240] and single.targets == [0]
    assert parse_name("ecal_s_tsn_r101") == {"arch": "r101", "shift": False, "calibrators": ("s",)}
    tsn = build_model("tsn_mini", 4)
    assert all(b.shift is None and b.gc is None for _, b in _temporal_blocks(tsn))


def test_group_context_calibrates_each_group_with_its_calibrator():
    torch.manual_seed(0)
    gc = GroupContext(16, ("l", "t", "s", "g"), 4, 4, num_segments=3, offset=1).eval()
    x = torch.randn(6, 16, 5, 5)
    out = gc(x)
    groups = x.split(4, dim=1)
    expected = [groups[0], groups[1], groups[2], groups[3]]
    for j, kind in enumerate("ltsg"):
        target = (1 + j) % 4
        expected[target] = getattr(gc, f"ecal_{kind}")(groups[target])
    torch.testing.assert_close(out, torch.cat(expected, 1))


def test_block_shift_place():
    torch.manual_seed(0)
    block = build_model("tsm_mini", 4, num_segments=2, shift_place="block").backbone.layer2[0].eval()
    x = torch.randn(4, 64, 8, 8)
    shift = block.shift
    block.shift = None
    plain = block(x)
    block.shift = shift
    torch.testing.assert_close(block(x), shift(plain))


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    model = build_model("gc_tsm_mini", 6, num_segments=4).eval()
    x = torch.randn(2, 4, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        with runtime.autocast("bf16", "cpu"):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.05)


def test_channels_last_end_to_end():
    torch.manual_seed(0)
    model = build_model("gc_tsm_mini", 6, num_segments=4).eval()
    x = torch.randn(2, 4, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        runtime.to_channels_last(model)
        block = model.backbone.layer2[0]
        h = torch.randn(8, 64, 12, 12).contiguous(memory_format=torch.channels_last)
        assert block(h).is_contiguous(memory_format=torch.channels_last)
        assert block.gc(block.bn2(block.conv2(h[:, :32]))).is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_partial_bn_freezes_all_but_first_bn2d():
    model = build_model("gc_tsm_mini", 4, num_segments=2, partial_bn=True).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns[0].training and bns[0].weight.requires_grad
    assert all(
        not bn.training and not bn.weight.requires_grad and not bn.bias.requires_grad for bn in bns[1:]
    )
    others = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d))]
    assert others and all(m.training and m.weight.requires_grad for m in others)
    frozen_stats = bns[1].running_mean.clone()
    first_stats = bns[0].running_mean.clone()
    model(torch.randn(2, 2, 3, 32, 32))
    torch.testing.assert_close(bns[1].running_mean, frozen_stats)
    assert not torch.equal(bns[0].running_mean, first_stats)
    model.eval()
    assert not bns[0].training


def test_reset_classifier():
    model = build_model("tsm_mini", 4)
    model.reset_classifier(11)
    assert model(torch.randn(1, 8, 3, 32, 32)).shape == (1, 11)
    assert model.classifier_names() == ["fc.weight", "fc.bias"]


def test_param_groups_policy():
    model = build_model("gc_tsm_mini", 4)
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {g["name"]: g for g in param_groups(model, lr=0.1, weight_decay=1e-4)}
    assert set(plain) == {"first_conv", "weight", "bias", "norm"}
    assert [names[id(p)] for p in plain["first_conv"]["params"]] == ["backbone.conv1.weight"]
    assert plain["bias"]["lr"] == pytest.approx(0.2) and plain["bias"]["weight_decay"] == 0
    assert {names[id(p)] for p in plain["bias"]["params"]} == {"fc.bias"}
    assert plain["norm"]["weight_decay"] == 0 and plain["weight"]["weight_decay"] == pytest.approx(1e-4)

    groups = param_groups(model, lr=0.1, weight_decay=1e-4, gc_lr_mult=5, fc_lr_mult=5)
    by_name = {g["name"]: g for g in groups}
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert {names[id(p)] for p in by_name["fc_weight"]["params"]} == {"fc.weight"}
    assert by_name["fc_bias"]["lr_mult"] == 5 and by_name["fc_bias"]["weight_decay"] == 0
    gc_weights = {names[id(p)] for p in by_name["gc_weight"]["params"]}
    assert "backbone.layer1.0.gc.ecal_l.conv.weight" in gc_weights
    assert "backbone.layer1.0.gc.ecal_g.linear.weight" in gc_weights
    assert all(".gc." in names[id(p)] for p in by_name["gc_norm_bias"]["params"])
    assert by_name["gc_weight"]["lr"] == pytest.approx(0.5) and by_name["gc_norm_bias"]["weight_decay"] == 0
    assert not any(".gc." in names[id(p)] for p in by_name["norm"]["params"] + by_name["weight"]["params"])
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    frozen = build_model("tsn_mini", 4, partial_bn=True)
    trainable = sum(p.numel() for g in param_groups(frozen, lr=0.1, weight_decay=0) for p in g["params"])
    assert trainable == sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    with pytest.raises(TypeError, match="unwrap_model"):
        param_groups(torch.compile(frozen), lr=0.1, weight_decay=0)


def torchvision_resnet_state(layers: tuple[int, ...], width: int = 64, classes: int = 1000) -> dict:
    """An ImageNet ResNet state_dict with torchvision's key names and shapes, written from its definition."""
    state = {}

    def conv(name, cout, cin, k):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k)

    def bn(name, c):
        state.update(
            {
                f"{name}.weight": torch.rand(c),
                f"{name}.bias": torch.randn(c),
                f"{name}.running_mean": torch.randn(c),
                f"{name}.running_var": torch.rand(c) + 0.5,
                f"{name}.num_batches_tracked": torch.tensor(100),
            }
        )

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes = width * 2**stage
        for i in range(blocks):
            p = f"layer{stage + 1}.{i}"
            conv(f"{p}.conv1", planes, inplanes, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4)
            if i == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    state["fc.weight"], state["fc.bias"] = torch.randn(classes, inplanes), torch.randn(classes)
    return state


def test_imagenet_state_dict_loads_strictly_from_a_local_file(tmp_path, caplog):
    state = torchvision_resnet_state((3, 4, 6, 3))
    path = tmp_path / "resnet50_imagenet.pth"
    torch.save(state, path)
    with caplog.at_level("INFO"):
        model = build_model("gc_tsm_r50", 7, pretrained=str(path))
    assert "fc.weight" in caplog.text
    loaded = model.backbone.state_dict()
    for key in ("conv1.weight", "layer3.5.bn2.running_var", "layer4.0.downsample.0.weight"):
        assert torch.equal(loaded[key], state[key])
    assert model.fc.weight.shape == (7, 2048)

    with pytest.raises(ValueError, match=r"missing \['layer3.6.conv1.weight'"):
        build_model("tsm_r101", 7, pretrained=str(path))
    del state["layer2.1.bn3.running_var"]
    state["layer2.1.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layer2.1.bn3.running_var.*layer2.1.extra.weight"):
        build_model("tsm_r50", 7, pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model("tsm_r50", 7, pretrained=str(tmp_path / "nowhere.pth"))


def test_imagenet_without_torchvision_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(RuntimeError, match="torchvision"):
        build_model("tsm_r50", 7, pretrained="imagenet")
    with pytest.raises(ValueError, match="r50 / r101"):
        build_model("tsm_mini", 7, pretrained="imagenet")


def test_temporal_shift_module_repr():
    assert "shift_div=8" in repr(TemporalShift(8, 8))


def test_partial_bn_survives_sync_batchnorm_conversion():
    model = build_model("gc_tsm_mini", 4, num_segments=2, partial_bn=True)
    before = model.frozen_bns()
    assert len(before) == sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules()) - 1 > 0
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
    after = model.frozen_bns()
    assert len(after) == len(before) and all(isinstance(m, nn.SyncBatchNorm) for m in after)
    assert all(not m.training and not m.weight.requires_grad for m in after)
    first = next(m for m in model.backbone.modules() if isinstance(m, nn.SyncBatchNorm))
    assert first.training and first not in after
