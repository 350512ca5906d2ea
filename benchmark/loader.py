"""Loader throughput at Kinetics geometry against the data paths users run today.

Every row reads the five real Kinetics clips of ../shared/data, each listed `--repeat` times (default 20), at
short side 256, T=8 TSN segments, multi-scale crop to 224 + flip + normalise, batch 8, 2 workers:

- `frame folders`: the TSN/TSM/GC data path (benchmark.frame_folders): JPEG frames extracted by ffmpeg at
  quality 2, opened with PIL in a DataLoader. The reference every ratio is taken against.
- `naive pyav`: a DataLoader whose workers decode every frame up to the last sampled one (what a first video
  loader does).
- `torch`: gcvideo's fallback (pipeline.torch_loader) on H.264 shards per keyframe interval (and per `--crfs`
  quality at the default interval) and on MJPEG.
- `dali-cpu`: gcvideo's DALI CPU loader on MJPEG; on a GPU also `dali-gpu` (NVDEC) across keyframe intervals.

Shards are built once per codec and GOP with the preprocess CLI from the five clips; the repeat lists them
`--repeat` times in the dataset index (as the frame folders are listed), so storage is per video and the page
cache holds every path's files alike. Measuring: every loader is built and warmed up first, then rounds
alternate between them; a round waits until no process of the benchmark uses the CPU (so no loader refills
its prefetch queue while another is timed), drains the prefetched batches untimed, then times `--iters`
consecutive batches. clips/s = median over rounds. `psnr_db`: what each path stores against the source
frames at its geometry (benchmark.quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import torch
from rich.progress import Progress

from benchmark import quality
from benchmark.common import (
    Plot,
    cpu_facts,
    device_sync,
    load_note,
    median,
    process_tree_cpu_s,
    write_results,
)
from benchmark.frame_folders import FrameFolder, FrameFolderDataset, extract, folder_bytes, frame_size
from pipeline import LoaderConfig, build_loader, sampling
from pipeline.loader import make_views
from pipeline.shards import ShardDataset
from pipeline.torch_loader import _exit_with_parent, decoded_frame_count, render_views
from preprocess.ffmpeg_args import EncodeSettings

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "data" / "videos" / "kinetics"
SHORT_SIDE, CROP = 256, 224
GOPS_CPU = (1, 2, 4, 8, 16)
GOPS_GPU = (1, 4, 8, 16, 32, 128)
PREFETCH = 4  # batches per worker, for every DataLoader here (TorchLoader's own setting)


def gop_list(text: str) -> tuple[int, ...]:
    """`--gops 1,4,16` -> (1, 4, 16); anything else is a usage error (one line, exit status 2)."""
    try:
        gops = tuple(int(g) for g in text.split(","))
    except ValueError:
        gops = ()
    if not gops or min(gops) < 1:
        raise argparse.ArgumentTypeError(
            f"expected keyframe intervals >= 1 separated by commas, got {text!r}"
        )
    return gops


def crf_list(text: str) -> tuple[int, ...]:
    """`--crfs 19,21` -> (19, 21); anything else is a usage error."""
    try:
        crfs = tuple(int(c) for c in text.split(","))
    except ValueError:
        crfs = ()
    if not crfs or not all(0 <= c <= 51 for c in crfs):
        raise argparse.ArgumentTypeError(f"expected H.264 CRFs in 0..51 separated by commas, got {text!r}")
    return crfs


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--batch", type=int, default=8, help="clips per batch (default 8)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (TSN segments, default 8)")
    parser.add_argument(
        "--workers", type=int, default=2, help="DALI threads / DataLoader workers (default 2)"
    )
    parser.add_argument(
        "--repeat", type=int, default=20, help="times each of the 5 Kinetics clips is listed (default 20)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternating timed rounds (default 5, quick 3)"
    )
    parser.add_argument(
        "--gops",
        type=gop_list,
        default=None,
        help=f"H.264 keyframe intervals (default {','.join(map(str, GOPS_CPU))} on a CPU, "
        f"{','.join(map(str, GOPS_GPU))} on a GPU; the preprocess default is always added)",
    )
    parser.add_argument(
        "--crfs",
        type=crf_list,
        default=(),
        help="H.264 CRFs to add at the default keyframe interval (e.g. 19,21; default: the preprocess "
        "default only)",
    )
    parser.add_argument("--data-dir", default=None, help="keep the built datasets here (default: a temp dir)")


# ----------------------------------------------------------------------------------------------- datasets


def source_videos() -> list[tuple[Path, str]]:
    """(path, label name) of the five Kinetics clips, in a fixed order; without them, a one-line SystemExit
    saying what the benchmarks that read real video need."""
    found = sorted(VIDEOS.glob("*.m[pk][4v]"))
    if not found:
        raise SystemExit(
            f"this benchmark reads the real Kinetics clips of ../shared/data/videos/kinetics next to the "
            f"project ({VIDEOS.resolve()}), and there are none: put the shared data there "
            f"(python -m benchmark model --quick needs no data)"
        )
    return [(p, p.stem.split("_")[0]) for p in found]


def build_shards(
    out: Path,
    *,
    codec: str,
    gop: int,
    copies: int = 1,
    short_side: int = SHORT_SIDE,
    crf: int | None = None,
) -> Path:
    """The five clips sharded by the preprocess CLI at Kinetics geometry; returns index.json (reused if
    present). copies > 1 shards that many distinct copies (symlinks, one sample each), for reads that one
    file's page cache must not serve (the reader benchmark's cold reads); repeated_index lists the same files
    again instead. The H.264 preset and CRF (unless given) are EncodeSettings' defaults, passed explicitly:
    the shards are what preprocess's defaults make."""
    index = out / "index.json"
    if index.is_file():
        return index
    out.parent.mkdir(parents=True, exist_ok=True)
    root = VIDEOS
    rows = [(p.name, label) for p, label in source_videos()]
    if copies > 1:
        root = out.parent / f"{out.name}-videos"
        root.mkdir(exist_ok=True)
        rows = [(f"r{r}_{name}", label) for r in range(copies) for name, label in rows]
        for name, _ in rows:
            if not (root / name).exists():
                (root / name).symlink_to(VIDEOS / name.split("_", 1)[1])
    lst = out.parent / f"{out.name}.csv"
    lst.write_text("path,label\n" + "".join(f"{name},{label}\n" for name, label in rows))
    cmd = [sys.executable, "-m", "preprocess", "list", "--split", f"train={lst}", "--root", str(root)]
    cmd += ["--out", str(out), "--name", "bench", "--codec", codec, "--short-side", str(short_side)]
    defaults = EncodeSettings()
    cmd += [
        "--gop",
        str(gop),
        "--crf",
        str(defaults.crf if crf is None else crf),
        "--preset",
        defaults.preset,
    ]
    cmd += ["--workers", "2", "--no-progress"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return index


def repeated_index(index: Path, repeat: int) -> Path:
    """index_x<repeat>.json beside index.json: the same shards listed `repeat` times in the train split."""
    meta = json.loads(index.read_text())
    train = meta["splits"]["train"]
    meta["splits"] = {
        "train": {"num_samples": train["num_samples"] * repeat, "shards": train["shards"] * repeat}
    }
    path = index.with_name(f"index_x{repeat}.json")
    path.write_text(json.dumps(meta))
    return path


def shard_bytes_per_video(index: Path) -> float:
    """Bytes on disk per video: the tars (with their headers and metadata members) over the videos in them."""
    shards = json.loads(index.read_text())["splits"]["train"]["shards"]
    return sum((index.parent / s["tar"]).stat().st_size for s in shards) / sum(
        s["num_samples"] for s in shards
    )


def build_frame_folders(out: Path) -> list[FrameFolder]:
    classes = sorted({label for _, label in source_videos()})
    return [extract(p, out / p.stem, classes.index(label), SHORT_SIDE) for p, label in source_videos()]


@functools.cache
def shards_psnr(index: Path) -> float:
    """PSNR of a shard set's videos against their sources at preprocess's geometry for them."""
    videos = quality.shard_videos(index)
    return quality.videos_psnr(videos, {src: frame_size(src, SHORT_SIDE) for src, _ in videos})


@functools.cache
def frame_folders_psnr(folders: tuple[FrameFolder, ...]) -> float:
    """PSNR of the frame folders' JPEGs against their sources (once: both frame-folder rows read them)."""
    sources = [str(p) for p, _ in source_videos()]
    assert [Path(s).stem for s in sources] == [f.key for f in folders]
    return quality.folders_psnr(
        zip(sources, (f.folder for f in folders)), {s: frame_size(s, SHORT_SIDE) for s in sources}
    )


# ----------------------------------------------------------------------------------------------- baselines


class NaivePyAVDataset(torch.utils.data.Dataset):
    """The first loader one writes: decode every frame up to the last sampled one to RGB, then pick."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg, self.dataset = cfg, ShardDataset(cfg.index, "train")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, sid: int):
        sample = self.dataset[sid]
        views = make_views(self.cfg, "train", 0, sid, sample)
        idx = sampling.frame_indices(sample.num_frames, views.u, sampling="tsn").ravel()
        frames = []
        with av.open(io.BytesIO(bytes(sample.video))) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_rgb().to_ndarray())
                if len(frames) > idx.max():
                    break
        return render_views(np.stack([frames[j] for j in idx]), views, self.cfg.num_segments)[0], sample.label


def dataloader(dataset: torch.utils.data.Dataset, cfg: LoaderConfig) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),  # the same order on every run
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=PREFETCH if cfg.workers else None,
        drop_last=True,
        multiprocessing_context="forkserver" if cfg.workers else None,
        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()),
    )


# ----------------------------------------------------------------------------------------------- measuring


def endless(loader, set_epoch: bool) -> Iterator:
    """Batches forever, restarting epochs (what a training loop sees)."""
    epoch = 0
    while True:
        if set_epoch:
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def wait_until_idle(window_s: float = 0.25, busy_s: float = 0.02, timeout_s: float = 120.0) -> None:
    """Until this benchmark's processes (DataLoader workers are children of the forkserver, a child of this
    process) use under `busy_s` CPU seconds in `window_s`: every loader has refilled its prefetch queue and
    stopped."""
    deadline = time.monotonic() + timeout_s
    last = process_tree_cpu_s(os.getpid())
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = process_tree_cpu_s(os.getpid())
        if now - last < busy_s:
            return
        last = now
    log.warning("the benchmark's processes did not go idle within %.0f s; timing anyway", timeout_s)


@dataclasses.dataclass
class Row:
    """One data path: its batches, what it stores and decodes, and its timed rounds."""

    info: dict
    batches: Iterator
    drain: int  # batches a full prefetch queue holds
    sync: Callable[[], None] | None = None
    rounds_s: list[float] = dataclasses.field(default_factory=list)

    def round(self, iters: int) -> None:
        for _ in range(self.drain):
            next(self.batches)
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        for _ in range(iters):
            next(self.batches)
        if self.sync is not None:
            self.sync()
        self.rounds_s.append(time.perf_counter() - start)


def decoded_frames_per_clip(cfg: LoaderConfig, path: str) -> float | None:
    """Frames each path decodes per clip, averaged over one epoch's training draws (the same draws the
    loaders use): the sampled frames for frame folders and MJPEG, the runs from each keyframe for the
    fallback on H.264, every frame up to the last sampled one for the naive decoder. None: not known."""
    if path == "dali-cpu" or path.startswith("dali-gpu"):
        return None
    ds = ShardDataset(cfg.index, "train")
    counts = []
    for sid in range(len(ds)):
        sample = ds[sid]
        idx = sampling.frame_indices(
            sample.num_frames, make_views(cfg, "train", 0, sid, sample).u, sampling="tsn"
        )
        if path == "naive pyav":
            counts.append(int(idx.max()) + 1)
        else:
            counts.append(decoded_frame_count(sample.video, idx))
    return float(np.mean(counts))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row's data path and what it reads: frame folders (codec jpeg) or shards of a codec, GOP, CRF."""

    path: str
    codec: str
    gop: int = 0
    crf: int | None = None  # H.264 only; None: the preprocess default

    @property
    def series(self) -> str:
        name = self.path + (f" {self.codec}" if self.codec != "jpeg" else "")
        name += f" gop {self.gop}" if self.codec == "h264" else ""
        return name + (f" crf {self.crf}" if self.crf is not None else "")

    @property
    def h264_crf(self) -> int | None:
        """The CRF the row's shards are encoded at (None: not H.264)."""
        if self.codec != "h264":
            return None
        return EncodeSettings().crf if self.crf is None else self.crf

    @property
    def folder(self) -> str:
        return f"{self.codec}-g{self.gop}" + (f"-crf{self.crf}" if self.crf is not None else "")


