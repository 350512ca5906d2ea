"""ffmpeg/ffprobe command lines as pure functions (argument lists, never a shell), table-tested."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import ffmpeg

import shardformat

CODECS = ("h264", "mjpeg")


@dataclass(frozen=True)
class EncodeSettings:
    codec: str = "h264"  # h264 | mjpeg (every frame a keyframe)
    short_side: int | None = 256  # resize the short side to this (None: keep the source size)
    size: tuple[int, int] | None = None  # fixed (width, height); overrides short_side
    fps: float | None = None  # constant output frame rate (None: keep every source frame)
    gop: int = 4  # h264 keyframe interval in frames (docs/preprocess.md: why 4)
    crf: int = 23  # h264 quality
    # libx264 speed/size trade-off: superfast is cheaper than veryfast for a few more bytes at the same PSNR
    # (the measured frontier: docs/benchmark.md, "preprocess")
    preset: str = "superfast"
    mjpeg_quality: int = 3  # mjpeg -q:v (2 best .. 31 worst)
    threads: int = 1  # ffmpeg threads per process (the pool already uses every core)
    tolerate_decode_errors: bool = False  # False: a source with decoder errors is a failure (-xerror)
    keep_truncated: bool = False  # True: a source that ends early is kept, with a warning in failures.jsonl

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.short_side is not None and (self.short_side < 2 or self.short_side % 2):
            raise ValueError(f"short side must be an even number >= 2, got {self.short_side}")
        if self.size is not None and any(s < 2 or s % 2 for s in self.size):
            raise ValueError(f"size must be two even numbers >= 2 (WxH), got {self.size}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {self.crf}")
        if not 2 <= self.mjpeg_quality <= 31:
            raise ValueError(f"mjpeg quality must be in 2..31, got {self.mjpeg_quality}")

    @property
    def pix_fmt(self) -> str:
        # The JPEG flavour of 8-bit 4:2:0 (full range) is what the MJPEG encoder takes without -strict.
        return "yuvj420p" if self.codec == "mjpeg" else "yuv420p"


def output_size(
    width: int, height: int, sar: Fraction, rotation: int, settings: EncodeSettings
) -> tuple[int, int]:
    """Output (width, height) in square pixels after rotation: the display size, scaled, made even (the rule
    pipeline/ reproduces for a video file, hence in shardformat)."""
    return shardformat.frame_size(width, height, sar, rotation, settings.short_side, settings.size)


def file_url(path: str) -> str:
    """A local path as ffmpeg must get it: `file:` stops ffprobe from reading `-clip.mp4` as an option and
    ffmpeg from reading `a:b.mp4` as protocol `a` (or `-` as stdin); the file protocol opens the rest."""
    return f"file:{path}"


def probe_args(path: str) -> list[str]:
    return ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", file_url(path)]


def count_frames_args(path: str) -> list[str]:
    """ffprobe's exact decoded-frame count of the first video stream (used by tests as the reference)."""
    return [
        "ffprobe",
        "-v",
        "error",
        "-count_frames",
        "-select_streams",
        "v:0",
        "-show_entries",
        "stream=nb_read_frames",
        "-of",
        "csv=p=0",
        file_url(path),
    ]


def _encode(stream: ffmpeg.nodes.FilterableStream, dst: str, settings: EncodeSettings) -> list[str]:
    if settings.codec == "h264":
        codec_opts = {
            "vcodec": "libx264",
            "preset": settings.preset,
            "crf": settings.crf,
            "g": settings.gop,
            "keyint_min": settings.gop,
            "sc_threshold": 0,
            "bf": 0,
        }
    else:
        codec_opts = {"vcodec": "mjpeg", "q:v": settings.mjpeg_quality}
    out = ffmpeg.output(
        stream,
        dst,
        format="mp4",
        pix_fmt=settings.pix_fmt,
        threads=settings.threads,
        map_metadata=-1,
        map_chapters=-1,
        movflags="+faststart",
        fflags="+bitexact",
        **{"fps_mode": "cfr" if settings.fps else "vfr", "flags:v": "+bitexact"},
        **codec_opts,
    )
    # Global options go first: ffmpeg ignores some options that trail the last output file.
    global_args = ["-nostdin", "-hide_banner", "-v", "error", "-y"]
    if not settings.tolerate_decode_errors:
        global_args.append("-xerror")  # a decoder error in the source fails the job instead of concealing it
    return ["ffmpeg", *global_args, *out.compile(cmd="ffmpeg")[1:]]


def _scaled(stream: ffmpeg.nodes.FilterableStream, size: tuple[int, int], settings: EncodeSettings):
    stream = stream.filter("scale", size[0], size[1], flags="bicubic").filter("setsar", 1)
    if settings.fps:
        stream = stream.filter("fps", settings.fps)
    return stream.filter("format", settings.pix_fmt)


def transcode_args(
    src: str,
    dst: str,
    *,
    stream_index: int,
    size: tuple[int, int],
    settings: EncodeSettings,
    start: float | None = None,
    end: float | None = None,
    frames: tuple[int, int] | None = None,
) -> list[str]:
    """Transcode one video stream (absolute index `stream_index`) of `src`, trimmed to [start, end) seconds or
    to the decoded frames [frames[0], frames[1]) (0-based, end excluded) if given.

    Only the chosen stream is mapped, so audio, subtitles, data and other video streams are dropped; ffmpeg's
    autorotate applies the display matrix before `scale`, so `size` must already be the rotated size.
    """
    # The source decoder gets the encoder's thread count: ffmpeg's default (one frame thread per core) spends
    # more CPU per video for nothing where the pool already runs a transcode per core.
    input_opts: dict[str, float] = {"threads": settings.threads}
    if start is not None and start > 0:
        input_opts["ss"] = start
    if end is not None:
        input_opts["t"] = end - (start or 0.0)
    stream = ffmpeg.input(file_url(src), **input_opts)[str(stream_index)]
    if frames is not None:
        stream = trim_frames(stream, *frames)
    return _encode(_scaled(stream, size, settings), dst, settings)


def trim_frames(stream: ffmpeg.nodes.FilterableStream, first: int, end: int) -> ffmpeg.nodes.FilterableStream:
    """Keep the decoded frames first..end-1. Frame numbers, not times: a seek (-ss) lands on a keyframe or a
    rounded timestamp, while `trim` counts every decoded frame, so the count is exact (end - first) even for
    VFR sources; it runs before `fps`, so frame numbers are the source's. setpts restarts the clock at 0."""
    return stream.filter("trim", start_frame=first, end_frame=end).filter("setpts", "PTS-STARTPTS")


def frames_args(
    pattern: str,
    dst: str,
    *,
    start_number: int,
    frame_rate: float,
    size: tuple[int, int],
    settings: EncodeSettings,
) -> list[str]:
    """Encode a numbered JPEG sequence (`pattern` like /dir/img_%05d.jpg) as one video at `frame_rate`."""
    stream = ffmpeg.input(
        file_url(pattern),
        format="image2",
        start_number=start_number,
        framerate=frame_rate,
        threads=settings.threads,
    )
    return _encode(_scaled(stream, size, settings), dst, settings)
