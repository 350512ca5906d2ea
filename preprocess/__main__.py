r"""`python -m preprocess {kinetics,list,frames,hmdb51,synthetic,merge} ...`: videos -> WebDataset shards +
index.

Examples:
  python -m preprocess kinetics --csv kinetics-400_val.csv --videos k400/val --out data/k400 --name k400
  python -m preprocess list --split train=trainlist01.txt --split val=testlist01.txt --root UCF-101 \
      --classes classInd.txt --out data/ucf101 --name ucf101
  python -m preprocess frames --split train=something-something-v1-train.csv \
      --root 20bn-something-something-v1 --classes something-something-v1-labels.csv --name sthv1
  python -m preprocess list --split train=Diving48_V2_train.json --split val=Diving48_V2_test.json \
      --root Diving48_rgb --classes diving48_label_map.txt --out data/diving48 --name diving48
  python -m preprocess hmdb51 --annotations testTrainMulti_7030_splits --hmdb-split 1 --root hmdb51_org \
      --classes hmdb51_label_map.txt --out data/hmdb51_1 --name hmdb51_1
  python -m preprocess synthetic                     # the embedded demo dataset in data/synthetic
  python -m preprocess merge data/k400               # after `--part i/N` runs on N machines
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from preprocess import storage
from preprocess.ffmpeg_args import CODECS, EncodeSettings
from preprocess.jobs import InputError, RunError
from preprocess.runner import PILOT_VIDEOS, ShardJob, run
from preprocess.sources import hmdb51_dataset, kinetics_dataset, list_dataset, parse_split_args

log = logging.getLogger("preprocess")


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must look like 320x240, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--part must be i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _shard_size(text: str) -> tuple[str, int]:
    """('samples', n) for a bare number, ('bytes', n) for a number with a unit."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text.strip())
    unit = m.group(2).upper() if m else ""
    if not m or (unit and unit not in _UNITS) or float(m.group(1)) <= 0 or (not unit and "." in m.group(1)):
        raise argparse.ArgumentTypeError(
            f"shard size must be a video count (256) or bytes with a unit (500MB, 1GB, 2GiB), got {text!r}"
        )
    if not unit:
        return "samples", int(m.group(1))
    return "bytes", int(float(m.group(1)) * _UNITS[unit])


def _workers(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            f"--workers must be 0 (every core) or a positive number, got {text!r}"
        )
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


# The option defaults are the dataclasses' own (EncodeSettings, ShardJob): one place to change them.
ENCODE_DEFAULTS = EncodeSettings()
JOB_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(ShardJob) if f.default is not dataclasses.MISSING
}


