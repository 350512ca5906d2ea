"""The GPU path (marked `gpu`, skipped without CUDA): NVDEC decoding, the DALI GPU loader, compiled bf16
models and a short training run on CUDA. The GPU suite (benchmark/gpu) runs these on the GPU host, where
there is no ffmpeg: GCVIDEO_GPU_SHARDS then names the kit's prebuilt H.264 shards; elsewhere they are built
with the preprocess CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import VIDEOS, run_preprocess, tiny_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
KINETICS = sorted(p.name for p in (VIDEOS / "kinetics").glob("*.m[pk][4v]"))


@pytest.fixture(scope="module")
def h264_index(tmp_path_factory) -> Path:
    """H.264 shards (GOP 4) of the Kinetics clips with train and val splits."""
    kit = os.environ.get("GCVIDEO_GPU_SHARDS")
    if kit:
        return Path(kit) / "h264-g4" / "index_kit.json"
    out = tmp_path_factory.mktemp("h264")
    lst = out / "clips.csv"
    lst.write_text("path,label\n" + "".join(f"kinetics/{k},{k.split('_')[0]}\n" for k in KINETICS))
    run_preprocess(
        "list", "--root", str(VIDEOS), "--out", str(out / "shards"), "--name", "t", "--codec", "h264",
        "--gop", "4", "--short-side", "64", "--split", f"train={lst}", "--split", f"val={lst}",
    )  # fmt: skip
    return out / "shards" / "index.json"


def _cfg(index: Path, **kw):
    from pipeline import LoaderConfig

    base = dict(index=str(index), crop_size=56, scale_size=64, num_segments=4, batch_size=4, workers=2)
    return LoaderConfig(**{**base, **kw})


def test_nvdec_returns_the_frames_asked_for(h264_index):
    from benchmark.gpu.decode import compare_shards

    rows = compare_shards(h264_index, gpu=True)
    assert len(rows) == len(KINETICS)
    assert all(r["frame_exact"] for r in rows), rows
    assert max(r["mean_abs_diff"] for r in rows) < 3.0  # colour conversion only


def test_dali_gpu_decodes_h264_like_the_fallback(h264_index):
    from pipeline import build_loader

    outs = {}
    for backend in ("dali-gpu", "torch"):
        loader = build_loader(_cfg(h264_index, backend=backend), "val", "val", device=torch.device("cuda"))
        outs[backend] = list(loader)
    (xg, yg), (xt, yt) = outs["dali-gpu"][0], outs["torch"][0]
    assert xg.is_cuda and xg.shape == xt.shape == (4, 4, 3, 56, 56) and torch.equal(yg.cpu(), yt.cpu())
    assert (xg.float() - xt.float().to(xg.device)).abs().mean() < 0.05


def test_compiled_bf16_channels_last_matches_eager_fp32():
    import runtime
    from models import build_model

    torch.manual_seed(0)
    model = build_model("gc_tsm_mini", 8, num_segments=4).cuda().eval()
    x = torch.randn(2, 4, 3, 56, 56, device="cuda")
    with torch.no_grad():
        want = model(x).float()
        fast = runtime.setup_model(model, device="cuda", channels_last=True, compile=True)
        with runtime.autocast("bf16", "cuda"):
            got = fast(x).float()
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.05 * want.abs().max() + 1e-3


def test_training_on_cuda_with_the_dali_gpu_loader(h264_index, tmp_path):
    import config
    import train

    args = tiny_args(h264_index, tmp_path / "run", 4)
    args[args.index("--data.backend") + 1] = "dali-gpu"
    args[args.index("--run.device") + 1] = "cuda"
    args += ["--optim.epochs", "2", "--run.precision", "bf16", "--model.compile", "false"]
    summary = train.train(config.parse_train_args(args))
    assert summary["step"] > 0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
