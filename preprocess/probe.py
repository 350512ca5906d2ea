"""What a source file holds: which stream to take, its size, pixel aspect, rotation and declared length.

Read in-process with PyAV (a header read and one decoded frame, ~5 ms of CPU) rather than by an ffprobe
process per video (~85 ms, most of it the process start-up and the loading of ffmpeg's libraries): both are
turned into ffprobe's JSON shape and parsed by `parse_probe`, so a stream means the same either way. A file
PyAV cannot open or decode goes to ffprobe, whose verdict (and message) stands.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from preprocess.ffmpeg_args import file_url, probe_args


class ProbeError(Exception):
    """The source cannot be used; the message is the failure reason, `detail` the tool's own words."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class VideoStream:
    index: int  # absolute stream index in the file (what `-map 0:<index>` takes)
    codec: str
    width: int  # coded size, before rotation and pixel aspect
    height: int
    sar: Fraction  # sample (pixel) aspect ratio
    rotation: int  # display rotation in degrees, one of 0, 90, 180, 270
    fps: float | None  # average frame rate, when known
    duration: float | None  # seconds, when known
    pix_fmt: str
    # what the video stream itself declares (a truncated download keeps them: its frames are then fewer)
    declared_frames: int | None = None
    declared_duration: float | None = None


def _fraction(text: str | None, default: Fraction | None) -> Fraction | None:
    try:
        num, den = (int(x) for x in str(text).split("/" if "/" in str(text) else ":"))
        return Fraction(num, den) if num > 0 and den > 0 else default
    except (ValueError, TypeError):
        return default


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _rotation(stream: dict[str, Any]) -> int:
    for side_data in stream.get("side_data_list", []):
        if "rotation" in side_data:
            return int(round(-float(side_data["rotation"]))) % 360  # ffprobe reports it counter-clockwise
    return int(stream.get("tags", {}).get("rotate", 0)) % 360


def parse_probe(info: dict[str, Any]) -> VideoStream:
    """The first real video stream (cover art and other attached pictures are not videos)."""
    for stream in info.get("streams", []):
        if stream.get("codec_type") != "video" or stream.get("disposition", {}).get("attached_pic"):
            continue
        width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
        if width <= 0 or height <= 0:
            raise ProbeError(f"video stream {stream['index']} has no size ({width}x{height})")
        rate = _fraction(stream.get("avg_frame_rate"), None) or _fraction(stream.get("r_frame_rate"), None)
        duration = _float(stream.get("duration")) or _float(info.get("format", {}).get("duration"))
        return VideoStream(
            index=int(stream["index"]),
            codec=stream.get("codec_name", "?"),
            width=width,
            height=height,
            sar=_fraction(stream.get("sample_aspect_ratio"), Fraction(1)),
            rotation=_rotation(stream),
            fps=float(rate) if rate else None,
            duration=duration,
            pix_fmt=stream.get("pix_fmt", "?"),
            declared_frames=int(stream["nb_frames"]) if str(stream.get("nb_frames", "")).isdigit() else None,
            declared_duration=_float(stream.get("duration")),
        )
    kinds = sorted({s.get("codec_type", "?") for s in info.get("streams", [])})
    raise ProbeError("no video stream" + (f" (only {', '.join(kinds)})" if kinds else " (no streams at all)"))


def _ratio(value: Fraction | None) -> str:
    return f"{value.numerator}/{value.denominator}" if value else "0/0"


def av_stream_info(stream: av.stream.Stream, rotation: float | None = None) -> dict[str, Any]:
    """One stream as ffprobe's -show_streams prints it (the fields parse_probe reads)."""
    info: dict[str, Any] = {
        "index": stream.index,
        "codec_type": stream.type,
        "disposition": {"attached_pic": int(bool(stream.disposition & av.stream.Disposition.attached_pic))},
    }
    if stream.type != "video":
        return info
    ctx = stream.codec_context
    sar = stream.sample_aspect_ratio
    info.update(
        codec_name=ctx.codec.canonical_name,
        width=ctx.width,
        height=ctx.height,
        pix_fmt=ctx.format.name if ctx.format else "?",
        avg_frame_rate=_ratio(stream.average_rate),
        r_frame_rate=_ratio(stream.base_rate),
        sample_aspect_ratio=f"{sar.numerator}:{sar.denominator}" if sar else "1:1",
    )
    if stream.duration and stream.time_base:
        info["duration"] = f"{float(stream.duration * stream.time_base):.6f}"
    if stream.frames:
        info["nb_frames"] = str(stream.frames)
    if rotation:
        info["side_data_list"] = [{"rotation": rotation}]  # counter-clockwise, as ffprobe reports it
    return info


def _is_video(stream: av.stream.Stream) -> bool:
    return stream.type == "video" and not stream.disposition & av.stream.Disposition.attached_pic


def probe_in_process(path: str) -> VideoStream | None:
    """The file's video stream read with PyAV; None when PyAV cannot open it or decode its first frame (the
    frame carries the display rotation), so that ffprobe decides."""
    try:
        with av.open(file_url(path)) as container:
            streams = list(container.streams)
            video = next((s for s in streams if _is_video(s)), None)
            rotation = None
            if video is not None:
                video.codec_context.thread_type = "NONE"
                frame = next(container.decode(video), None)
                if frame is None:
                    return None
                rotation = frame.rotation
            info = {
                "streams": [av_stream_info(s, rotation if s is video else None) for s in streams],
                "format": {"duration": f"{container.duration / av.time_base:.6f}"}
                if container.duration
                else {},
            }
    except (av.FFmpegError, OSError, ValueError):
        return None
    return parse_probe(info)


def probe(path: str, timeout_s: float = 60.0) -> VideoStream:
    """In-process where PyAV reads the file, else by ffprobe (whose errors name what is wrong)."""
    return probe_in_process(path) or ffprobe(path, timeout_s)


def ffprobe(path: str, timeout_s: float = 60.0) -> VideoStream:
    try:
        proc = subprocess.run(probe_args(path), capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise ProbeError(f"ffprobe timed out after {timeout_s:.0f} s") from err
    stderr = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise ProbeError("unreadable: ffprobe cannot open it", stderr)
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise ProbeError("unreadable: ffprobe printed no valid JSON", stderr) from err
    return parse_probe(info)
