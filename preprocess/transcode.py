"""One Job -> one Sample (transcoded, validated by decoding every frame) or one Failure with its reason."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from preprocess.ffmpeg_args import EncodeSettings, frames_args, output_size, transcode_args
from preprocess.jobs import Failure, Job, Sample
from preprocess.probe import ProbeError, VideoStream, probe

TIMEOUT_S = 600.0  # per ffmpeg run; a 10 s clip takes well under a second, a full-length film minutes


NO_FRAMES = "no frames (an empty stream, or a trim window past the end of the source)"


class ValidationError(Exception):
    pass


@dataclass(frozen=True)
class DecodedInfo:
    num_frames: int
    width: int
    height: int
    fps: float
    duration: float


def inspect_video(data: bytes, threads: int = 1) -> DecodedInfo:
    """Decode every frame of an encoded output once: proves it decodes and counts its frames exactly."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValidationError(NO_FRAMES)
            if len(container.streams.video) != 1 or len(container.streams) != 1:
                raise ValidationError(f"expected exactly one stream, found {len(container.streams)}")
            stream = container.streams.video[0]
            # As many threads as the transcode had (EncodeSettings.threads: 1 where the pool fills every core;
            # more where one process has the machine, e.g. a single video, for the wall time).
            stream.codec_context.thread_count = threads
            stream.codec_context.thread_type = "AUTO" if threads > 1 else "NONE"
            # The deblocking filter only smooths pixels this check throws away: skipping it still parses the
            # bitstream and reconstructs every frame (a broken stream still fails, the count stays exact).
            stream.codec_context.options = {"skip_loop_filter": "all"}
            num_frames, last_pts, first_pts = 0, None, None
            for frame in container.decode(stream):
                if frame.format.name not in ("yuv420p", "yuvj420p"):
                    raise ValidationError(f"decoded pixel format {frame.format.name}, expected yuv420p")
                num_frames += 1
                if frame.pts is not None:
                    first_pts = frame.pts if first_pts is None else min(first_pts, frame.pts)
                    last_pts = frame.pts if last_pts is None else max(last_pts, frame.pts)
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.base_rate
            duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
    except av.FFmpegError as err:
        raise ValidationError(f"output does not decode: {err}") from err
    if num_frames == 0:
        raise ValidationError(NO_FRAMES)
    fps = float(rate) if rate else (num_frames / duration if duration else 0.0)
    if not duration and fps:
        duration = num_frames / fps
    return DecodedInfo(
        num_frames=num_frames, width=width, height=height, fps=round(fps, 6), duration=round(duration, 6)
    )


def sample_info(job: Job, decoded: DecodedInfo) -> dict:
    # Frame windows are recorded only where used, so every other sample keeps its bytes.
    frames = {} if job.end_frame is None else {"source_frames": [job.start_frame, job.end_frame]}
    return {
        "label": job.label,
        "label_name": job.label_name,
        "num_frames": decoded.num_frames,
        "fps": decoded.fps,
        "width": decoded.width,
        "height": decoded.height,
        "duration": decoded.duration,
        "source": job.source,
        "source_start": job.start,
        "source_end": job.end,
        **frames,
    }


