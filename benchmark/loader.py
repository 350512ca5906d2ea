"""Loader throughput at Kinetics geometry against the data paths users run today.

Every row reads the five real Kinetics clips of ../shared/data, each listed `--repeat` times (default 20), at
short side 256, T=8 TSN segments, multi-scale crop to 224 + flip + normalise, batch 8, 2 workers:

- `frame folders`: the TSN/TSM/GC data path (benchmark.frame_folders): JPEG frames extracted by ffmpeg at
  quality 2, opened with PIL in a DataLoader. The reference every ratio is taken against.
- `naive pyav`: a DataLoader whose workers decode every frame up to the last sampled one (what a first video
  loader does).
- `torch`: gcvideo's fallback (pipeline.torch_loader) on H.264 shards per keyframe interval and on MJPEG.
- `dali-cpu`: gcvideo's DALI CPU loader on MJPEG; on a GPU also `dali-gpu` (NVDEC) across keyframe intervals.

Shards are built once per codec and GOP with the preprocess CLI from the five clips; the repeat lists them
`--repeat` times in the dataset index (as the frame folders are listed), so storage is per video and the page
cache holds every path's files alike. Measuring: every loader is built and warmed up first, then rounds
alternate between them; a round waits until no process of the benchmark uses the CPU (so no loader refills
its prefetch queue while another is timed), drains the prefetched batches untimed, then times `--iters`
consecutive batches. clips/s = median over rounds.
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

from benchmark.common import Plot, device_sync, median, write_results
from benchmark.frame_folders import FrameFolder, FrameFolderDataset, extract, folder_bytes
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


def build_shards(out: Path, *, codec: str, gop: int, copies: int = 1, short_side: int = SHORT_SIDE) -> Path:
    """The five clips sharded by the preprocess CLI at Kinetics geometry; returns index.json (reused if
    present). copies > 1 shards that many distinct copies (symlinks, one sample each), for reads that one
    file's page cache must not serve (the reader benchmark's cold reads); repeated_index lists the same files
    again instead."""
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
    cmd += ["--gop", str(gop), "--workers", "2", "--no-progress"]
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


def _descendants_cpu_s(root: int) -> float:
    """CPU seconds used so far by `root` and every process below it (DataLoader workers are children of the
    forkserver, which is a child of this process)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def wait_until_idle(window_s: float = 0.25, busy_s: float = 0.02, timeout_s: float = 120.0) -> None:
    """Until this benchmark's processes use under `busy_s` CPU seconds in `window_s`: every loader has
    refilled its prefetch queue and stopped."""
    deadline = time.monotonic() + timeout_s
    last = _descendants_cpu_s(os.getpid())
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = _descendants_cpu_s(os.getpid())
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


def plan(gops: tuple[int, ...], gpu: bool) -> list[tuple[str, str, int]]:
    """(path, codec, gop) per row; the frame folders first."""
    rows = [("frame folders", "jpeg", 0), ("frame folders, gcvideo render", "jpeg", 0)]
    rows.append(("naive pyav", "h264", EncodeSettings().gop))
    rows += [("torch", "h264", g) for g in gops]
    rows += [("torch", "mjpeg", 1), ("dali-cpu", "mjpeg", 1)]
    if gpu:
        rows += [("dali-gpu", "h264", g) for g in gops]
    return rows


