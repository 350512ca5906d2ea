"""Labels for a video: `python train.py predict CKPT VIDEO [--classes FILE] [--top 5]` (one clip for the file)
or `... predict CKPT SOURCE --stream` (top-k over time for a file, a URL or a camera index).

A clip is rendered the way the val loader renders the same video after preprocessing: a frame is first made
what a training shard holds (display rotation applied, square pixels, short side scaled to the shards' short
side, as preprocess's ffmpeg command does), then pipeline.sampling's frame indices and centre crop and the
torch loader's crop, resize and normalisation apply. Only the sampled frames are decoded (a packet pass counts
the frames, then each wanted frame is reached by seeking to the keyframe before it), so memory is bounded by
the sampled frames, not by the video's length. Streaming decodes sequentially and keeps only a window of
preprocessed frames.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import re
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

import checkpoints
import config as C
import models
from pipeline import sampling
from pipeline.loader import LoaderConfig, Views
from pipeline.torch_loader import render_views

log = logging.getLogger(__name__)


class PredictError(RuntimeError):
    """A video, checkpoint, class list or device predict cannot use; the message names it."""


# ------------------------------------------------------------------------------------------- opening a source


def camera_device(source: str) -> str | None:
    """A pure integer names a camera: /dev/videoN (V4L2, Linux)."""
    return f"/dev/video{int(source)}" if re.fullmatch(r"\d+", source) else None


def is_url(source: str) -> bool:
    return "://" in source


def open_video(source: str | Path) -> av.container.InputContainer:
    """An input container for a file, a URL or a camera index, or a PredictError that says why not."""
    source = str(source)
    device = camera_device(source)
    path = device or source
    if not is_url(source) and not Path(path).exists():
        raise PredictError(f"{'camera' if device else 'video'} {path} not found")
    try:
        return av.open(path, format="v4l2" if device else None)
    except (av.FFmpegError, OSError) as e:
        raise PredictError(f"cannot open {path}: {e}") from None


def video_stream(container: av.container.InputContainer, source: str | Path) -> av.video.stream.VideoStream:
    """The first real video stream (attached cover pictures are not videos), as preprocess chooses it."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = sorted({s.type for s in container.streams})
    what = f"only {', '.join(kinds)}" if kinds else "no streams at all"
    raise PredictError(f"{source} has no video stream ({what})")


# ------------------------------------------------------------------------- frames as the training shards hold


def even(x: float) -> int:
    """Nearest even integer >= 2, as preprocess rounds sizes (libx264 with 4:2:0 needs even sizes)."""
    return max(2, 2 * round(x / 2))


def shard_frame_size(
    width: int,
    height: int,
    sar: Fraction,
    rotation: int,
    short_side: int | None,
    size: tuple[int, int] | None,
) -> tuple[int, int]:
    """(width, height) preprocess gives a coded frame: rotated display size in square pixels, scaled, even.

    The same rule as preprocess.ffmpeg_args.output_size (tests check both agree); not imported from there
    because online code does not depend on the offline tools.
    """
    display_w, display_h = width * float(sar), float(height)
    if rotation % 180 == 90:
        display_w, display_h = display_h, display_w
    if size is not None:
        return size
    if short_side is None:
        return even(display_w), even(display_h)
    scale = short_side / min(display_w, display_h)
    return even(display_w * scale), even(display_h * scale)


@dataclass(frozen=True)
class ShardGeometry:
    """The size preprocess gave the frames a model was trained on: short side `short_side`, or `size`."""

    short_side: int | None
    size: tuple[int, int] | None = None

    @classmethod
    def of(cls, cfg: C.Config, short_side: int | None = None) -> ShardGeometry:
        """`short_side` if given, else the dataset's encode settings when its index.json is here, else short
        side --data.scale_size (the size the val crop geometry assumes)."""
        if short_side:
            return cls(short_side)
        try:
            settings = json.loads(Path(cfg.data.index).read_text())["settings"]
            return cls(settings.get("short_side"), tuple(settings["size"]) if settings.get("size") else None)
        except (OSError, ValueError, KeyError, TypeError):
            log.info("%s not readable: frames scaled to short side %d", cfg.data.index, cfg.data.scale_size)
            return cls(cfg.data.scale_size)