def add_output_options(p: argparse.ArgumentParser, *, name: str) -> None:
    """Where the shards go, how the videos are encoded and how the work is cut and run."""
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=None,
        help="output directory, or an fsspec URL (s3://bucket/prefix, gs://...) to publish the shards to "
        "(default: data/<name>)",
    )
    g.add_argument("--name", default=name, help="dataset name, the shard file prefix (default: %(default)s)")
    add_encode_options(g)
    add_shard_options(g)
    add_engine_options(g)
    g.add_argument(
        "--part",
        type=_part,
        default=JOB_DEFAULTS["part"],
        metavar="i/N",
        help="process only part i of N (every N-th shard); then run `merge` (default 0/1)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def add_encode_options(g) -> None:
    """The EncodeSettings fields, defaulting to its defaults."""
    d = ENCODE_DEFAULTS
    g.add_argument(
        "--codec",
        choices=CODECS,
        default=d.codec,
        help="h264 (GPU decode, fixed keyframe interval) or mjpeg (every frame a keyframe, decodes on "
        "DALI's CPU backend) (default: %(default)s)",
    )
    g.add_argument(
        "--short-side",
        type=int,
        default=d.short_side,
        help="resize so the short side is this many pixels, even (default: %(default)s; 0: keep)",
    )
    g.add_argument("--size", type=_size, default=d.size, metavar="WxH", help="fixed output size instead")
    g.add_argument(
        "--fps", type=float, default=d.fps, help="constant output frame rate (default: keep frames)"
    )
    g.add_argument(
        "--gop",
        type=_positive_int,
        default=d.gop,
        help="h264 keyframe interval in frames (default %(default)s; docs/preprocess.md)",
    )
    g.add_argument(
        "--crf", type=int, default=d.crf, help="h264 quality, lower is better (default %(default)s)"
    )
    g.add_argument("--preset", default=d.preset, help="libx264 preset (default %(default)s)")
    g.add_argument(
        "--quality",
        type=int,
        default=d.mjpeg_quality,
        help="mjpeg -q:v, 2 (best) .. 31 (default %(default)s)",
    )
    g.add_argument(
        "--tolerate-decode-errors",
        action="store_true",
        default=d.tolerate_decode_errors,
        help="keep sources whose decoder reports errors (concealed frames) instead of failing them",
    )
    g.add_argument(
        "--keep-truncated",
        action="store_true",
        default=d.keep_truncated,
        help="keep sources that end before the length their video stream declares (a partial download), "
        "noted as warnings in failures.jsonl, instead of failing them (reason 'truncated')",
    )


def add_shard_options(g) -> None:
    samples = JOB_DEFAULTS["shard_samples"]
    g.add_argument(
        "--shard-size",
        "--shard-samples",
        dest="shard_size",
        type=_shard_size,
        default=str(samples),
        metavar="N|SIZE",
        help=f"target shard size: a number of videos (e.g. {samples}) or bytes with a unit (e.g. "
        f"500MB, 1GB; converted to a video count from a pilot of {PILOT_VIDEOS} videos) (default "
        f"{samples})",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=JOB_DEFAULTS["seed"],
        help="seed of the shard assignment shuffle (default %(default)s)",
    )
    g.add_argument(
        "--workers",
        type=_workers,
        default=JOB_DEFAULTS["workers"],
        help="parallel processes (default %(default)s: every core)",
    )


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 1:
        raise argparse.ArgumentTypeError(f"--straggler-factor must be a number above 1, got {text!r}")
    return value


def add_engine_options(g) -> None:
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default=JOB_DEFAULTS["engine"],
        help="local: a process pool on this machine; ray: one task per shard on a Ray cluster, with retries "
        "and straggler relaunch (same shards and index) (default %(default)s)",
    )
    g.add_argument(
        "--ray-address",
        default=JOB_DEFAULTS["ray_address"],
        metavar="ADDR",
        help="with --engine ray: the cluster to join (host:port of `ray start --head`, or auto) (default: "
        "start Ray on this machine)",
    )
    g.add_argument(
        "--ray-retries",
        type=int,
        default=JOB_DEFAULTS["ray_retries"],
        help="with --engine ray: runs of a shard's task again when its worker or node dies (default "
        "%(default)s)",
    )
    g.add_argument(
        "--straggler-factor",
        type=_factor,
        default=JOB_DEFAULTS["straggler_factor"],
        help=f"with --engine ray: at the tail, a shard running longer than this many median shard times is "
        f"launched again (default {JOB_DEFAULTS['straggler_factor']:g})",
    )
    g.add_argument(
        "--staging",
        default=None,
        help="for an --out URL: the local folder for records and shards being written (default "
        "~/.cache/gcvideo/staging/<url>)",
    )