def main(args: argparse.Namespace) -> int:
    device = torch.device(getattr(args, "device", "cpu"))
    gpu = device.type == "cuda"
    quick = getattr(args, "quick", not gpu)
    gops = getattr(args, "gops", None) or (GOPS_GPU if gpu else GOPS_CPU)
    gops = tuple(sorted(set(gops) | {EncodeSettings().gop}))
    rounds = getattr(args, "rounds", None) or (3 if quick else 5)
    warmup = args.warmup if getattr(args, "warmup", None) is not None else 3
    iters = args.iters if getattr(args, "iters", None) is not None else (8 if quick else 12)
    repeat = getattr(args, "repeat", 20)
    base = LoaderConfig(
        num_segments=getattr(args, "frames", 8),
        batch_size=getattr(args, "batch", 8),
        workers=getattr(args, "workers", 2),
        crop_size=CROP,
        scale_size=SHORT_SIDE,
        seed=getattr(args, "seed", 0),
    )
    source_videos()  # the data, before anything is built
    data_dir = getattr(args, "data_dir", None)
    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="gcvideo-bench-loader-")
    root = Path(data_dir or tmp.name)
    rows: list[Row] = []
    load_before = os.getloadavg()[0]
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("loader benchmark", total=len(plan(gops, gpu)) * (1 + rounds))
            for path, codec, gop in plan(gops, gpu):
                progress.update(task, description=f"building {path} {codec} gop {gop}")
                rows.append(build_row(path, codec, gop, base, root, repeat, device, warmup))
                progress.advance(task)
            for r in range(rounds):
                for row in rows:
                    progress.update(task, description=f"round {r + 1}/{rounds}: {row.info['path']}")
                    wait_until_idle()
                    row.round(iters)
                    log.info("round %d %-26s %.2f s", r + 1, row.info["series"], row.rounds_s[-1])
                    progress.advance(task)
        results = summarise(rows, base.batch_size * iters)
    finally:
        for row in rows:
            row.batches.close()
        if tmp is not None:
            tmp.cleanup()
    meta = {
        "device": str(device),
        "quick": quick,
        "geometry": f"short side {SHORT_SIDE}, {base.num_segments} TSN segments, multi-scale crop to {CROP}, "
        "flip, normalise, float32",
        "batch": base.batch_size,
        "workers": base.workers,
        "videos": f"the 5 Kinetics clips of ../shared/data/videos/kinetics, each listed {repeat} times",
        "warmup_batches": warmup,
        "batches_per_round": iters,
        "rounds": rounds,
        "measure": "alternating rounds in one process; each waits for the benchmark's processes to go idle, "
        "drains the prefetch queue untimed, then times consecutive batches; clips/s = median over rounds",
        "reference": "frame folders: ffmpeg JPEG q 2 img_%05d.jpg + PIL in a DataLoader (TSN/TSM data path)",
        # other jobs on the CPU show here (this benchmark alone keeps it near the number of workers)
        "load_average_1min": f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
    }
    reference = next(r["clips_per_s"] for r in results if r["path"] == "frame folders")
    write_results(
        "loader",
        results,
        meta=meta,
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


def build_row(
    path: str,
    codec: str,
    gop: int,
    base: LoaderConfig,
    root: Path,
    repeat: int,
    device: torch.device,
    warmup: int,
) -> Row:
    info = {"path": path, "codec": codec, "gop": gop if codec == "h264" else None}
    info["series"] = (
        path + (f" {codec}" if codec != "jpeg" else "") + (f" gop {gop}" if codec == "h264" else "")
    )
    drain = PREFETCH * base.workers
    if codec == "jpeg":
        folders = build_frame_folders(root / "frames")
        info["bytes_per_video"] = float(np.mean([folder_bytes(f) for f in folders]))
        info["decoded_frames_per_clip"] = float(base.num_segments)
        render = "gcvideo" if path.endswith("gcvideo render") else "pil"
        dataset = FrameFolderDataset(base, folders * repeat, render=render)
        batches = endless(dataloader(dataset, base), set_epoch=False)
        sync = None
    else:
        index = build_shards(root / f"{codec}-g{gop}", codec=codec, gop=gop)
        cfg = dataclasses.replace(
            base, index=str(repeated_index(index, repeat)), backend="torch" if path == "naive pyav" else path
        )
        info["bytes_per_video"] = shard_bytes_per_video(index)
        info["decoded_frames_per_clip"] = decoded_frames_per_clip(cfg, path)
        if path == "naive pyav":
            batches = endless(dataloader(NaivePyAVDataset(cfg), cfg), set_epoch=False)
            sync = None
        else:
            on = device if path == "dali-gpu" else torch.device("cpu")
            loader = build_loader(cfg, "train", "train", device=on, dtype=torch.float32)
            batches, sync = endless(loader, set_epoch=True), device_sync(on)
    for _ in range(warmup + drain):
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
    speed, size = out[0]["clips_per_s"], out[0]["bytes_per_video"]
    for r in out:
        r["speed_vs_frame_folders"] = r["clips_per_s"] / speed
        r["storage_vs_frame_folders"] = r["bytes_per_video"] / size
        r["mb_per_video"] = r.pop("bytes_per_video") / 1e6
        log.info(
            "%-26s %6.1f clips/s (%.2fx)  %5.2f MB per video (%.2fx)",
            r["series"],
            r["clips_per_s"],
            r["speed_vs_frame_folders"],
            r["mb_per_video"],
            r["storage_vs_frame_folders"],
        )
    return out
