"""Read what ffprobe says about a source file: which stream to take, its size, pixel aspect and rotation."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from preprocess.ffmpeg_args import probe_args


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


def probe(path: str, timeout_s: float = 60.0) -> VideoStream:
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
