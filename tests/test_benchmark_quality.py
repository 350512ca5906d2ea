"""benchmark.quality: PSNR against the source frames (the quality column of the loader and preprocess
benchmarks)."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
from conftest import ROOT

from benchmark import quality
from benchmark.quality import PSNR_CAP_DB, GeometryError, SquaredError, frames_psnr, psnr_db

KINETICS = ROOT.parent / "shared" / "data" / "videos" / "kinetics"


def _frames(n=3, h=16, w=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(32, 224, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_identical_frames_give_the_cap_not_infinity():
    frames = _frames()
    assert frames_psnr(frames, [f.copy() for f in frames]) == PSNR_CAP_DB
    assert psnr_db(0.0) == PSNR_CAP_DB


def test_a_known_noise_gives_its_psnr():
    frames = _frames()
    # +-8 on every value (no clipping: values are 32..223): MSE 64, PSNR 10 log10(255^2 / 64)
    signs = np.where(np.indices(frames[0].shape).sum(axis=0) % 2, 8, -8).astype(np.int16)
    noisy = [(f.astype(np.int16) + signs).astype(np.uint8) for f in frames]
    assert frames_psnr(frames, noisy) == pytest.approx(10 * math.log10(255**2 / 64), abs=1e-6)
    assert frames_psnr(frames, noisy) == pytest.approx(30.07, abs=0.01)


def test_the_error_is_pooled_over_frames_not_averaged_in_db():
    frames = _frames(n=2)
    stored = [frames[0].copy(), (frames[1].astype(np.int16) + 4).astype(np.uint8)]
    err = SquaredError()
    err.add_video(frames, stored)
    assert err.mse == pytest.approx(8.0)  # (0 + 16) / 2
    assert err.frames == 2


def test_a_geometry_mismatch_says_so():
    ref = _frames(n=1, h=16, w=24)
    with pytest.raises(GeometryError, match=r"stored frame 0 is 22x16x3, the reference 24x16x3"):
        frames_psnr(ref, _frames(n=1, h=16, w=22))


def test_a_frame_count_mismatch_says_so():
    with pytest.raises(GeometryError, match="2 stored frames against 3 source frames"):
        frames_psnr(_frames(n=3), _frames(n=2))


def test_negative_mse_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        psnr_db(-1.0)


def test_reference_args_are_an_argument_list_scaling_to_rgb():
    args = quality.reference_args("/v/a:b.mp4", (340, 256))
    assert args[0] == "ffmpeg" and "file:/v/a:b.mp4" in args
    assert args[args.index("-vf") + 1] == "scale=340:256:flags=bicubic,setsar=1,format=rgb24"
    assert args[-1] == "pipe:1" and args[args.index("-pix_fmt") + 1] == "rgb24"


@pytest.mark.skipif(not KINETICS.is_dir(), reason="needs ../shared/data")
def test_a_transcode_is_close_to_its_source_and_a_wrong_size_is_refused(tmp_path):
    src = str(sorted(KINETICS.glob("*.mp4"))[0])
    dst = tmp_path / "out.mp4"
    cmd = ["ffmpeg", "-v", "error", "-i", src, "-vf", quality.scale_filter((128, 96)), "-frames:v", "12"]
    subprocess.run([*cmd, "-c:v", "libx264", "-crf", "18", str(dst)], check=True)
    data = dst.read_bytes()
    reference = list(quality.source_frames(src, (128, 96)))[:12]
    psnr = frames_psnr(reference, quality.video_frames(data))
    assert 30 < psnr < PSNR_CAP_DB
    with pytest.raises(GeometryError, match="the reference 130x96x3"):
        frames_psnr(list(quality.source_frames(src, (130, 96)))[:12], quality.video_frames(data))
