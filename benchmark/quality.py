"""Quality beside speed and size: PSNR of what a data path stores against the source frames at its geometry.

The reference is the source's every frame, scaled by ffmpeg to the stored size with the scaler preprocess
and the frame-folder extraction use (bicubic) and converted straight to RGB: the frames a lossless store
would give. The stored frames are decoded as the loaders decode them: shard videos with PyAV and the
loader's RGB conversion (pipeline.torch_loader.rgb24), frame-folder JPEGs with PIL. Both routes subsample
chroma to 4:2:0 at the stored size, so that loss is in both figures; the difference between them is the
compression.

PSNR is over every RGB value of every frame of every video in a row (one pooled mean squared error), in dB
with peak 255; identical frames give PSNR_CAP_DB rather than infinity (a number JSON and the tables keep).
A stored video whose frames differ from the reference in size or count is a GeometryError: the frames
would not be the same frames, and a PSNR between them would mean nothing.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from preprocess.ffmpeg_args import file_url

PEAK = 255.0
PSNR_CAP_DB = 100.0  # what identical frames report (MSE below 255^2 / 10^10)


class GeometryError(ValueError):
    """The stored frames and the reference are not the same frames (size or count differ)."""


def psnr_db(mse: float, peak: float = PEAK) -> float:
    """10 log10(peak^2 / mse), capped at PSNR_CAP_DB (identical frames: mse 0)."""
    if mse < 0:
        raise ValueError(f"mean squared error must be >= 0, got {mse}")
    floor = peak**2 / 10 ** (PSNR_CAP_DB / 10)
    return PSNR_CAP_DB if mse <= floor else 10 * math.log10(peak**2 / mse)


@dataclass
class SquaredError:
    """Pooled squared error over frames (and videos) added one pair at a time."""

    total: float = 0.0
    values: int = 0
    frames: int = 0

    def add(self, reference: np.ndarray, stored: np.ndarray, where: str = "") -> None:
        if reference.shape != stored.shape:
            raise GeometryError(
                f"{where or 'frame'}: stored frame {self.frames} is {_shape(stored)}, the reference "
                f"{_shape(reference)}: compare frames of one geometry (the same size and short side)"
            )
        diff = np.subtract(reference, stored, dtype=np.int16).ravel().astype(np.float32)
        self.total += float(diff @ diff)  # BLAS dot: exact enough, and ~10x faster than int64
        self.values += diff.size
        self.frames += 1

    def add_video(
        self, reference: Iterable[np.ndarray], stored: Iterable[np.ndarray], where: str = ""
    ) -> None:
        """Every frame pair of one video; a different frame count is a GeometryError."""
        ref_count = got_count = 0
        ref_it, got_it = iter(reference), iter(stored)
        while True:
            ref, got = next(ref_it, None), next(got_it, None)
            ref_count += ref is not None
            got_count += got is not None
            if ref is None or got is None:
                break
            self.add(ref, got, where)
        # count the rest, for the message
        ref_count += sum(1 for _ in ref_it)
        got_count += sum(1 for _ in got_it)
        if ref_count != got_count:
            raise GeometryError(
                f"{where or 'video'}: {got_count} stored frames against {ref_count} source frames: "
                f"a stored frame k must be the source's frame k"
            )

    @property
    def mse(self) -> float:
        if not self.values:
            raise ValueError("no frames compared")
        return self.total / self.values

    def psnr(self) -> float:
        return psnr_db(self.mse)


def _shape(frame: np.ndarray) -> str:
    return "x".join(map(str, frame.shape[1::-1])) + (f"x{frame.shape[2]}" if frame.ndim == 3 else "")


def frames_psnr(reference: Iterable[np.ndarray], stored: Iterable[np.ndarray]) -> float:
    """PSNR of one video's stored frames against its reference frames."""
    err = SquaredError()
    err.add_video(reference, stored)
    return err.psnr()


# ----------------------------------------------------------------------------------------------- frames


def scale_filter(size: tuple[int, int]) -> str:
    """The scaler preprocess and the frame-folder extraction use, to (width, height), square pixels."""
    return f"scale={size[0]}:{size[1]}:flags=bicubic,setsar=1"


def reference_args(src: str, size: tuple[int, int]) -> list[str]:
    """ffmpeg argument list (no shell): every decoded frame of `src`'s first video stream, scaled to `size`,
    as raw RGB on stdout."""
    return [
        "ffmpeg",
        *("-nostdin", "-hide_banner", "-v", "error", "-i", file_url(src)),
        *("-map", "0:v:0", "-vf", scale_filter(size) + ",format=rgb24", "-fps_mode", "passthrough"),
        *("-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"),
    ]


def source_frames(src: str, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """The reference frames of `src` at `size`, (H, W, 3) uint8, one at a time."""
    frame_bytes = size[0] * size[1] * 3
    with subprocess.Popen(reference_args(src, size), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(frame_bytes):
            if len(chunk) != frame_bytes:
                raise GeometryError(
                    f"{src}: ffmpeg ended inside a frame ({len(chunk)} of {frame_bytes} bytes)"
                )
            yield np.frombuffer(chunk, np.uint8).reshape(size[1], size[0], 3)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        raise RuntimeError(f"ffmpeg could not decode {src} (exit status {proc.returncode}): {stderr.strip()}")


def video_frames(data: bytes) -> Iterator[np.ndarray]:
    """Every frame of an encoded video, converted to RGB as the torch fallback converts them."""
    from pipeline.torch_loader import rgb24

    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            yield rgb24(frame)


def jpeg_frames(folder: str | Path) -> Iterator[np.ndarray]:
    """A frame folder's img_%05d.jpg in order, decoded by PIL as the frame-folder dataset decodes them."""
    for path in sorted(Path(folder).glob("img_*.jpg")):
        with Image.open(path) as im:
            yield np.asarray(im.convert("RGB"))


def shard_videos(index: str | Path, split: str = "train") -> list[tuple[str, bytes]]:
    """(source path, encoded video) of every sample in a split's shards, in shard order."""
    index = Path(index)
    out = []
    for shard in json.loads(index.read_text())["splits"][split]["shards"]:
        with tarfile.open(index.parent / shard["tar"]) as tar:
            by_key: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                by_key.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for members in by_key.values():
            source = json.loads(members.pop("json"))["source"]
            members.pop("meta", None)
            (video,) = members.values()
            out.append((source, video))
    return out


def videos_psnr(videos: Iterable[tuple[str, bytes]], sizes: dict[str, tuple[int, int]]) -> float:
    """Pooled PSNR of encoded videos (source, bytes) against their sources at `sizes[source]` (the geometry
    the data path should have stored: a video of another size is a GeometryError)."""
    err = SquaredError()
    for src, data in videos:
        err.add_video(source_frames(src, sizes[src]), video_frames(data), where=src)
    return err.psnr()


def folders_psnr(folders: Iterable[tuple[str, str | Path]], sizes: dict[str, tuple[int, int]]) -> float:
    """Pooled PSNR of frame folders (source, folder) against their sources at `sizes[source]`."""
    err = SquaredError()
    for src, folder in folders:
        err.add_video(source_frames(src, sizes[src]), jpeg_frames(folder), where=src)
    return err.psnr()