def run_ffmpeg(args: list[str], dst: str) -> bytes:
    try:
        proc = subprocess.run(args, capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        stderr = (err.stderr or b"").decode(errors="replace")
        raise ProbeError(f"ffmpeg timed out after {TIMEOUT_S:.0f} s", stderr) from err
    if proc.returncode != 0:
        raise ProbeError(
            f"transcode failed (ffmpeg exit status {proc.returncode}): corrupt or unsupported stream",
            proc.stderr.decode(errors="replace"),
        )
    data = Path(dst).read_bytes()
    if not data:
        raise ProbeError("ffmpeg wrote an empty file", proc.stderr.decode(errors="replace"))
    return data


_FRAME_NAME = re.compile(r"^(.*?)(\d+)\.(jpe?g|JPE?G)$")


def frame_pattern(folder: Path) -> tuple[str, int, int]:
    """(printf pattern, first number, frame count) of a folder of numbered JPEGs (img_00001.jpg...)."""
    names = sorted(p.name for p in folder.iterdir() if _FRAME_NAME.match(p.name))
    if not names:
        raise ProbeError("no numbered JPEG frames in the folder (expected e.g. 00001.jpg or img_00001.jpg)")
    prefix, digits, ext = _FRAME_NAME.match(names[0]).groups()  # type: ignore[union-attr]
    first = int(digits)
    numbers = sorted(int(m.group(2)) for n in names if (m := _FRAME_NAME.match(n)) and m.group(1) == prefix)
    if numbers != list(range(first, first + len(numbers))):
        missing = sorted(set(range(first, numbers[-1] + 1)) - set(numbers))[:5]
        raise ProbeError(f"frame numbers are not contiguous (missing e.g. {missing})")
    width_digits = len(digits) if digits.startswith("0") else 0
    number = f"%0{width_digits}d" if width_digits else "%d"
    return str(folder / f"{prefix}{number}.{ext}"), first, len(numbers)


# A source whose decoded frames cover less than this share of what its video stream declares (less two
# frames) ended early: a truncated download (ffmpeg says "partial file" and exits 0; -xerror does not catch
# demuxer errors).
TRUNCATION_TOLERANCE = 0.1


def declared_seconds(stream: VideoStream, job: Job) -> float | None:
    """Seconds of video the output should hold by the source's own declarations, within the trim window."""
    fps = stream.fps
    total = stream.declared_duration or (
        stream.declared_frames / fps if stream.declared_frames and fps else None
    )
    if total is None:
        return None
    if job.end_frame is not None:
        return (min(job.end_frame, total * fps) - (job.start_frame or 0)) / fps if fps else None
    return min(job.end if job.end is not None else total, total) - (job.start or 0.0)


TRUNCATED = "truncated: the video ends before the length its stream declares (a partial download?)"


def truncation(expected: float | None, decoded: DecodedInfo) -> str | None:
    """How far the decoded video falls short of the declared length (None: it does not)."""
    if not expected or not decoded.fps:
        return None
    got = decoded.num_frames / decoded.fps
    if got >= expected * (1 - TRUNCATION_TOLERANCE) - 2 / decoded.fps:
        return None
    return f"{decoded.num_frames} frames ({got:.2f} s) decoded of the {expected:.2f} s declared"


def _encode_frames(job: Job, settings: EncodeSettings, dst: str) -> tuple[bytes, float, None]:
    folder = Path(job.source)
    if not folder.is_dir():
        raise ProbeError("frame folder not found")
    pattern, first, count = frame_pattern(folder)
    try:
        from PIL import Image

        with Image.open(pattern % first) as img:
            width, height = img.size
    except OSError as err:
        raise ProbeError(f"first frame is not a readable image: {err}") from err
    rate = job.frame_rate or 12.0
    size = output_size(width, height, Fraction(1), 0, settings)
    args = frames_args(pattern, dst, start_number=first, frame_rate=rate, size=size, settings=settings)
    return run_ffmpeg(args, dst), count / rate, None


def _encode_video(job: Job, settings: EncodeSettings, dst: str) -> tuple[bytes, float, float | None]:
    if not os.path.exists(job.source):
        raise ProbeError("file not found")
    if not os.access(job.source, os.R_OK) or os.path.isdir(job.source):
        raise ProbeError("not a readable file")
    stream = probe(job.source)
    size = output_size(stream.width, stream.height, stream.sar, stream.rotation, settings)
    frames = None if job.end_frame is None else (job.start_frame or 0, job.end_frame)
    args = transcode_args(
        job.source,
        dst,
        stream_index=stream.index,
        size=size,
        settings=settings,
        start=job.start,
        end=job.end,
        frames=frames,
    )
    data = run_ffmpeg(args, dst)
    if frames and stream.fps:
        seconds = (frames[1] - frames[0]) / stream.fps
    elif job.end is not None:
        seconds = job.end - (job.start or 0.0)
    else:
        seconds = stream.duration or 0.0
    return data, seconds, declared_seconds(stream, job)


def process(job: Job, settings: EncodeSettings) -> Sample | Failure:
    """Never raises: whatever goes wrong becomes a Failure naming the file and why."""
    try:
        with tempfile.TemporaryDirectory(prefix="gcvideo-") as tmp:
            dst = os.path.join(tmp, "out.mp4")
            encode = _encode_frames if job.kind == "frames" else _encode_video
            data, seconds, expected = encode(job, settings, dst)
        decoded = inspect_video(data, settings.threads)
        short = truncation(expected, decoded)
        if short and not settings.keep_truncated:
            raise ProbeError(TRUNCATED, short)
    except ProbeError as err:
        return Failure(job.source, err.reason, err.detail, key=job.key, split=job.split)
    except ValidationError as err:
        return Failure(job.source, str(err), key=job.key, split=job.split)
    except Exception as err:  # noqa: BLE001 - a bug must not lose the row either
        return Failure(
            job.source, f"internal error: {type(err).__name__}: {err}", key=job.key, split=job.split
        )
    return Sample(
        job.key,
        data,
        sample_info(job, decoded),
        source_seconds=seconds,
        warning=f"{TRUNCATED}: kept (--keep-truncated), {short}" if short else "",
    )