class ShardRenderer:
    """Decoded frame -> (H, W, 3) uint8 RGB as a shard frame of the same video decodes: upright, square
    pixels, the shards' size. The size is fixed by the first frame, so every frame of a video matches."""

    def __init__(self, first: av.VideoFrame, sar: Fraction, shards: ShardGeometry):
        # PyAV reports the display matrix counter-clockwise (-90 for a phone video shown turned clockwise)
        self.quarter_turns = round(first.rotation / 90) % 4
        width, height = shard_frame_size(
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


def sample_aspect_ratio(stream: av.video.stream.VideoStream) -> Fraction:
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


# ------------------------------------------------------------------------------------ decoding sampled frames


@dataclass
class FrameTable:
    """Frame numbers (presentation order) of a stream from one packet pass, nothing decoded."""

    count: int
    pts: list[int]  # presentation timestamp of each frame; [] when unusable (missing or repeated)
    keyframes: list[int]  # frame numbers of the keyframes (seek targets), ascending


def frame_table(container: av.container.InputContainer, stream) -> FrameTable:
    packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
    if not packets or any(p is None for p, _ in packets) or len({p for p, _ in packets}) != len(packets):
        return FrameTable(len(packets), [], [])
    pts = sorted(p for p, _ in packets)
    number = {p: i for i, p in enumerate(pts)}
    return FrameTable(len(pts), pts, sorted(number[p] for p, key in packets if key))


SEEK_GAP = 4  # frames: decoding a few frames through is cheaper than a seek and a decoder flush


def frames_at(container, stream, table: FrameTable, wanted: list[int]) -> Iterator[tuple[int, av.VideoFrame]]:
    """(number, frame) for each of the ascending frame numbers `wanted` that decodes, each once: seeks to the
    keyframe before a wanted frame when that skips more than SEEK_GAP frames (sparse sampling of a long
    video decodes a few GOPs), decodes forward from the start when the timestamps are unusable."""
    if not table.pts:
        yield from _frames_forward(container, stream, wanted)
        return
    number = {p: i for i, p in enumerate(table.pts)}
    frames, position = None, -1  # decoder generator and the number of the frame it gave last
    for target in wanted:
        key = (
            table.keyframes[max(bisect.bisect_right(table.keyframes, target) - 1, 0)]
            if table.keyframes
            else 0
        )
        if frames is None or position >= target or key - position > SEEK_GAP:
            container.seek(table.pts[key], stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            position = number.get(frame.pts, -1)
            if position == target:
                yield target, frame
            if position >= target:
                break


def _frames_forward(container, stream, wanted: list[int]) -> Iterator[tuple[int, av.VideoFrame]]:
    container.seek(0)
    want = set(wanted)
    for i, frame in enumerate(container.decode(stream)):
        if i in want:
            yield i, frame
        if i >= wanted[-1]:
            return


def decode_error(source, e: Exception) -> PredictError:
    return PredictError(f"cannot decode {source}: {e}")


def read_clip(video: str | Path, cfg: C.Config, *, short_side: int | None = None) -> torch.Tensor:
    """One clip x_1TCHW of a video file as the val loader renders the same video from a shard.

    short_side: the shards' short side (default: ShardGeometry.of(cfg)).
    """
    shards = ShardGeometry.of(cfg, short_side)
    d = cfg.data
    u = sampling.frame_draws(None, mode="val", sampling=d.sampling, num_segments=d.num_segments)
    with open_video(video) as container:
        stream = video_stream(container, video)
        try:
            rgb = sampled_frames(container, stream, u, d, shards)
        except (av.FFmpegError, OSError) as e:
            raise decode_error(video, e) from None
    if rgb is None:
        raise PredictError(f"{video} has no video frames")
    h, w = rgb.shape[1:3]
    boxes, flips, size = sampling.eval_crop_boxes(
        w, h, scale_size=d.scale_size, crop_size=d.crop_size, num_crops=1
    )
    return render_views(rgb, Views(u, boxes, flips, size), d.clip_length).permute(0, 1, 4, 2, 3)


def sampled_frames(
    container, stream, u: np.ndarray, d: LoaderConfig, shards: ShardGeometry
) -> np.ndarray | None:
    """(clips*T, H, W, 3) uint8 shard-like frames that draws `u` pick, or None for a stream without frames."""
    table = frame_table(container, stream)
    got = _decode_indices(container, stream, table, u, d, shards)
    if got is None and table.count:
        # fewer frames decode than packets were demuxed (a damaged file): count by decoding, then sample
        container.seek(0)
        counted = FrameTable(sum(1 for _ in container.decode(stream)), [], [])
        got = _decode_indices(container, stream, counted, u, d, shards)
    return got


def _decode_indices(container, stream, table: FrameTable, u, d: LoaderConfig, shards) -> np.ndarray | None:
    if table.count == 0:
        return None
    idx = sampling.frame_indices(
        table.count,
        u,
        sampling=d.sampling,
        dense_stride=d.dense_stride,
        frames_per_segment=d.frames_per_segment,
    ).ravel()
    wanted = sorted(set(idx.tolist()))
    render, got = None, {}
    for i, frame in frames_at(container, stream, table, wanted):
        render = render or ShardRenderer(frame, sample_aspect_ratio(stream), shards)
        got[i] = render(frame)
    if len(got) < len(wanted):
        return None
    return np.stack([got[i] for i in idx.tolist()])


# ------------------------------------------------------------------------------------------------- the model


def plain_config(model_name: str, num_segments: int, num_classes: int) -> C.Config:
    """The config of a converted or plain state_dict: the named model at the K400 val geometry (crop 224 of
    short side 256), which is what the released models were tested with."""
    cfg = C.Config()
    cfg.model.name, cfg.model.num_classes = model_name, num_classes
    cfg.data.num_segments = num_segments
    if model_name in models.list_models():  # an unknown name is reported where the model is built
        cfg.data.frames_per_segment = models.parse_name(model_name).get("frames_per_segment", 1)
    return cfg


def read_classes(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise PredictError(f"class list {path} not found (--classes: class names, one a line)")
    classes = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not classes:
        raise PredictError(f"class list {path} has no class names (one a line)")
    return classes


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PredictError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name} asks for a GPU but torch sees none; use --device cpu")
    return device


def load_model(
    path: str,
    device: torch.device,
    *,
    classes_file: str = "",
    model_name: str = "",
    num_segments: int = 8,
) -> tuple[torch.nn.Module, C.Config, list[str]]:
    """(model in eval mode, config, class names) from a gcvideo checkpoint, or from a plain state_dict with
    model_name and classes_file given (a model converted with `python -m models.convert`)."""
    ckpt = checkpoints.load(path)
    classes = read_classes(classes_file) if classes_file else []
    if model_name:
        if not classes:
            raise PredictError(f"--model {model_name} needs --classes FILE: a state_dict has no class names")
        cfg = plain_config(model_name, num_segments, len(classes))
    elif isinstance(ckpt, dict) and "config" in ckpt:
        cfg = C.from_dict(ckpt["config"])
        classes = classes or list(ckpt.get("classes") or [])
    else:
        raise PredictError(
            f"{path} is a plain state_dict (no config inside): name its model and classes with "
            f"--model NAME --classes FILE [--num-segments 8]"
        )
    if len(classes) != cfg.model.num_classes:
        raise PredictError(
            f"{path} has {cfg.model.num_classes} classes but the class list has {len(classes)}: pass the "
            f"list it was trained with via --classes FILE"
        )
    try:
        model = checkpoints.build_model(cfg, cfg.model.num_classes)
    except ValueError as e:  # an unknown model name: bad usage
        raise C.ConfigError(f"--model: {e}") from None
    _load_weights(model, checkpoints.model_state(ckpt, path), path, cfg)
    return model.to(device).eval(), cfg, classes


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, cfg: C.Config) -> None:
    target = model.state_dict()
    fc = next((k for k in model.classifier_names() if k.endswith("weight")), "")
    if fc in state and fc in target and state[fc].shape[0] != target[fc].shape[0]:
        raise PredictError(
            f"{path} has {state[fc].shape[0]} classes but the class list has {target[fc].shape[0]}: pass the "
            f"list it was trained with via --classes FILE"
        )
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    reshaped = sorted(k for k in set(target) & set(state) if target[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        found = [(missing, "missing"), (unexpected, "not in the model"), (reshaped, "of another shape")]
        what = ", ".join(f"{len(keys)} weights {why} (first: {keys[0]})" for keys, why in found if keys)
        raise PredictError(
            f"{path} does not fit model {cfg.model.name}: {what}; is --model the model it was trained or "
            f"converted as?"
        )
    model.load_state_dict(state)


@torch.no_grad()
def top_classes(model, x_NTCHW: torch.Tensor, classes: list[str], top: int) -> list[tuple[str, float]]:
    probs = model(x_NTCHW).float().softmax(-1)[0]
    scores, ids = probs.topk(min(top, len(classes)))
    return [(classes[i], float(s)) for s, i in zip(scores.tolist(), ids.tolist())]


def predict(
    checkpoint: str,
    video: str,
    *,
    classes_file: str = "",
    top: int = 5,
    device: str = "cpu",
    model_name: str = "",
    num_segments: int = 8,
    short_side: int | None = None,
) -> list[tuple[str, float]]:
    """The `top` most likely classes of one video file, with their softmax scores."""
    dev = resolve_device(device)
    model, cfg, classes = load_model(
        checkpoint, dev, classes_file=classes_file, model_name=model_name, num_segments=num_segments
    )
    return top_classes(model, read_clip(video, cfg, short_side=short_side).to(dev), classes, top)


# ------------------------------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class Hop:
    """Time between predictions: `value` frames, or seconds when `seconds`."""

    value: float
    seconds: bool

    @classmethod
    def parse(cls, text: str) -> Hop:
        """'16' (frames) or '0.5s' (seconds)."""
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s?)\s*", text)
        if not match or not float(match[1]) > 0 or (not match[2] and not match[1].isdigit()):
            raise C.ConfigError(f"--hop {text!r}: a whole number of frames (16) or seconds (0.5s), > 0")
        return cls(float(match[1]), bool(match[2]))


class FramePreprocessor:
    """One decoded frame -> (S, S, 3) float32 model input: the val centre crop, resized and normalised, as
    read_clip renders each frame of a clip."""

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


def stream_predictions(
    model,
    cfg: C.Config,
    classes: list[str],
    source: str,
    *,
    stride: int = 2,
    hop: Hop = Hop(1.0, True),
    top: int = 5,
    device: torch.device | str = "cpu",
    short_side: int | None = None,
) -> Iterator[dict]:
    """Records {"t": seconds, "frame": number, "top": [[label, score], ...]} over a source decoded
    sequentially, one per `hop` once the first window is full; t and frame are the window's newest frame's."""
    shards = ShardGeometry.of(cfg, short_side)
    with open_video(source) as container:
        stream = video_stream(container, source)
        try:
            for number, t, x_TSSC in sliding_windows(container, stream, cfg.data, shards, stride, hop):
                x = x_TSSC.permute(0, 3, 1, 2)[None].to(device)
                yield {"t": round(t, 3), "frame": number, "top": top_classes(model, x, classes, top)}
        except (av.FFmpegError, OSError) as e:
            raise decode_error(source, e) from None
        except PredictError as e:
            raise PredictError(f"{source}: {e}") from None


def sliding_windows(
    container, stream, d: LoaderConfig, shards: ShardGeometry, stride: int, hop: Hop
) -> Iterator[tuple[int, float, torch.Tensor]]:
    """(frame number, seconds, window (T, S, S, 3)) every `hop`: every `stride`-th decoded frame is
    preprocessed into a deque of the model's T frames, the only frames kept."""
    window: deque[torch.Tensor] = deque(maxlen=d.num_segments)
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    render, start, last, number = None, 0.0, None, -1  # last: (number, t) of the last window given
    for number, frame in enumerate(container.decode(stream)):
        if number % stride:
            continue
        if render is None:
            render = FramePreprocessor(ShardRenderer(frame, sample_aspect_ratio(stream), shards), d)
            start = frame_time(frame, number, rate)  # a camera's clock does not start at 0
        window.append(render(frame))
        t = frame_time(frame, number, rate) - start
        if len(window) == window.maxlen and _due(hop, last, number, t):
            last = (number, t)
            yield number, t, torch.stack(tuple(window))
    if last is None:
        raise PredictError(
            f"it ended after {number + 1} frames, before a window of {d.num_segments} frames "
            f"{stride} apart was full: use a smaller --stride, or predict without --stream"
        )


def _due(hop: Hop, last: tuple[int, float] | None, number: int, t: float) -> bool:
    if last is None:
        return True
    # a small slack so a 0.1 s hop at 10 fps does not slip a frame on float rounding of timestamps
    return t - last[1] >= hop.value - 1e-6 if hop.seconds else number - last[0] >= hop.value


# ---------------------------------------------------------------------------------------------- command line


class UsageParser(argparse.ArgumentParser):
    """argparse whose usage errors raise C.ConfigError (train.main: one line, exit 2) instead of sys.exit."""

    def error(self, message: str):
        raise C.ConfigError(f"{message} (usage: {self.prog} -h)")


def build_parser():
    parser = UsageParser(
        prog="python train.py predict",
        description="Top classes of a video file, or over time for a file, URL or camera (--stream).",
    )
    parser.add_argument("checkpoint", help="a gcvideo checkpoint, or a plain state_dict with --model")
    parser.add_argument(
        "video", help="a video file; with --stream also a URL or a camera index (0: /dev/video0)"
    )
    parser.add_argument("--classes", default="", help="class names, one a line (default: the checkpoint's)")
    parser.add_argument("--top", type=int, default=5, help="how many classes to show (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice; see docs)"
    )
    parser.add_argument("--model", default="", help="model name of a plain state_dict (needs --classes)")
    parser.add_argument("--num-segments", type=int, default=8, help="frames per clip of --model (default 8)")
    parser.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="short side of the training shards (default: the checkpoint dataset's, else its scale_size)",
    )
    g = parser.add_argument_group("streaming")
    g.add_argument("--stream", action="store_true", help="top classes over time (implied by a camera/URL)")
    g.add_argument("--stride", type=int, default=2, help="frames between the window's frames (default 2)")
    g.add_argument(
        "--hop", default="1s", help="between predictions: frames (16) or seconds (0.5s); default 1s"
    )
    g.add_argument("--jsonl", default="", help="write the records to this file (one JSON object a line)")
    return parser


def parse_args(argv: list[str]):
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        raise C.ConfigError(f"--threads must be >= 0, got {args.threads}")
    for name in ("top", "num_segments", "stride"):
        if getattr(args, name) <= 0:
            raise C.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.short_side is not None and args.short_side <= 0:
        raise C.ConfigError(f"--short-side must be >= 1, got {args.short_side}")
    args.hop = Hop.parse(args.hop)
    args.stream = args.stream or bool(camera_device(args.video)) or is_url(args.video)
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, classes = load_model(
        args.checkpoint,
        device,
        classes_file=args.classes,
        model_name=args.model,
        num_segments=args.num_segments,
    )
    if not args.stream:
        x = read_clip(args.video, cfg, short_side=args.short_side).to(device)
        for name, score in top_classes(model, x, classes, args.top):
            sys.stdout.write(f"{score:7.2%}  {name}\n")
        return
    records = stream_predictions(
        model,
        cfg,
        classes,
        args.video,
        stride=args.stride,
        hop=args.hop,
        top=args.top,
        device=device,
        short_side=args.short_side,
    )
    try:
        show_stream(records, args.jsonl)
    except KeyboardInterrupt:  # how a camera stream ends
        sys.stderr.write("stopped\n")


def record_line(record: dict) -> str:
    labels = "  ".join(f"{score:6.1%} {name}" for name, score in record["top"])
    return f"{record['t']:9.2f}s  frame {record['frame']:7d}  {labels}"


def show_stream(records: Iterator[dict], jsonl: str) -> None:
    """Records to `jsonl` (a file) if given; a live line on a terminal, plain lines on a pipe without it."""
    out = open(jsonl, "w") if jsonl else None  # noqa: SIM115 (closed below, also on Ctrl-C)
    try:
        if sys.stdout.isatty():
            _show_live(records, out)
        else:
            for record in records:
                _write_record(out, record)
                if out is None:
                    sys.stdout.write(record_line(record) + "\n")
                    sys.stdout.flush()
    finally:
        if out is not None:
            out.close()


def _write_record(out, record: dict) -> None:
    if out is not None:
        out.write(json.dumps(record) + "\n")
        out.flush()


def _show_live(records: Iterator[dict], out) -> None:
    from rich.live import Live
    from rich.text import Text

    with Live(Text("waiting for the first window ..."), auto_refresh=False) as live:
        for record in records:
            _write_record(out, record)
            live.update(Text(record_line(record)), refresh=True)
