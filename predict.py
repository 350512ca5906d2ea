"""`python train.py predict CKPT VIDEO [VIDEO|FOLDER|LIST.txt ...]`: the top classes of video files, scored
as `evaluate` scores them (the checkpoint's --eval.* views: clips, crops, twice-sampling, dense sampling;
`--fast` for one centre clip), or `... CKPT SOURCE --stream`: top classes over time for a file, a URL or a
camera, with the online (cached-shift) TSM where the model allows it.

The model and its input come from the checkpoint alone: checkpoints.load_model builds it, the training data's
frame size and clip length saved in it (checkpoints.inference_facts) say how to render a frame, and
pipeline.video_file turns a file into the views the test loader would give it after preprocessing. A plain
state_dict has none of that: it is run at the geometry given (--short-side) or the documented default
(checkpoints.PLAIN_SHORT_SIDE), never at one read from whatever dataset the working directory holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import torch

import checkpoints
import config
import evaluation
import runtime
from models.online import OnlineTSM, check_online
from pipeline import video_file as vf
from pipeline.video_file import Hop, ShardGeometry, VideoFileError

log = logging.getLogger(__name__)

# what a folder argument contributes: files with these suffixes (lower case), sorted by name
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
EVERY_SECOND = Hop(1.0, True)
VIEW_CHUNK = 16  # views per forward: bounds activation memory for 10 x 3 dense views of a ResNet-50


class PredictError(RuntimeError):
    """A checkpoint, class list, device or argument predict cannot use; the message names it."""


# ------------------------------------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A loaded model and what rendering its input needs; built once for any number of videos."""

    net: torch.nn.Module
    cfg: config.Config  # the run's config set up for a test (evaluation.eval_config); cfg.eval: the views
    classes: list[str]
    shards: ShardGeometry
    device: torch.device
    precision: str
    clip_frames: int | None  # median frames of a training video (None: not known)
    mode: str = "test"  # test: the checkpoint's evaluation views; val: one centre clip (--fast)


