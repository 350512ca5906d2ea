"""models.online: frame-by-frame OnlineTSM equals the offline model with the uni-directional shift (same
weights; ResNet and MobileNetV2, the TSM online demo's backbone), the shift is causal, GC and non-local
models are refused, and the benchmark command runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model
from models.online import OnlineTSM, causal_model, causal_shift, frame_logits, main
from models.temporal import TemporalShift, temporal_shift

# One frame through conv kernels vs a batch of T frames: the same sums in another blocking order, ~1e-6 of
# logits of magnitude ~3 (measured); 1e-5 absolute + 1e-5 relative is 10x that and far below any real error
# (a missing or misplaced cached fold changes logits by ~1).
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def randomised(name: str, num_segments: int, **options) -> nn.Module:
    """A model with non-trivial BatchNorms and order-1 logits, so that a wrong cache shows."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, num_segments=num_segments, **options)
    with torch.no_grad():
        if name.endswith("mbv2"):
            # Random running statistics would leave MobileNetV2's deep features nearly constant across
            # frames (and the shift invisible): take the statistics of a random batch instead.
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = 1.0
            model.train()(torch.randn(2, num_segments, 3, 48, 48))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                if not name.endswith("mbv2"):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        model.fc.weight.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "name, shift_place",
    [("tsm_mini", "blockres"), ("tsm_mini", "block"), ("tsn_mini", "blockres"), ("tsm_mbv2", "blockres")],
)
def test_frame_by_frame_equals_the_causal_offline_model(name, shift_place):
    frames = 6
    model = randomised(name, frames, shift_place=shift_place)
    clips = torch.randn(2, frames, 3, 48, 48)
    with torch.no_grad():
        expected = frame_logits(causal_model(model), clips.flatten(0, 1)).unflatten(0, (2, frames))
        bidirectional = frame_logits(model, clips.flatten(0, 1)).unflatten(0, (2, frames))
    online = OnlineTSM(model, window=1)
    for clip, expected_TK in zip(clips, expected):
        online.reset()
        got_TK = torch.stack([online.step(frame) for frame in clip])
        # MobileNetV2's logits here are ~20 (batch statistics with small variances): the same relative error.
        scale = max(1.0, expected_TK.abs().max().item())
        torch.testing.assert_close(
            got_TK, expected_TK, rtol=TOLERANCE["rtol"], atol=TOLERANCE["atol"] * scale
        )
    if name.startswith("tsm"):  # the test can tell the two shifts apart
        assert (bidirectional - expected).abs().max() > 0.1


def test_window_mean_after_t_frames_is_the_causal_clip_logits():
    frames = 4
    model = randomised("tsm_mini", frames)
    clip = torch.randn(1, frames, 3, 48, 48)
    online = OnlineTSM(model)  # window = num_segments
    for frame in clip[0]:
        logits = online.step(frame)
    with torch.no_grad():
        torch.testing.assert_close(logits, causal_model(model)(clip)[0], **TOLERANCE)


def test_causal_shift_takes_only_the_past_fold_in_temporal_shifts_layout():
    x = torch.randn(2 * 5, 16, 3, 3)
    fold = 16 // 8
    out, both = causal_shift(x, 5), temporal_shift(x, 5)
    assert (out[:, :fold] == 0).all()  # the fold that temporal_shift fills from frame t+1
    torch.testing.assert_close(out[:, fold:], both[:, fold:], rtol=0, atol=0)
    # Frames 3 and 4 of each clip change: frames 0 to 2 of the output must not.
    x_later = (x.unflatten(0, (2, 5)) + (torch.arange(5) >= 3).view(1, 5, 1, 1, 1)).flatten(0, 1)
    out_later = causal_shift(x_later, 5)
    assert torch.equal(out_later.unflatten(0, (2, 5))[:, :3], out.unflatten(0, (2, 5))[:, :3])
    assert not torch.equal(out_later, out)


def test_the_given_model_is_left_as_it_was():
    model = randomised("tsm_mini", 3)
    OnlineTSM(model).step(torch.randn(3, 32, 32))
    causal_model(model)
    shifts = [m for m in model.modules() if isinstance(m, TemporalShift)]
    assert shifts and all(type(m) is TemporalShift for m in shifts)


@pytest.mark.parametrize("name", ["gc_tsm_mini", "ecal_l_tsm_mini", "ecal_t_tsm_mini", "ecal_s_tsn_mini"])
def test_models_with_calibrators_are_refused(name):
    model = build_model(name, num_classes=3, num_segments=4)
    with pytest.raises(ValueError, match="need future frames"):
        OnlineTSM(model)
    with pytest.raises(ValueError, match="need future frames"):
        causal_model(model)


def test_non_local_models_are_refused():
    with torch.device("meta"):
        model = build_model("tsm_r50_nl", num_classes=3, num_segments=4)
    with pytest.raises(ValueError, match="non-local blocks, which need future frames"):
        OnlineTSM(model)


@pytest.mark.parametrize("name", ["gst_mini", "tdn_mini", "gc_tdn_mini"])
def test_gst_and_tdn_are_refused_in_one_line(name, capsys):
    """GST's 3D convolutions and TDN's 5-frame differences are not shifts: the command crashed in
    unflatten; it refuses them in one line, exit 2."""
    with pytest.raises(ValueError, match="cannot run online"):
        OnlineTSM(build_model(name, num_classes=3, num_segments=4))
    assert main(["--model", name, "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"error: {name.removeprefix('gc_')[:3]}_* models cannot run online"
    )


def test_benchmark_command(capsys):
    assert main(["--model", "tsm_mini", "--size", "32", "--warmup", "1", "--iters", "3"]) == 0
    assert "frames/s" in capsys.readouterr().out
    assert main(["--model", "gc_tsm_mini"]) == 2
    assert "need future frames" in capsys.readouterr().err
