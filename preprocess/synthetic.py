"""The embedded demo dataset: 8 classes in 4 pairs that differ only in temporal order.

Pairs: moving right / left, down / up, rotating clockwise / counter-clockwise, growing / shrinking. A clip of
a pair's second class is the exact time-reversal of a clip drawn from the first class's distribution, so the
multiset of frames is identically distributed within a pair: a frame-order-blind model (TSN) can at best tell
the 4 pairs apart (50% top-1), while a temporal model (TSM, GC) can separate all 8 classes.

Clips are rendered with numpy (random shapes, colours, textured backgrounds, speeds, start positions,
per-frame noise), encoded in-process as MJPEG with PyAV (spawning ffmpeg per 16-frame clip would dominate
the time), and then go through the same validation and shard writer as every other input.
"""

from __future__ import annotations

import argparse
import io
import math

import av
import numpy as np
from PIL import Image
from rich.console import Console

from preprocess.ffmpeg_args import EncodeSettings
from preprocess.jobs import Failure, InputError, Job, Sample
from preprocess.runner import Dataset, ShardJob, run
from preprocess.transcode import ValidationError, inspect_video, sample_info

CLASSES = [
    "moving right",
    "moving left",
    "moving down",
    "moving up",
    "rotating clockwise",
    "rotating counter-clockwise",
    "growing",
    "shrinking",
]
FRAME_RATE = 8  # 16 frames = 2 s
SHAPES = ("circle", "square", "triangle", "bar_knob", "ell")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A static textured background, its contrast lowered so that the object stays visible."""
    texture = _texture(rng, size)
    contrast = rng.uniform(0.3, 0.7)
    return texture * contrast + texture.mean(axis=(0, 1)) * (1 - contrast)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # smooth colour blobs
        cells = rng.integers(2, 7)
        low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.6)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * freq
    pattern = np.sin(phase) if kind == 1 else np.sign(np.sin(xx * freq)) * np.sign(np.sin(yy * freq))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (pattern[..., None] + 1) / 2
    return (c0 * t + c1 * (1 - t)).astype(np.float32)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the object's unit coordinates (u right, v down, radius 1)."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "triangle":
        return (v <= 0.5) & (v >= -1 + 1.5 * abs(u)) & (abs(u) <= 1)
    if shape == "bar_knob":
        return ((abs(v) <= 0.25) & (abs(u) <= 1)) | ((u - 0.75) ** 2 + (v + 0.3) ** 2 <= 0.2)
    return ((abs(u + 0.5) <= 0.3) & (abs(v) <= 1)) | ((abs(v - 0.7) <= 0.3) & (u >= -0.8) & (u <= 0.8))  # ell


def render_forward(pair: int, rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """A clip of the pair's first class (right, down, clockwise, growing): uint8 (T, H, W, 3)."""
    t = np.arange(frames, dtype=np.float32)
    radius = np.full(frames, rng.uniform(0.12, 0.22) * size, dtype=np.float32)
    angle = np.full(frames, rng.uniform(0, 2 * math.pi), dtype=np.float32)
    cx = np.full(frames, rng.uniform(0.3, 0.7) * size, dtype=np.float32)
    cy = np.full(frames, rng.uniform(0.3, 0.7) * size, dtype=np.float32)
    if pair in (0, 1):  # translate right (pair 0) or down (pair 1) across the frame
        travel = rng.uniform(0.35, 0.65) * size
        margin = radius[0] * 0.5
        begin = rng.uniform(margin, size - margin - travel)
        along = begin + travel * t / (frames - 1)
        if pair == 0:
            cx = along
        else:
            cy = along
    elif pair == 2:  # rotate clockwise (image coordinates: y down, so a growing angle turns clockwise)
        angle = angle + rng.uniform(math.radians(8), math.radians(22)) * t
    else:  # grow
        start, grow = rng.uniform(0.06, 0.12) * size, rng.uniform(1.8, 3.0)
        radius = start * grow ** (t / (frames - 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    cos, sin, r = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None], radius[:, None, None]
    u, v = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r
    shape = SHAPES[rng.integers(1, len(SHAPES))] if pair == 2 else SHAPES[rng.integers(len(SHAPES))]
    mask = _shape_mask(shape, u, v)[..., None]
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    shading = (1 + 0.25 * np.clip(u, -1, 1))[..., None]  # texture that moves and turns with the object
    video = np.where(mask, np.clip(colour * shading, 0, 255), _background(rng, size)[None])
    video += rng.normal(0, rng.uniform(0, 10), video.shape).astype(np.float32)
    return np.clip(video, 0, 255).astype(np.uint8)


def render(label: int, seed: int, frames: int, size: int) -> np.ndarray:
    clip = render_forward(label // 2, np.random.default_rng(seed), frames, size)
    return clip[::-1].copy() if label % 2 else clip


def encode_mjpeg(video_THWC: np.ndarray, quality: int, rate: int = FRAME_RATE) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mjpeg", rate=rate)
        stream.width, stream.height = video_THWC.shape[2], video_THWC.shape[1]
        stream.pix_fmt = "yuvj420p"
        stream.codec_context.qmin = stream.codec_context.qmax = quality  # constant quantiser, like -q:v
        for rgb in video_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def process(job: Job, settings: EncodeSettings) -> Sample | Failure:
    try:
        video = render(job.label, job.seed, job.num_frames or 16, settings.size[0] if settings.size else 64)
        data = encode_mjpeg(video, settings.mjpeg_quality)
        decoded = inspect_video(data)
    except (ValidationError, av.FFmpegError, ValueError) as err:
        return Failure(job.source, f"synthetic clip failed: {err}", key=job.key, split=job.split)
    return Sample(job.key, data, sample_info(job, decoded), source_seconds=decoded.duration)


def synthetic_dataset(per_class: dict[str, int], frames: int, seed: int) -> Dataset:
    jobs = []
    for split_id, (split, count) in enumerate(per_class.items()):
        for label, name in enumerate(CLASSES):
            for i in range(count):
                clip_seed = int(np.random.SeedSequence([seed, split_id, label, i]).generate_state(1)[0])
                jobs.append(
                    Job(
                        key=f"{split}_{label}_{i:05d}",
                        source=f"synthetic:{split}/{label}/{i}",
                        label=label,
                        label_name=name,
                        split=split,
                        kind="synthetic",
                        frame_rate=FRAME_RATE,
                        num_frames=frames,
                        seed=clip_seed,
                    )
                )
    return Dataset(classes=list(CLASSES), splits=list(per_class), jobs=jobs)


def main(args: argparse.Namespace, console: Console) -> dict:
    size = args.frame_size
    if size % 2:
        raise InputError(f"--frame-size must be even (4:2:0 chroma), got {size}")
    settings = EncodeSettings(codec="mjpeg", short_side=None, size=(size, size), mjpeg_quality=args.quality)
    from preprocess.__main__ import engine_fields

    cfg = ShardJob(
        **engine_fields(args, args.out),
        name=args.name,
        settings=settings,
        shard_samples=args.shard_size,
        workers=args.workers,
        seed=args.seed,
        part=args.part,
        progress=not args.no_progress,
    )
    dataset = synthetic_dataset(
        {"train": args.train_per_class, "val": args.val_per_class}, args.frames, args.seed
    )
    return run(dataset, cfg, process, console)
