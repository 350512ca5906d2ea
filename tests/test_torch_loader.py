"""The fallback's fast paths against the straightforward code they replace, and the loader benchmark's
frame-folder baseline against the fallback (one real Kinetics clip at short side 64)."""

from __future__ import annotations

import argparse
import io
import json
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import KINETICS, run_preprocess

from benchmark.frame_folders import FrameFolderDataset, extract
from benchmark.loader import gop_list, repeated_index, shard_bytes_per_video
from pipeline import LoaderConfig, sampling, torch_loader
from pipeline.loader import IMAGENET_MEAN, IMAGENET_STD, Views, make_views
from pipeline.shards import ShardDataset
from pipeline.torch_loader import (
    _decode_forward,
    decode_frames,
    decode_runs,
    decoded_frame_count,
    frame_table,
    render_views,
)

CLIP = KINETICS / "arm_wrestling_demo.mp4"  # 280 frames
GOP = 4


@pytest.fixture(scope="module")
def h264_index(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("h264")
    (out / "list.csv").write_text(f"path,label\n{CLIP.name},arm wrestling\n")
    run_preprocess(
        *("list", "--split", f"train={out / 'list.csv'}", "--root", str(KINETICS), "--out", str(out / "ds")),
        *("--codec", "h264", "--gop", str(GOP), "--short-side", "64", "--workers", "1"),
    )
    return out / "ds" / "index.json"


@pytest.mark.parametrize(
    "keyframes, wanted, runs",
    [
        ([0, 4, 8], [1, 2, 6, 7, 9], [(0, 2), (4, 9)]),  # 9 follows 7 through keyframe 8
        ([0, 4, 8], [1, 2, 6, 10], [(0, 2), (4, 6), (8, 10)]),
        ([0, 4, 8], [3, 4], [(0, 4)]),  # 4 follows 3: no frame to skip, the run goes on
        ([0, 4, 8], [2, 5], [(0, 2), (4, 5)]),  # jumping to keyframe 4 skips frame 3
        ([0, 4, 8], [0, 8], [(0, 0), (8, 8)]),
        ([0], [5, 9], [(0, 9)]),  # one GOP: decode through
        (list(range(10)), [1, 5, 6], [(1, 1), (5, 6)]),  # all-intra: only the wanted frames
    ],
)
def test_decode_runs(keyframes, wanted, runs):
    assert decode_runs(keyframes, wanted) == runs


def test_the_sample_table_gives_every_frame_exactly(h264_index):
    s = ShardDataset(h264_index, "train")[0]
    with av.open(io.BytesIO(bytes(s.video))) as c:
        table = frame_table(c.streams.video[0])
        forward = _decode_forward(c, c.streams.video[0], list(range(s.num_frames)))
    assert table is not None and len(table.offsets) == s.num_frames == 280
    assert table.keyframes == list(range(0, s.num_frames, GOP))
    idx = np.array([279, 0, 1, 2, 6, 7, 9, 9, 140, 3, 4, 5])
    assert np.array_equal(decode_frames(s.video, idx), np.stack([forward[i] for i in idx]))
    # runs (0..9) (140..140 from keyframe 140) (279 from keyframe 276)
    assert decoded_frame_count(s.video, idx) == 10 + 1 + 4


def test_a_file_without_a_full_table_decodes_by_timestamps():
    """Matroska indexes keyframes only: no sample table, the demuxing path gives the same frames."""
    video = (KINETICS / "flipping_pancake.mkv").read_bytes()
    with av.open(io.BytesIO(video)) as c:
        assert frame_table(c.streams.video[0]) is None
        forward = _decode_forward(c, c.streams.video[0], list(range(40)))
    idx = np.array([39, 3, 20, 21])
    assert np.array_equal(decode_frames(video, idx), np.stack([forward[i] for i in idx]))
    assert decoded_frame_count(video, idx) is None


def _render_float(frames_FHWC: np.ndarray, views: Views, num_segments: int) -> torch.Tensor:
    """The previous render_views: crop, resize in float32 with antialiasing, flip, normalise."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    frames = torch.from_numpy(frames_FHWC).permute(0, 3, 1, 2)
    crops = []
    for (x0, y0, x1, y1), flip in zip(views.boxes.tolist(), views.flips.tolist()):
        x = F.interpolate(
            frames[:, :, y0:y1, x0:x1].float(), size=(views.out_size,) * 2, mode="bilinear", antialias=True
        )
        crops.append(((x.flip(-1) if flip else x) - mean).div(std).permute(0, 2, 3, 1))
    x = torch.stack(crops)
    x = x.view(x.shape[0], -1, num_segments, *x.shape[2:]).transpose(0, 1)
    return x.reshape(-1, num_segments, *x.shape[3:])


def test_uint8_rendering_is_within_one_level_of_float(h264_index):
    s = ShardDataset(h264_index, "train")[0]
    frames = decode_frames(s.video, np.arange(0, 280, 35))  # 8 frames of 106x64
    boxes = np.array([[0, 0, 64, 64], [3, 5, 45, 61], [42, 0, 106, 64], [10, 1, 66, 64]])
    for out_size in (56, 64, 40):  # down, same size for the first box (no resize), up
        views = Views(np.zeros((2, 4), np.float32), boxes, np.array([0, 1, 0, 1], bool), out_size)
        new, old = render_views(frames, views, 4), _render_float(frames, views, 4)
        assert new.shape == old.shape == (2 * 4, 4, out_size, out_size, 3)
        levels = (new - old) * torch.tensor(IMAGENET_STD) * 255  # difference in 0..255 pixel levels
        assert levels.abs().max() <= 1.0 + 1e-3 and levels.abs().mean() < 0.5


def test_frame_folders_hold_the_shard_frames(h264_index, tmp_path):
    """Frame k of the extracted folder is the shard video's frame k (H.264 crf 23 against JPEG q 2), and the
    frame-folder dataset crops, flips and normalises as the fallback does for the same sample id."""
    folder = extract(CLIP, tmp_path / "frames", label=0, short_side=64)
    s = ShardDataset(h264_index, "train")[0]
    assert (folder.num_frames, folder.width, folder.height) == (s.num_frames, s.width, s.height)
    cfg = LoaderConfig(index=str(h264_index), crop_size=56, scale_size=64, num_segments=8)
    dataset = FrameFolderDataset(cfg, [folder])
    idx = sampling.frame_indices(s.num_frames, make_views(cfg, "train", 0, 0, s).u, sampling="tsn").ravel()
    jpeg = np.stack([np.asarray(im) for im in dataset.frames(0, idx)]).astype(np.int16)
    video = decode_frames(s.video, idx).astype(np.int16)
    later = decode_frames(s.video, np.minimum(idx + 3, s.num_frames - 1)).astype(np.int16)
    same, other = np.abs(jpeg - video).mean(axis=(1, 2, 3)), np.abs(jpeg - later).mean(axis=(1, 2, 3))
    assert np.all(same < 6.0) and same.mean() < other.mean() / 2, (same, other)
    x, label = dataset[0]
    ref = render_views(decode_frames(s.video, idx), make_views(cfg, "train", 0, 0, s), 8)[0]
    assert x.shape == ref.shape == (8, 56, 56, 3) and label == 0
    # no more than the frames differ: the same box, flip and normalisation (a wrong one differs by ~20)
    assert ((x - ref) * torch.tensor(IMAGENET_STD) * 255).abs().mean() < same.mean() + 1.0


def test_repeated_index_lists_the_shards_again(h264_index):
    path = repeated_index(h264_index, 3)
    assert len(ShardDataset(path, "train")) == 3 * len(ShardDataset(h264_index, "train"))
    shards = json.loads(h264_index.read_text())["splits"]["train"]["shards"]
    tar = h264_index.parent / shards[0]["tar"]
    assert shard_bytes_per_video(path) == shard_bytes_per_video(h264_index) == tar.stat().st_size


@pytest.mark.parametrize(
    "text, gops", [("1,4,16", (1, 4, 16)), ("8", (8,)), ("4,x", None), ("0,4", None), ("", None)]
)
def test_gop_list(text, gops):
    if gops is None:
        with pytest.raises(argparse.ArgumentTypeError):
            gop_list(text)
    else:
        assert gop_list(text) == gops


def test_workers_silence_only_the_resource_sharers_shutdown_errors(capsys):
    def fail():
        raise OSError("accept failed")

    previous = threading.excepthook
    threading.excepthook = torch_loader._quiet_fd_server_errors
    try:
        for name in ("Thread-7 (_serve)", "Thread-8 (decode)"):
            thread = threading.Thread(target=fail, name=name)
            thread.start()
            thread.join()
    finally:
        threading.excepthook = previous
    err = capsys.readouterr().err
    assert "Thread-8 (decode)" in err and "OSError: accept failed" in err and "(_serve)" not in err
