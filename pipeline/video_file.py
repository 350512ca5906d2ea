"""A video file (or a URL, or a camera) -> model input shaped like the test loader's, without preprocessing.

A frame is first made what a training shard holds (display rotation applied, square pixels, short side scaled
to the shards' short side, as preprocess's ffmpeg command does), then the evaluation's own rules apply: the
views' draws and frame numbers of pipeline.loader (`clip_draws`, `view_frame_indices`), the crop boxes
of `sampling.eval_crop_boxes` and the torch loader's `render_views`. Only the sampled frames are decoded,
with the torch loader's seek decoder (a packet pass counts the frames, each wanted frame is reached from the
keyframe before it), so memory is bounded by the sampled frames, not by the video's length. Streaming decodes
sequentially and keeps only a window of preprocessed frames.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

import shardformat
from pipeline import sampling
from pipeline.loader import LoaderConfig, TestViews, Views, clip_draws, mode_views, view_frame_indices
from pipeline.torch_loader import decode_scanned, render_views, scan_packets

log = logging.getLogger(__name__)


class VideoFileError(RuntimeError):
    """A video that cannot give frames (missing, empty, not a video, undecodable); the message names it."""


# ------------------------------------------------------------------------------------------- opening a source


def camera_device(source: str) -> str | None:
    """A pure integer names a camera: /dev/videoN (V4L2, Linux)."""
    return f"/dev/video{int(source)}" if re.fullmatch(r"\d+", source) else None


def is_url(source: str) -> bool:
    return "://" in source


def open_video(source: str | Path) -> av.container.InputContainer:
    """An input container for a file, a URL or a camera index, or a VideoFileError that says why not in
    words (FFmpeg's own errors are numbers such as [Errno 1094995529])."""
    source = str(source)
    device = camera_device(source)
    path = device or source
    if not is_url(source):
        file = Path(path)
        if not file.exists():
            raise VideoFileError(f"{'camera' if device else 'video'} {path} not found")
        if file.is_dir():
            raise VideoFileError(f"{path} is a directory, not a video file")
        if file.is_file() and file.stat().st_size == 0:
            raise VideoFileError(f"{path} is an empty file (0 bytes), not a video")
    try:
        return av.open(path, format="v4l2" if device else None)
    except av.InvalidDataError:
        raise VideoFileError(
            f"{path} is not a video: FFmpeg recognises no container format in it (damaged, or another kind "
            f"of file)"
        ) from None
    except av.EOFError:
        raise VideoFileError(
            f"cannot open {path}: it ends before its header does (a truncated file)"
        ) from None
    except (av.FFmpegError, OSError) as e:
        raise VideoFileError(f"cannot open {path}: {getattr(e, 'strerror', None) or e}") from None


def video_stream(container: av.container.InputContainer, source: str | Path) -> av.video.stream.VideoStream:
    """The first real video stream (attached cover pictures are not videos), as preprocess chooses it."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = sorted({s.type for s in container.streams})
    what = f"only {', '.join(kinds)}" if kinds else "no streams at all"
    raise VideoFileError(f"{source} has no video stream ({what})")


def decode_error(source, e: Exception) -> VideoFileError:
    return VideoFileError(f"cannot decode {source}: {getattr(e, 'strerror', None) or e}")


# ------------------------------------------------------------------------- frames as the training shards hold


@dataclass(frozen=True)
class ShardGeometry:
    """The size preprocess gave the frames a model was trained on: short side `short_side`, or `size`
    (both None: the source size, as preprocess --short-side 0 keeps it)."""

    short_side: int | None
    size: tuple[int, int] | None = None


class ShardRenderer:
    """Decoded frame -> (H, W, 3) uint8 RGB as a shard frame of the same video decodes: upright, square
    pixels, the shards' size. The size is fixed by the first frame, so every frame of a video matches."""

    def __init__(self, first: av.VideoFrame, sar: Fraction, shards: ShardGeometry):
        # PyAV reports the display matrix counter-clockwise (-90 for a phone video shown turned clockwise)
        self.quarter_turns = round(first.rotation / 90) % 4
        width, height = shardformat.frame_size(
            first.width, first.height, sar, self.quarter_turns * 90, shards.short_side, shards.size
        )
        # scale before turning: the scaler then sees the coded orientation (a quarter turn swaps the sides)
        self.scaled = (height, width) if self.quarter_turns % 2 else (width, height)
        self.reformatter = av.video.reformatter.VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if (frame.width, frame.height) == self.scaled:
            # no resize: the same conversion as the torch loader's, so a shard file itself renders exactly
            rgb = self.reformatter.reformat(frame, format="rgb24").to_ndarray()
        else:
            # bicubic, as preprocess's `scale=W:H:flags=bicubic`, scaling in YUV before the RGB conversion
            rgb = self.reformatter.reformat(
                frame, width=self.scaled[0], height=self.scaled[1], format="rgb24", interpolation="BICUBIC"
            ).to_ndarray()
        return np.ascontiguousarray(np.rot90(rgb, k=self.quarter_turns)) if self.quarter_turns else rgb


class FirstFrameRenderer:
    """A ShardRenderer made from the first frame it is given (the decoder's convert callable)."""

    def __init__(self, stream, shards: ShardGeometry):
        self.sar, self.shards, self.render = sample_aspect_ratio(stream), shards, None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        self.render = self.render or ShardRenderer(frame, self.sar, self.shards)
        return self.render(frame)


def sample_aspect_ratio(stream: av.video.stream.VideoStream) -> Fraction:
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


# ---------------------------------------------------------------------------------------- a file's test views


@dataclass
class FileViews:
    """A video file's views as the test loader gives a shard sample's: x (views, T, S, S, 3) float32
    normalised (views clip-major: clips x crops), and the frame counts."""

    x: torch.Tensor
    frames: int  # frames the file holds (counted from its packets)
    declared: int  # frames its header declares (0: it declares none)

    @property
    def truncated(self) -> bool:
        return 0 < self.frames < self.declared


def read_views(
    video: str | Path,
    d: LoaderConfig,
    shards: ShardGeometry,
    *,
    mode: str = "test",
    views: TestViews | None = None,
) -> FileViews:
    """The views of `video` that a loader in `mode` (test: `views`' clips and crops, None: one centre clip;
    val: one centre clip) gives the same video after preprocessing to `shards`' geometry. A file holding
    fewer frames than its header declares (cut short) is read from the frames it holds, with a warning that
    gives both counts."""
    views = mode_views(mode, views)
    u = clip_draws(d, mode, None, views)
    with open_video(video) as container:
        stream = video_stream(container, video)
        declared = int(stream.frames or 0)
        try:
            count, rgb = sampled_frames(container, stream, d, u, shards)
        except (av.FFmpegError, OSError) as e:
            raise decode_error(video, e) from None
    if rgb is None:
        raise VideoFileError(f"{video} has no video frames")
    if 0 < count < declared:
        log.warning(
            "%s: %d frames read of the %d its header declares: the file is truncated; it is classified "
            "from the %d frames it holds",
            video,
            count,
            declared,
            count,
        )
    h, w = rgb.shape[1:3]
    boxes, flips, size = sampling.eval_crop_boxes(
        w, h, scale_size=d.scale_size, crop_size=d.crop_size, num_crops=views.num_crops
    )
    x = render_views(rgb, Views(u, boxes, flips, size), d.clip_length)
    return FileViews(x, count, declared)


def sampled_frames(
    container, stream, d: LoaderConfig, u: np.ndarray, shards: ShardGeometry
) -> tuple[int, np.ndarray | None]:
    """(frames in the stream, (views' frames, H, W, 3) uint8 shard-like frames that draws `u` pick, or None
    for a stream without frames)."""
    scan = scan_packets(container, stream)
    got = _decode_indices(container, stream, scan, d, u, shards)
    if got is None and scan.count:
        # fewer frames decode than packets were demuxed (a damaged file): count by decoding, then sample
        container.seek(0)
        counted = sum(1 for _ in container.decode(stream))
        scan = dataclasses.replace(scan, count=counted, pts=[], key_pts=[])
        got = _decode_indices(container, stream, scan, d, u, shards)
    return scan.count, got


def _decode_indices(container, stream, scan, d: LoaderConfig, u, shards) -> np.ndarray | None:
    if scan.count == 0:
        return None
    placeholder = Views(u, np.zeros((0, 4), int), np.zeros(0, bool), 0)  # frame numbers need only u
    idx = view_frame_indices(d, scan.count, placeholder).ravel()
    wanted = sorted(set(idx.tolist()))
    got = decode_scanned(container, stream, wanted, scan, FirstFrameRenderer(stream, shards))
    if len(got) < len(wanted):
        return None
    return np.stack([got[i] for i in idx.tolist()])


# ------------------------------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class Hop:
    """Time between predictions: `value` frames, or seconds when `seconds`."""

    value: float
    seconds: bool

    def due(self, last: tuple[int, float] | None, number: int, t: float) -> bool:
        if last is None:
            return True
        # a small slack so a 0.1 s hop at 10 fps does not slip a frame on float rounding of timestamps
        return t - last[1] >= self.value - 1e-6 if self.seconds else number - last[0] >= self.value


class FramePreprocessor:
    """One decoded frame -> (S, S, 3) float32 model input: the val centre crop, resized and normalised, as
    read_views renders each frame of a one-view clip."""

    def __init__(self, render: ShardRenderer, d: LoaderConfig):
        self.render, self.d = render, d
        self.views: Views | None = None  # the centre crop of the first frame's shard size

    def __call__(self, frame: av.VideoFrame) -> torch.Tensor:
        rgb = self.render(frame)
        if self.views is None:
            h, w = rgb.shape[:2]
            boxes, flips, size = sampling.eval_crop_boxes(
                w, h, scale_size=self.d.scale_size, crop_size=self.d.crop_size, num_crops=1
            )
            self.views = Views(np.zeros((1, 1), np.float32), boxes, flips, size)
        return render_views(rgb[None], self.views, 1)[0, 0]


def frame_time(frame: av.VideoFrame, number: int, rate: float) -> float:
    return float(frame.time) if frame.time is not None else number / rate


def stream_rate(stream) -> float:
    return float(stream.average_rate or stream.guessed_rate or 25)


def preprocessed_frames(
    container, stream, d: LoaderConfig, shards: ShardGeometry, keep, counts: dict | None = None
) -> Iterator[tuple[int, float, torch.Tensor]]:
    """(frame number, seconds from the first frame, preprocessed frame) for each decoded frame whose number
    `keep(number)` accepts, in decoding order (the others are decoded but not rendered); counts["decoded"]
    is kept at the number of frames decoded so far."""
    rate = stream_rate(stream)
    render, start, counts = None, 0.0, {} if counts is None else counts
    for number, frame in enumerate(container.decode(stream)):
        counts["decoded"] = number + 1
        if not keep(number):
            continue
        if render is None:
            render = FramePreprocessor(ShardRenderer(frame, sample_aspect_ratio(stream), shards), d)
            start = frame_time(frame, number, rate)  # a camera's clock does not start at 0
        yield number, frame_time(frame, number, rate) - start, render(frame)


def sliding_windows(
    container,
    stream,
    d: LoaderConfig,
    shards: ShardGeometry,
    stride: int,
    hop: Hop,
    counts: dict | None = None,
) -> Iterator[tuple[int, float, torch.Tensor]]:
    """(frame number, seconds, window (T * frames_per_segment, S, S, 3)) every `hop`: the window's T segments
    start `stride` frames apart, each the frames_per_segment consecutive frames from its start (TDN: 5), as
    the clips of training; only the frames a window uses are rendered, and only one window's are kept."""
    per_segment, segments = d.frames_per_segment, d.num_segments
    span = (segments - 1) * stride + per_segment  # source frames from the first segment's start to the end
    kept: dict[int, torch.Tensor] = {}
    last, number = None, -1  # last: (number, t) of the last window given

    def used(n: int) -> bool:  # the frames some window uses
        return n % stride < per_segment

    for number, t, x in preprocessed_frames(container, stream, d, shards, used, counts):
        kept[number] = x
        for old in [k for k in kept if k <= number - span]:
            del kept[old]
        first = number - span + 1  # the first segment's start when this frame ends the last segment
        if first < 0 or (number - per_segment + 1) % stride or not hop.due(last, number, t):
            continue
        last = (number, t)
        starts = range(first, number + 1 - per_segment + 1, stride)
        yield number, t, torch.stack([kept[s + j] for s in starts for j in range(per_segment)])
    if last is None:
        frames = (
            f"{segments} frames {stride} apart"
            if per_segment == 1
            else (f"{segments} segments of {per_segment} frames {stride} apart")
        )
        raise VideoFileError(
            f"it ended after {number + 1} frames, before a window of {frames} was full: use a smaller "
            f"--stride, or predict without --stream"
        )
