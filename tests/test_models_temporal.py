"""The shift and each calibrator against references written from the formulas with explicit indexing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.temporal import (
    CALIBRATOR_KINDS,
    ECalG,
    ECalL,
    ECalS,
    ECalT,
    GroupContext,
    TemporalShift,
    temporal_shift,
)

N, T, C, H, W = 2, 4, 3, 3, 3


def randomise_bn(bn: nn.modules.batchnorm._NormBase) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)


def bn_ref(v: torch.Tensor, bn, c: int) -> torch.Tensor:
    return (v - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + bn.eps) * bn.weight[c] + bn.bias[c]


def frames(x_BCHW: torch.Tensor, n: int, t: int) -> torch.Tensor:
    """Frame t of clip n (C, H, W), or zeros outside the clip."""
    if 0 <= t < T:
        return x_BCHW[n * T + t]
    return torch.zeros_like(x_BCHW[0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_temporal_shift_matches_reference(channels_last):
    x = torch.randn(N * T, 16, 2, 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = temporal_shift(x, T, shift_div=8)
    fold = 16 // 8
    for n in range(N):
        for t in range(T):
            for c in range(16):
                source = t + 1 if c < fold else t - 1 if c < 2 * fold else t
                torch.testing.assert_close(out[n * T + t, c], frames(x, n, source)[c])
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_shift_gradient_flows_back_shifted():
    x = torch.randn(T, 8, 1, 1, requires_grad=True)
    temporal_shift(x, T, shift_div=4).sum().backward()
    # channel 0 reads frame t+1, so frame 0 feeds nothing; channels 2-3 read frame t-1, so the last frame
    # feeds nothing.
    assert x.grad[0, 0].item() == 0 and x.grad[1:, 0].eq(1).all()
    assert x.grad[-1, 2].item() == 0 and x.grad[:-1, 2].eq(1).all()
    assert x.grad[:, 4:].eq(1).all()


def test_ecal_l_matches_reference():
    torch.manual_seed(0)
    cal = ECalL(C, T).eval()
    randomise_bn(cal.bn)
    x = torch.randn(N * T, C, H, W)
    out = cal(x)
    w = cal.conv.weight  # (C, C, 3, 1, 1)
    for n in range(N):
        for t in range(T):
            for co in range(C):
                ctx = sum(
                    w[co, ci, k, 0, 0] * frames(x, n, t + k - 1)[ci] for ci in range(C) for k in range(3)
                )
                gate = torch.sigmoid(bn_ref(ctx, cal.bn, co))
                torch.testing.assert_close(out[n * T + t, co], x[n * T + t, co] * gate)


def test_ecal_t_matches_reference():
    torch.manual_seed(0)
    cal = ECalT(C, T).eval()
    randomise_bn(cal.bn)
    x = torch.randn(N * T, C, H, W)
    out = cal(x)
    w = cal.conv.weight  # (C, C, 3)
    for n in range(N):
        for t in range(T):
            for co in range(C):
                ctx = sum(
                    w[co, ci, k] * frames(x, n, t + k - 1)[ci].mean() for ci in range(C) for k in range(3)
                )
                gate = torch.sigmoid(bn_ref(ctx, cal.bn, co))
                torch.testing.assert_close(out[n * T + t, co], x[n * T + t, co] * gate)


def test_ecal_s_matches_reference():
    torch.manual_seed(0)
    cal = ECalS(C, T).eval()
    h = w = 5
    x = torch.randn(N * T, C, h, w)
    out = cal(x)
    wt = cal.conv.weight  # (C, C, 3, 3), dilation 2, padding 2
    for n in range(N):
        m = torch.stack([x[n * T + t] for t in range(T)]).mean(0)  # (C, h, w)
        for co in range(C):
            for i in range(h):
                for j in range(w):
                    ctx = sum(
                        wt[co, ci, a, b] * m[ci, i + 2 * (a - 1), j + 2 * (b - 1)]
                        for ci in range(C)
                        for a in range(3)
                        for b in range(3)
                        if 0 <= i + 2 * (a - 1) < h and 0 <= j + 2 * (b - 1) < w
                    )
                    gate = torch.sigmoid(ctx)
                    for t in range(T):
                        torch.testing.assert_close(out[n * T + t, co, i, j], x[n * T + t, co, i, j] * gate)


def test_ecal_g_matches_reference():
    torch.manual_seed(0)
    cal = ECalG(C, T).eval()
    randomise_bn(cal.bn)
    with torch.no_grad():
        cal.linear.weight.normal_()  # the 0.001 init would make the gate nearly constant
    x = torch.randn(N * T, C, H, W)
    out = cal(x)
    for n in range(N):
        g = torch.stack([x[n * T + t] for t in range(T)]).mean((0, 2, 3))  # (C,)
        for co in range(C):
            ctx = sum(cal.linear.weight[co, ci] * g[ci] for ci in range(C))
            gate = torch.sigmoid(bn_ref(ctx, cal.bn, co))
            for t in range(T):
                torch.testing.assert_close(out[n * T + t, co], x[n * T + t, co] * gate)


@pytest.mark.parametrize("cls", [ECalL, ECalT, ECalS, ECalG])
def test_calibrator_keeps_channels_last_and_init(cls):
    cal = cls(4, T).train()
    x = torch.randn(N * T, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    out = cal(x)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    for m in cal.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            assert m.weight.eq(1).all() and m.bias.eq(0).all()
    if cls is ECalG:
        assert cal.linear.weight.std().item() < 0.01


# --- construction details mutation testing found unpinned ---------------------------------------------------


def test_the_shift_divides_by_8_unless_told():
    x = torch.randn(2 * T, 16, 2, 2)
    torch.testing.assert_close(temporal_shift(x, T), temporal_shift(x, T, shift_div=8))
    assert not torch.equal(temporal_shift(x, T), temporal_shift(x, T, shift_div=4))
    assert TemporalShift(T).shift_div == 8
    torch.testing.assert_close(TemporalShift(T, 4)(x), temporal_shift(x, T, shift_div=4))


@pytest.mark.parametrize("cls", [ECalL, ECalT, ECalS, ECalG])
def test_calibrators_name_their_width_and_drop_norms_when_asked(cls):
    assert "channels=6, num_segments=4" in repr(cls(6, 4))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cls(6, 4, norm=False).modules())


def test_ecal_g_linear_starts_near_zero():
    torch.manual_seed(0)
    w = ECalG(64, 4).linear.weight
    assert abs(w.mean().item()) < 1e-4 and w.std().item() == pytest.approx(0.001, rel=0.05)


def test_group_context_without_norms_and_its_limits():
    gc = GroupContext(16, CALIBRATOR_KINDS, 4, 4, T, norm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gc.modules())
    assert GroupContext(4, ("l",), 1, 4, T).split_sizes == [1, 1, 1, 1]  # one-channel groups are fine
    for planes, kinds, channels, groups in [
        (16, ("l",), 0, 4),  # empty groups
        (16, ("l",), 5, 4),  # 20 channels asked of 16
        (16, CALIBRATOR_KINDS, 4, 2),  # 4 calibrators, 2 groups
    ]:
        with pytest.raises(ValueError, match=f"cannot place {len(kinds)} calibrator"):
            GroupContext(planes, kinds, channels, groups, T)