def plan(gops: tuple[int, ...], gpu: bool, crfs: tuple[int, ...] = ()) -> list[Variant]:
    """The rows, the frame folders first."""
    default = EncodeSettings()
    rows = [Variant("frame folders", "jpeg"), Variant("frame folders, gcvideo render", "jpeg")]
    rows.append(Variant("naive pyav", "h264", default.gop))
    rows += [Variant("torch", "h264", g) for g in gops]
    rows += [Variant("torch", "h264", default.gop, c) for c in crfs if c != default.crf]
    rows += [Variant("torch", "mjpeg", 1), Variant("dali-cpu", "mjpeg", 1)]
    if gpu:
        rows += [Variant("dali-gpu", "h264", g) for g in gops]
    return rows


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one run measures, from the command line."""

    device: torch.device
    quick: bool
    variants: list[Variant]
    rounds: int
    warmup: int
    iters: int
    repeat: int
    base: LoaderConfig


def run_spec(args: argparse.Namespace) -> RunSpec:
    device = torch.device(getattr(args, "device", "cpu"))
    gpu = device.type == "cuda"
    quick = getattr(args, "quick", not gpu)
    gops = getattr(args, "gops", None) or (GOPS_GPU if gpu else GOPS_CPU)
    gops = tuple(sorted(set(gops) | {EncodeSettings().gop}))
    return RunSpec(
        device=device,
        quick=quick,
        variants=plan(gops, gpu, getattr(args, "crfs", ())),
        rounds=getattr(args, "rounds", None) or (3 if quick else 5),
        warmup=args.warmup if getattr(args, "warmup", None) is not None else 3,
        iters=args.iters if getattr(args, "iters", None) is not None else (8 if quick else 12),
        repeat=getattr(args, "repeat", 20),
        base=LoaderConfig(
            num_segments=getattr(args, "frames", 8),
            batch_size=getattr(args, "batch", 8),
            workers=getattr(args, "workers", 2),
            crop_size=CROP,
            scale_size=SHORT_SIDE,
            seed=getattr(args, "seed", 0),
        ),
    )


def measure(spec: RunSpec, root: Path) -> list[dict]:
    """Build and warm up every row, then time alternating rounds; the summarised rows."""
    rows: list[Row] = []
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("loader benchmark", total=len(spec.variants) * (1 + spec.rounds))
            for variant in spec.variants:
                progress.update(task, description=f"building {variant.series}")
                rows.append(build_row(variant, spec, root))
                progress.advance(task)
            for r in range(spec.rounds):
                for row in rows:
                    progress.update(task, description=f"round {r + 1}/{spec.rounds}: {row.info['series']}")
                    wait_until_idle()
                    row.round(spec.iters)
                    log.info("round %d %-32s %.2f s", r + 1, row.info["series"], row.rounds_s[-1])
                    progress.advance(task)
        return summarise(rows, spec.base.batch_size * spec.iters)
    finally:
        for row in rows:
            row.batches.close()


def run_meta(spec: RunSpec, load_before: str) -> dict:
    base = spec.base
    return {
        "device": str(spec.device),
        "quick": spec.quick,
        "geometry": f"short side {SHORT_SIDE}, {base.num_segments} TSN segments, multi-scale crop to {CROP}, "
        "flip, normalise, float32",
        "batch": base.batch_size,
        "workers": base.workers,
        "videos": f"the 5 Kinetics clips of ../shared/data/videos/kinetics, each listed {spec.repeat} times",
        "shards": f"preprocess's defaults ({EncodeSettings()}) but for the row's codec, GOP and CRF",
        "warmup_batches": spec.warmup,
        "batches_per_round": spec.iters,
        "rounds": spec.rounds,
        "measure": "alternating rounds in one process; each waits for the benchmark's processes to go idle, "
        "drains the prefetch queue untimed, then times consecutive batches; clips/s = median over rounds",
        "reference": "frame folders: ffmpeg JPEG q 2 img_%05d.jpg + PIL in a DataLoader (TSN/TSM data path)",
        "psnr": "benchmark.quality: RGB, every frame, against the source frames at the stored geometry",
        # other jobs on the CPU show here (this benchmark alone keeps it near the number of workers)
        "load_average_1_5_15min": f"{load_before} at the start, {load_note()} at the end",
        **cpu_facts(),
    }


def main(args: argparse.Namespace) -> int:
    spec = run_spec(args)
    source_videos()  # the data, before anything is built
    data_dir = getattr(args, "data_dir", None)
    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="gcvideo-bench-loader-")
    load_before = load_note()
    try:
        results = measure(spec, Path(data_dir or tmp.name))
    finally:
        if tmp is not None:
            tmp.cleanup()
    reference = next(r["clips_per_s"] for r in results if r["path"] == "frame folders")
    base = spec.base
    write_results(
        "loader",
        results,
        meta=run_meta(spec, load_before),
        plots=[
            Plot(
                x="series",
                y="clips_per_s",
                logy=True,
                title=f"clips/s at {base.num_segments}x{CROP}, batch {base.batch_size}, "
                f"{base.workers} workers",
                references=(("frame folders", reference),),
            )
        ],
    )
    return 0


def build_row(variant: Variant, spec: RunSpec, root: Path) -> Row:
    base = spec.base
    info = {
        "path": variant.path,
        "codec": variant.codec,
        "gop": variant.gop if variant.codec == "h264" else None,
        "crf": variant.h264_crf,
        "series": variant.series,
    }
    drain = PREFETCH * base.workers
    sync = None
    if variant.codec == "jpeg":
        folders = build_frame_folders(root / "frames")
        info["bytes_per_video"] = float(np.mean([folder_bytes(f) for f in folders]))
        info["decoded_frames_per_clip"] = float(base.num_segments)
        info["psnr_db"] = frame_folders_psnr(tuple(folders))
        render = "gcvideo" if variant.path.endswith("gcvideo render") else "pil"
        dataset = FrameFolderDataset(base, folders * spec.repeat, render=render)
        batches = endless(dataloader(dataset, base), set_epoch=False)
    else:
        index = build_shards(root / variant.folder, codec=variant.codec, gop=variant.gop, crf=variant.crf)
        backend = "torch" if variant.path == "naive pyav" else variant.path
        cfg = dataclasses.replace(base, index=str(repeated_index(index, spec.repeat)), backend=backend)
        info["bytes_per_video"] = shard_bytes_per_video(index)
        info["decoded_frames_per_clip"] = decoded_frames_per_clip(cfg, variant.path)
        info["psnr_db"] = shards_psnr(index)
        if variant.path == "naive pyav":
            batches = endless(dataloader(NaivePyAVDataset(cfg), cfg), set_epoch=False)
        else:
            on = spec.device if variant.path == "dali-gpu" else torch.device("cpu")
            loader = build_loader(cfg, "train", "train", device=on, dtype=torch.float32)
            batches, sync = endless(loader, set_epoch=True), device_sync(on)
    for _ in range(spec.warmup + drain):
        next(batches)
    return Row(info=info, batches=batches, drain=drain, sync=sync)


def summarise(rows: list[Row], clips_per_round: int) -> list[dict]:
    """clips/s (median round), and the ratios to the frame folders."""
    out = []
    for row in rows:
        out.append(
            {
                **row.info,
                "clips_per_s": clips_per_round / median(row.rounds_s),
                "round_min_s": min(row.rounds_s),
                "round_max_s": max(row.rounds_s),
            }
        )
    speed, size, psnr = out[0]["clips_per_s"], out[0]["bytes_per_video"], out[0]["psnr_db"]
    for r in out:
        r["speed_vs_frame_folders"] = r["clips_per_s"] / speed
        r["storage_vs_frame_folders"] = r["bytes_per_video"] / size
        r["psnr_vs_frame_folders_db"] = r["psnr_db"] - psnr
        r["mb_per_video"] = r.pop("bytes_per_video") / 1e6
        log.info(
            "%-32s %6.1f clips/s (%.2fx)  %5.2f MB per video (%.2fx)  %.2f dB (%+.2f)",
            r["series"],
            r["clips_per_s"],
            r["speed_vs_frame_folders"],
            r["mb_per_video"],
            r["storage_vs_frame_folders"],
            r["psnr_db"],
            r["psnr_vs_frame_folders_db"],
        )
    return out
