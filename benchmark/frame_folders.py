"""The data path video shards replace: TSN-style JPEG frame folders read with PIL in a DataLoader.

Frames are extracted as the TSN/TSM/GC repositories do (one `img_%05d.jpg` per frame, JPEG quality 2, short
side 256), at the size and with the scaler preprocess uses, so a folder's frame k is the shard video's frame
k up to compression. The dataset draws its frame indices, crop box and flip with
`pipeline.loader.make_views`, the function the gcvideo loaders use, then crops, resizes (PIL bilinear,
antialiased like `pipeline.torch_loader.render_views`), flips and normalises as TSM's GroupMultiScaleCrop,
GroupScale and GroupNormalize do.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.quality import scale_filter
from pipeline import LoaderConfig
from pipeline.loader import IMAGENET_MEAN, IMAGENET_STD, make_views, view_frame_indices
from pipeline.torch_loader import render_views
from preprocess.ffmpeg_args import EncodeSettings, file_url, output_size
from preprocess.probe import probe

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
_STD = np.array(IMAGENET_STD, dtype=np.float32) * 255
JPEG_QUALITY = 2  # ffmpeg -q:v, what TSN's extraction scripts use


@dataclass(frozen=True)
class FrameFolder:
    """What the TSN list file holds per video (folder, frame count, label), plus the frame size."""

    key: str
    folder: str
    num_frames: int
    label: int
    width: int
    height: int


def extract_args(src: str, folder: str, size: tuple[int, int]) -> list[str]:
    """ffmpeg argument list (no shell) writing every decoded frame of `src` as folder/img_%05d.jpg."""
    return [
        "ffmpeg",
        *("-nostdin", "-hide_banner", "-v", "error", "-y", "-i", file_url(src)),
        *("-map", "0:v:0", "-vf", scale_filter(size), "-fps_mode", "passthrough", "-q:v", str(JPEG_QUALITY)),
        str(Path(folder) / "img_%05d.jpg"),
    ]


def frame_size(src: str, short_side: int = 256) -> tuple[int, int]:
    """The (width, height) preprocess gives `src` at `short_side`: the frame folders' geometry too."""
    stream = probe(src)
    return output_size(
        stream.width, stream.height, stream.sar, stream.rotation, EncodeSettings(short_side=short_side)
    )


def extract_frames(src: str, folder: Path, size: tuple[int, int]) -> None:
    """Run the extraction of one video into `folder` (created), as the TSN scripts do: one ffmpeg each."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(extract_args(src, str(folder), size), check=True, capture_output=True)


def extract(src: Path, folder: Path, label: int, short_side: int = 256) -> FrameFolder:
    """Extract one video's frames (reused when the folder already holds them)."""
    size = frame_size(str(src), short_side)
    if not any(folder.glob("img_*.jpg")):
        extract_frames(str(src), folder, size)
    return FrameFolder(
        key=src.stem,
        folder=str(folder),
        num_frames=len(list(folder.glob("img_*.jpg"))),
        label=label,
        width=size[0],
        height=size[1],
    )


def folder_bytes(folder: FrameFolder) -> int:
    return sum(p.stat().st_size for p in Path(folder.folder).glob("img_*.jpg"))


class FrameFolderDataset(torch.utils.data.Dataset):
    """Item i = (clip (T, S, S, 3) float32 normalised, label): TSN train sampling of videos[i].

    render="pil": crop, resize and flip each frame with PIL, normalise in float32 (the reference data path;
    its numpy normalise is a little faster than TSM's per-channel GroupNormalize loop). render="gcvideo":
    the same JPEG decode, then gcvideo's own uint8 crop/resize and one normalise
    (pipeline.torch_loader.render_views): what frame folders would cost with the fallback's rendering.
    """

    def __init__(self, cfg: LoaderConfig, videos: list[FrameFolder], render: str = "pil", epoch: int = 0):
        if render not in ("pil", "gcvideo"):
            raise ValueError(f"render must be 'pil' or 'gcvideo', got {render!r}")
        self.cfg, self.videos, self.render, self.epoch = cfg, videos, render, epoch

    def __len__(self) -> int:
        return len(self.videos)

    def frames(self, i: int, indices: np.ndarray) -> list[Image.Image]:
        folder = self.videos[i].folder
        return [Image.open(f"{folder}/img_{int(k) + 1:05d}.jpg").convert("RGB") for k in indices]

    def __getitem__(self, i: int):
        video = self.videos[i]
        views = make_views(self.cfg, "train", self.epoch, i, video)
        idx = view_frame_indices(self.cfg, video.num_frames, views).ravel()
        if self.render == "gcvideo":
            frames = np.stack([np.asarray(im) for im in self.frames(i, idx)])
            return render_views(frames, views, self.cfg.num_segments)[0], video.label
        box, size = tuple(views.boxes[0].tolist()), (views.out_size, views.out_size)
        images = [im.crop(box).resize(size, Image.BILINEAR) for im in self.frames(i, idx)]
        if views.flips[0]:
            images = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
        x = (np.stack([np.asarray(im, dtype=np.float32) for im in images]) - _MEAN) / _STD
        return torch.from_numpy(x), video.label
