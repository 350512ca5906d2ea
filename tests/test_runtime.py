"""runtime.py: channels_last / compile / DDP / SyncBN set-up and the precision helpers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import runtime
from models import build_model


def test_setup_model_channels_last():
    torch.manual_seed(0)
    model = build_model("gc_tsm_mini", 4, num_segments=2).eval()
    x = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    model = runtime.setup_model(model, device="cpu", channels_last=True)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.backbone.layer1[0].gc.ecal_l.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert model.backbone.layer1[0].gc.ecal_t.conv.weight.is_contiguous()  # 3-D weights untouched
    features = []
    model.backbone.layer3.register_forward_hook(lambda m, i, out: features.append(out))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    assert features[0].is_contiguous(memory_format=torch.channels_last)


def test_setup_model_compile_and_unwrap():
    plain = build_model("tsm_mini", 4)
    compiled = runtime.setup_model(plain, device="cpu", channels_last=False, compile=True)
    assert compiled is not plain and runtime.unwrap_model(compiled) is plain
    assert runtime.unwrap_model(plain) is plain


def test_setup_model_ddp(tmp_path):
    with pytest.raises(ValueError, match="sync_bn=True needs ddp=True"):
        runtime.setup_model(build_model("tsm_mini", 4), device="cpu", sync_bn=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        runtime.setup_model(build_model("tsm_mini", 4), device="cpu", ddp=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="sync_bn=True needs CUDA"):
            runtime.setup_model(build_model("tsm_mini", 4), device="cpu", ddp=True, sync_bn=True)
        plain = build_model("gc_tsm_mini", 4, num_segments=2)
        model = runtime.setup_model(plain, device="cpu", ddp=True)
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        assert runtime.unwrap_model(model) is plain
        model(torch.randn(2, 2, 3, 32, 32)).sum().backward()
        assert plain.fc.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_ddp_channels_last_gradients_match_their_parameters(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = build_model("gc_tsm_mini", 4, num_segments=2)
        model = runtime.setup_model(plain, device="cpu", channels_last=True, ddp=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(torch.randn(2, 2, 3, 32, 32)).sum().backward()
        assert not [w for w in caught if "Grad strides do not match" in str(w.message)]
        differ = [
            n for n, p in plain.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()
        ]
        assert not differ, differ[:5]
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_setup_model_sync_bn_on_gpu(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = runtime.setup_model(
            build_model("gc_tsm_mini", 4, num_segments=2), device="cuda", ddp=True, sync_bn=True
        )
        inner = runtime.unwrap_model(model)
        assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in inner.modules())
        with runtime.autocast("bf16", "cuda"):
            model(torch.randn(2, 2, 3, 32, 32, device="cuda")).float().sum().backward()
        assert inner.backbone.conv1.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_autocast_and_grad_scaler():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with runtime.autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with runtime.autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.autocast("fp8", "cpu")
    assert runtime.grad_scaler("bf16", "cpu") is None and runtime.grad_scaler("fp32", "cpu") is None
    assert isinstance(runtime.grad_scaler("fp16", "cpu"), torch.amp.GradScaler)
    with pytest.raises(ValueError, match="precision"):
        runtime.grad_scaler("half", "cpu")