def read_classes(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise PredictError(f"class list {path} not found (--classes: class names, one a line)")
    classes = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not classes:
        raise PredictError(f"class list {path} has no class names (one a line)")
    return classes


def shard_geometry(loaded: checkpoints.Loaded, short_side: int | None) -> ShardGeometry:
    """--short-side if given; a plain state_dict: the plain default; a checkpoint: its training shards'
    size as saved by training, or for an older checkpoint its dataset's index when readable, else its
    --data.scale_size (the size its val crop geometry assumes)."""
    if short_side:
        return ShardGeometry(short_side)
    if loaded.plain:
        return ShardGeometry(checkpoints.PLAIN_SHORT_SIDE)
    shards = loaded.facts.get("shards")
    if shards is not None:
        return ShardGeometry(shards.get("short_side"), tuple(shards["size"]) if shards.get("size") else None)
    index = loaded.cfg.data.index
    try:
        settings = json.loads(Path(index).read_text())["settings"]
        log.info("%s holds no shard size (an older checkpoint): using %s's", "the checkpoint", index)
        return ShardGeometry(
            settings.get("short_side"), tuple(settings["size"]) if settings.get("size") else None
        )
    except (OSError, ValueError, KeyError, TypeError):
        log.info("%s not readable: frames scaled to short side %d", index, loaded.cfg.data.scale_size)
        return ShardGeometry(loaded.cfg.data.scale_size)


def load_predictor(
    path: str,
    device: torch.device,
    *,
    classes_file: str = "",
    model_name: str = "",
    num_segments: int | None = None,
    short_side: int | None = None,
    fast: bool = False,
) -> Predictor:
    """The model of a gcvideo checkpoint, or of a plain state_dict with model_name and classes_file given
    (a model converted with `python -m models.convert`), ready to score videos."""
    classes = read_classes(classes_file) if classes_file else []
    if model_name and not classes:
        raise PredictError(f"--model {model_name} needs --classes FILE: a state_dict has no class names")
    loaded = checkpoints.load_model(
        path,
        "cpu",
        name=model_name or None,
        num_segments=num_segments,
        hint="--model NAME --classes FILE [--num-segments 8]",
    )
    classes = classes or loaded.classes
    if len(classes) != loaded.cfg.model.num_classes:
        raise PredictError(
            f"{path} has {loaded.cfg.model.num_classes} classes but the class list has {len(classes)}: pass "
            f"the list it was trained with via --classes FILE"
        )
    cfg = evaluation.eval_config(loaded.cfg, [])
    net = runtime.setup_model(loaded.model, device=device, channels_last=cfg.model.channels_last).eval()
    precision = runtime.resolve_precision(cfg.run.precision, device)
    return Predictor(
        net,
        cfg,
        classes,
        shard_geometry(loaded, short_side),
        device,
        precision,
        loaded.facts.get("clip_frames"),
        "val" if fast else "test",
    )


@torch.no_grad()
def view_scores(p: Predictor, x_VTSSC: torch.Tensor) -> torch.Tensor:
    """(classes,) softmax scores averaged over the views, as evaluation.score_videos averages them."""
    x = x_VTSSC.permute(0, 1, 4, 2, 3).to(p.device)
    logits = []
    for chunk in x.split(VIEW_CHUNK):
        with runtime.autocast(p.precision, p.device.type):
            logits.append(p.net(chunk))
    return evaluation.average_view_scores(torch.cat(logits)[None])[0].cpu()


def top_classes(scores_K: torch.Tensor, classes: list[str], top: int) -> list[tuple[str, float]]:
    values, ids = scores_K.topk(min(top, len(classes)))
    return [(classes[i], float(s)) for s, i in zip(values.tolist(), ids.tolist())]


def predict_video(p: Predictor, video: str | Path, top: int = 5) -> dict:
    """{"video", "top": [[label, score], ...], "views", "frames", and "warning" for a truncated file}."""
    views = vf.read_views(video, p.cfg.data, p.shards, mode=p.mode, views=p.cfg.eval)
    scores = view_scores(p, views.x)
    record = {"video": str(video), "top": top_classes(scores, p.classes, top), "views": len(views.x)}
    record["frames"] = views.frames
    if views.truncated:
        record["warning"] = f"truncated: {views.frames} frames read of the {views.declared} declared"
    return record


def predict(checkpoint: str, video: str, *, top: int = 5, device: str = "cpu", **options) -> list:
    """The `top` most likely classes of one video file, with their scores (options: load_predictor's)."""
    p = load_predictor(checkpoint, runtime.resolve_device(device, option="--device"), **options)
    return predict_video(p, video, top)["top"]


# ------------------------------------------------------------------------------------------------- the inputs


def expand_inputs(inputs: list[str], stream: bool) -> list[str]:
    """Videos from the arguments: paths (or with --stream a URL / camera index), folders (their video
    files, sorted) and list files (.txt: a path a line, relative to the list's folder)."""
    videos: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise PredictError(
                    f"folder {item} holds no video files ({', '.join(sorted(VIDEO_SUFFIXES))})"
                )
            videos += found
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            videos += [line if Path(line).is_absolute() else str(path.parent / line) for line in lines]
        else:
            videos.append(item)
    if stream and len(videos) != 1:
        raise config.ConfigError(
            f"--stream takes one source, got {len(videos)} (usage: python train.py predict -h)"
        )
    return videos


# ------------------------------------------------------------------------------------------------- streaming


def default_stride(p: Predictor, rate: float) -> int:
    """Frames between the window's segments so that T segments span a training video: its median length
    in frames, or for a plain state_dict (or an old checkpoint) PLAIN_CLIP_SECONDS at the source's rate."""
    frames = p.clip_frames or checkpoints.PLAIN_CLIP_SECONDS * rate
    return max(1, round(frames / p.cfg.data.num_segments))


def online_model(p: Predictor) -> OnlineTSM | None:
    """The cached-shift online model when the model can run online (tsm_* / tsn_*), else None."""
    model = runtime.unwrap_model(p.net)
    try:
        check_online(model)
    except ValueError:
        return None
    return OnlineTSM(model, window=p.cfg.data.num_segments)


@dataclass
class StreamStats:
    frames: int = 0  # frames decoded
    scored: int = 0  # frames through the model
    records: int = 0
    seconds: float = 0.0
    how: str = ""  # "online" or "sliding window"


def stream_predictions(
    p: Predictor,
    source: str,
    *,
    stride: int | None = None,
    hop: Hop = EVERY_SECOND,
    top: int = 5,
    online: bool | None = None,
    stats: StreamStats | None = None,
) -> Iterator[dict]:
    """Records {"t": seconds, "frame": number, "top": [[label, score], ...]} over a source decoded
    sequentially, one per `hop` once the first window is full; t and frame are the window's newest frame's.
    online: None uses the online model where the model allows it, False the offline sliding window."""
    stats = stats or StreamStats()
    counts: dict = {}
    with vf.open_video(source) as container:
        stream = vf.video_stream(container, source)
        stride = stride or default_stride(p, vf.stream_rate(stream))
        tsm = online_model(p) if online is not False else None
        if online and tsm is None:
            raise PredictError(
                f"--online: {p.cfg.model.name} cannot run online (its temporal modules see the future)"
            )
        stats.how = "online, one frame per step" if tsm is not None else "sliding window"
        start = time.perf_counter()
        try:
            windows = (
                _online_scores(p, tsm, container, stream, stride, hop, stats, counts)
                if tsm is not None
                else _window_scores(p, container, stream, stride, hop, stats, counts)
            )
            for number, t, scores in windows:
                stats.records += 1
                stats.frames, stats.seconds = counts["decoded"], time.perf_counter() - start
                yield {"t": round(t, 3), "frame": number, "top": top_classes(scores, p.classes, top)}
        except (av.FFmpegError, OSError) as e:
            raise vf.decode_error(source, e) from None
        except VideoFileError as e:
            raise VideoFileError(f"{source}: {e}") from None
        stats.frames, stats.seconds = counts.get("decoded", 0), time.perf_counter() - start


@torch.no_grad()
def _window_scores(p: Predictor, container, stream, stride: int, hop: Hop, stats: StreamStats, counts):
    windows = vf.sliding_windows(container, stream, p.cfg.data, p.shards, stride, hop, counts)
    for number, t, x_TSSC in windows:
        stats.scored += len(x_TSSC)
        x = x_TSSC.permute(0, 3, 1, 2)[None].to(p.device)
        with runtime.autocast(p.precision, p.device.type):
            scores = p.net(x).float().softmax(-1)[0].cpu()
        yield number, t, scores


@torch.no_grad()
def _online_scores(p: Predictor, tsm: OnlineTSM, container, stream, stride: int, hop: Hop, stats, counts):
    """Every stride-th frame through the online model, one 2D forward each; a record every hop once T
    frames were seen (the mean logits of the last T, as the offline model averages a clip's)."""
    frames = vf.preprocessed_frames(
        container, stream, p.cfg.data, p.shards, lambda n: n % stride == 0, counts
    )
    last, seen, number = None, 0, -1
    for number, t, x_SSC in frames:
        with runtime.autocast(p.precision, p.device.type):
            logits = tsm.step(x_SSC.permute(2, 0, 1).to(p.device))
        seen += 1
        stats.scored = seen
        if seen >= p.cfg.data.num_segments and hop.due(last, number, t):
            last = (number, t)
            yield number, t, logits.float().softmax(-1).cpu()
    if last is None:
        raise VideoFileError(
            f"it ended after {number + 1} frames, before {p.cfg.data.num_segments} frames {stride} apart "
            f"were seen: use a smaller --stride, or predict without --stream"
        )


# ---------------------------------------------------------------------------------------------- command line


class UsageParser(argparse.ArgumentParser):
    """argparse whose usage errors raise config.ConfigError (train.main: one line, exit 2), not sys.exit."""

    def error(self, message: str):
        raise config.ConfigError(f"{message} (usage: {self.prog} -h)")


def parse_hop(text: str) -> Hop:
    """'16' (frames) or '0.5s' (seconds)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s?)\s*", text)
    if not match or not float(match[1]) > 0 or (not match[2] and not match[1].isdigit()):
        raise config.ConfigError(f"--hop {text!r}: a whole number of frames (16) or seconds (0.5s), > 0")
    return Hop(float(match[1]), bool(match[2]))


def build_parser():
    parser = UsageParser(
        prog="python train.py predict",
        description="Top classes of video files, scored with the checkpoint's evaluation views, or over time "
        "for a file, URL or camera (--stream).",
    )
    parser.add_argument("checkpoint", help="a gcvideo checkpoint, or a plain state_dict with --model")
    parser.add_argument(
        "videos",
        nargs="+",
        metavar="VIDEO",
        help="video files, folders of them, list files (.txt, a path a line); with --stream one file, URL "
        "or camera index (0: /dev/video0)",
    )
    parser.add_argument("--classes", default="", help="class names, one a line (default: the checkpoint's)")
    parser.add_argument("--top", type=int, default=5, help="how many classes to show (default 5)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda when present), cpu, cuda:N")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice; see docs)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="one centre clip instead of the checkpoint's --eval.* views"
    )
    parser.add_argument("--json", action="store_true", help="JSON lines (the default for several videos)")
    parser.add_argument("--model", default="", help="model name of a plain state_dict (needs --classes)")
    parser.add_argument(
        "--num-segments", type=int, default=None, help="frames per clip of --model (default 8)"
    )
    parser.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="short side of the training shards (default: the checkpoint's; a plain state_dict: "
        f"{checkpoints.PLAIN_SHORT_SIDE})",
    )
    g = parser.add_argument_group("streaming")
    g.add_argument("--stream", action="store_true", help="top classes over time (implied by a camera/URL)")
    g.add_argument(
        "--stride",
        type=int,
        default=None,
        help="frames between the window's segments (default: T segments span a training video)",
    )
    g.add_argument(
        "--hop", default="1s", help="between predictions: frames (16) or seconds (0.5s); default 1s"
    )
    g.add_argument(
        "--window",
        action="store_true",
        help="score a sliding window of T frames with the offline model, even where the online (cached "
        "shift) model could run",
    )
    g.add_argument("--jsonl", default="", help="write the records to this file (one JSON object a line)")
    return parser


def parse_args(argv: list[str]):
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        raise config.ConfigError(f"--threads must be >= 0, got {args.threads}")
    for name in ("top", "num_segments", "stride", "short_side"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise config.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    args.hop = parse_hop(args.hop)
    first = args.videos[0]
    args.stream = args.stream or bool(vf.camera_device(first)) or vf.is_url(first)
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    videos = expand_inputs(args.videos, args.stream)
    device = runtime.resolve_device(args.device, option="--device")
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load_predictor(
        args.checkpoint,
        device,
        classes_file=args.classes,
        model_name=args.model,
        num_segments=args.num_segments,
        short_side=args.short_side,
        fast=args.fast,
    )
    if args.stream:
        run_stream(p, videos[0], args)
    elif len(videos) == 1 and not args.json:
        for name, score in predict_video(p, videos[0], args.top)["top"]:
            sys.stdout.write(f"{score:7.2%}  {name}\n")
    else:
        run_many(p, videos, args.top)


def run_many(p: Predictor, videos: list[str], top: int) -> None:
    """A JSON line per video; a video that fails gets {"video", "error"} and the others go on (exit 1)."""
    failed = 0
    for video in videos:
        try:
            record = predict_video(p, video, top)
        except VideoFileError as e:
            failed += 1
            record = {"video": video, "error": str(e)}
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    if failed:
        raise VideoFileError(f"{failed} of {len(videos)} videos could not be read (their lines say why)")


def run_stream(p: Predictor, source: str, args) -> None:
    stats = StreamStats()
    records = stream_predictions(
        p,
        source,
        stride=args.stride,
        hop=args.hop,
        top=args.top,
        online=False if args.window else None,
        stats=stats,
    )
    try:
        show_stream(records, args.jsonl)
    except KeyboardInterrupt:  # how a camera stream ends
        sys.stderr.write("stopped\n")
    sys.stderr.write(
        f"{stats.frames} frames decoded, {stats.scored} through the model ({stats.how}), {stats.records} "
        f"records in {stats.seconds:.1f} s: {stats.frames / max(stats.seconds, 1e-9):.1f} source frames/s, "
        f"{stats.scored / max(stats.seconds, 1e-9):.1f} model frames/s\n"
    )


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