def engine_fields(args: argparse.Namespace, default_out: str) -> dict:
    """The ShardJob fields of --out, --staging and the engine options."""
    out, remote = storage.output_location(args.out or default_out, args.staging)
    return {
        "out": out,
        "remote": remote,
        "engine": args.engine,
        "ray_address": args.ray_address,
        "ray_retries": args.ray_retries,
        "straggler_factor": args.straggler_factor,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every failure as it happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (add_kinetics, add_lists, add_hmdb51, add_synthetic, add_merge):
        add_command(sub)
    return parser


def add_kinetics(sub) -> None:
    p = sub.add_parser("kinetics", help="the official Kinetics CSV + a folder of downloaded videos")
    p.add_argument(
        "--csv", action="append", required=True, help="annotation CSV (repeatable: train, val, ...)"
    )
    p.add_argument(
        "--videos",
        required=True,
        help="folder (searched recursively) of <id>_<start:06d>_<end:06d>.<ext> clips or full "
        "<id>.<ext> videos (trimmed to [time_start, time_end])",
    )
    p.add_argument(
        "--classes", default=None, help="class names, one per line (default: the CSV labels, sorted)"
    )
    p.add_argument("--splits", nargs="+", default=None, help="only these splits of the CSV (default: all)")
    add_output_options(p, name="k400")


def add_lists(sub) -> None:
    """`list` (video files) and `frames` (JPEG frame folders): the same list formats."""
    for command, helptext in (
        ("list", "list files of videos"),
        ("frames", "list files of JPEG frame folders"),
    ):
        p = sub.add_parser(command, help=helptext)
        p.add_argument(
            "--split",
            action="append",
            required=True,
            metavar="SPLIT=FILE",
            help="a list file for a split (repeatable). Formats: 'path label', 'path num_frames label', "
            "'path,label' CSV (optional header), UCF101 train/test lists, Something-Something "
            "JSON ([{'id':..., 'template':...}]), Something-Something V1 / Jester 'id;label' CSV, Diving48 "
            "JSON ([{'vid_name':..., 'label':..., 'start_frame':..., 'end_frame':...}], trimmed to the "
            "frames [start_frame, end_frame))",
        )
        p.add_argument("--root", default=None, help="folder the list's relative paths start from")
        p.add_argument(
            "--classes",
            default=None,
            help="class names: one per line (line order = index), UCF101 classInd.txt, or SSv2 "
            "labels JSON (default: sorted label names, or 0..max for integer labels)",
        )
        if command == "list":
            p.add_argument(
                "--video-ext",
                default=None,
                help="extension for JSON ids (default .webm for Something-Something, .mp4 for Diving48)",
            )
        else:
            p.add_argument(
                "--frame-rate",
                type=float,
                default=12.0,
                help="rate the frames were extracted at (default 12, Something-Something V1)",
            )
        add_output_options(p, name="dataset")


def add_hmdb51(sub) -> None:
    p = sub.add_parser("hmdb51", help="HMDB51: the official split files + the videos in class folders")
    p.add_argument(
        "--annotations",
        required=True,
        help="folder of the split files <class>_test_split<k>.txt (lines 'name.avi 1|2|0')",
    )
    p.add_argument(
        "--hmdb-split",
        type=int,
        choices=(1, 2, 3),
        default=1,
        help="which of the three splits: its 1 rows become split train, its 2 rows split val (default 1)",
    )
    p.add_argument("--root", required=True, help="folder of the videos, <root>/<class>/<name>.avi")
    p.add_argument(
        "--classes",
        default=None,
        help="class names, one per line (default: the split files' class names, sorted)",
    )
    add_output_options(p, name="hmdb51")


def add_synthetic(sub) -> None:
    """The embedded demo set: its own sizes and encoding (preprocess.synthetic), the engine options."""
    p = sub.add_parser("synthetic", help="generate the embedded demo dataset (8 order-dependent classes)")
    p.add_argument(
        "--out", default="data/synthetic", help="output directory or fsspec URL (default data/synthetic)"
    )
    p.add_argument("--name", default="synthetic")
    p.add_argument("--train-per-class", type=_positive_int, default=384)
    p.add_argument("--val-per-class", type=_positive_int, default=64)
    p.add_argument("--frames", type=_positive_int, default=16)
    p.add_argument(
        "--frame-size", type=_positive_int, default=64, help="square frame side in pixels (default 64)"
    )
    p.add_argument("--quality", type=int, default=5, help="mjpeg quantiser like -q:v (default 5)")
    p.add_argument("--shard-size", type=_positive_int, default=512, metavar="N", help="videos per shard")
    p.add_argument("--seed", type=int, default=JOB_DEFAULTS["seed"])
    p.add_argument(
        "--workers",
        type=_workers,
        default=JOB_DEFAULTS["workers"],
        help="parallel processes (default %(default)s: every core)",
    )
    add_engine_options(p)
    p.add_argument(
        "--part", type=_part, default=JOB_DEFAULTS["part"], metavar="i/N", help="process only part i of N"
    )
    p.add_argument("--no-progress", action="store_true")


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="combine the index files of `--part i/N` runs into index.json")
    p.add_argument("out", help="the output directory holding every part's shards and index.part-*.json")


def settings_from(args: argparse.Namespace) -> EncodeSettings:
    try:
        return EncodeSettings(
            codec=args.codec,
            short_side=args.short_side or None,
            size=args.size,
            fps=args.fps,
            gop=args.gop,
            crf=args.crf,
            preset=args.preset,
            mjpeg_quality=args.quality,
            tolerate_decode_errors=args.tolerate_decode_errors,
            keep_truncated=args.keep_truncated,
        )
    except ValueError as err:
        raise InputError(f"bad option: {err}") from err


def shard_job(args: argparse.Namespace, settings: EncodeSettings) -> ShardJob:
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.name):
        raise InputError(f"--name {args.name!r} must be letters, digits or _ (it prefixes shard file names)")
    kind, size = args.shard_size
    return ShardJob(
        **engine_fields(args, f"data/{args.name}"),
        name=args.name,
        settings=settings,
        shard_samples=size if kind == "samples" else 1,
        shard_bytes=size if kind == "bytes" else None,
        workers=args.workers,
        seed=args.seed,
        part=args.part,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (rows may have failed: see the table), 2 bad usage or input files (argparse's too),
    1 the run failed (every row failed, disk full, another run holds --out), 130 interrupted."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    handler: logging.Handler = RichHandler(console=console, show_path=False)
    if (
        not console.is_terminal
    ):  # a log file (Docker, Slurm, `> log`): complete lines, not wrapped at 80 columns
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[handler],
    )
    try:
        command(args, console)
    except InputError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return 2
    except RunError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to go on (finished shards are kept)")
        return 130
    return 0


def command(args: argparse.Namespace, console: Console) -> None:
    """Run one sub-command; user mistakes raise InputError, a run that cannot finish RunError."""
    from preprocess import transcode

    if args.command == "merge":
        from preprocess.merge import merge

        merge(Path(args.out), console)
        return
    if args.command == "synthetic":
        from preprocess import synthetic

        synthetic.main(args, console)
        return
    settings = settings_from(args)
    cfg = shard_job(args, settings)
    if args.command == "kinetics":
        inputs = args.csv
        dataset = kinetics_dataset(args.csv, args.videos, args.classes, args.splits)
    elif args.command == "hmdb51":
        inputs = [f"{args.annotations} (split {args.hmdb_split})"]
        dataset = hmdb51_dataset(args.annotations, args.hmdb_split, args.root, args.classes)
    else:
        kind = "video" if args.command == "list" else "frames"
        split_files = parse_split_args(args.split)
        inputs = list(split_files.values())
        dataset = list_dataset(
            split_files,
            args.root,
            args.classes,
            kind=kind,
            video_ext=getattr(args, "video_ext", None),
            frame_rate=getattr(args, "frame_rate", None),
        )
    if not dataset.jobs and not dataset.rejected:
        raise InputError(
            f"the inputs list no videos: {', '.join(inputs)} hold no rows (of the chosen splits)"
        )
    run(dataset, cfg, transcode.process, console)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
