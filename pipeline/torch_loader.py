"""The CPU fallback: a torch DataLoader over the same shards, PyAV decode, torch crop/resize/flip/normalise.

Same plan, draws and boxes as the DALI loaders (pipeline.loader.Loader); each DataLoader item is one whole
batch, so the workers parallelise across batches and the main process only assembles tensors.
"""

from __future__ import annotations

import bisect
import functools
import io
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

from pipeline.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Loader,
    LoaderConfig,
    ResourceError,
    TestViews,
    Views,
    make_views,
    resource_error,
    view_frame_indices,
)
from pipeline.shards import DatasetError, ShardDataset

log = logging.getLogger(__name__)

# Reusing one swscale context is 2.5x faster than frame.to_ndarray(format="rgb24") on small frames.
_REFORMATTER = VideoReformatter()


def decode_frames(video: np.ndarray | bytes, indices: np.ndarray) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of an encoded file as (len, H, W, 3) uint8 RGB.

    Frame numbers count frames in presentation order, as DALI's ``frames=`` does. The sample's bytes are read
    once; an MP4's sample table (what the container read at open: every frame's byte range and keyframe flag)
    lets the decoder be fed exactly the packets from the keyframe before each wanted frame to that frame, with
    no demuxing pass and no container seek (``_decode_indexed``). Files without a usable table (another
    container, B-frames) scan the packets for timestamps and seek (``_decode_seeking``), or decode forward.
    """
    indices = np.asarray(indices).ravel()
    wanted = sorted(set(int(i) for i in indices))
    data = bytes(video)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        # One DataLoader worker per core: the decoder's own threads would only contend with the other workers.
        stream.codec_context.thread_type = "NONE"
        table = frame_table(stream)
        got = _decode_indexed(stream.codec_context, data, table, wanted) if table is not None else None
        if got is None:
            got = _decode_demuxed(container, stream, wanted)
    if len(got) < len(wanted):
        raise ValueError(
            f"the video has fewer frames than its metadata says (wanted index {wanted[-1]}); "
            f"it is truncated or num_frames is wrong"
        )
    return np.stack([got[int(i)] for i in indices])


SEEK_GAP = 4  # frames: decoding a few frames through is cheaper than a container seek and a decoder flush


@dataclass(frozen=True)
class FrameTable:
    """Every frame's packet in decode order: byte ``offsets`` and ``sizes`` in the file, ``keyframes``
    (indices)."""

    offsets: list[int]
    sizes: list[int]
    keyframes: list[int]


def frame_table(stream) -> FrameTable | None:
    """The stream's index as a FrameTable, when it lists every frame once (an MP4 sample table; Matroska's
    cues list only keyframes) with increasing timestamps and no edit-list discards; else None."""
    entries = stream.index_entries
    if not stream.frames or len(entries) != stream.frames:
        return None
    rows = [(e.pos, e.size, e.timestamp, e.is_keyframe, e.is_discard) for e in entries]
    if any(r[4] for r in rows) or any(a[2] >= b[2] for a, b in zip(rows, rows[1:])) or not rows[0][3]:
        return None
    return FrameTable([r[0] for r in rows], [r[1] for r in rows], [i for i, r in enumerate(rows) if r[3]])


def decode_runs(keyframes: list[int], wanted: list[int]) -> list[tuple[int, int]]:
    """The (first, last) frame runs that decode the ``wanted`` frames (sorted, unique): a run starts at the
    keyframe before its first wanted frame; the next wanted frame extends it unless that would decode frames
    a jump to a later keyframe skips (with the sample table a jump costs only a decoder flush)."""
    runs: list[tuple[int, int]] = []
    for target in wanted:
        key = keyframes[bisect.bisect_right(keyframes, target) - 1]
        if runs and key <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], target)
        else:
            runs.append((key, target))
    return runs


def decoded_frame_count(video: np.ndarray | bytes, indices: np.ndarray) -> int | None:
    """How many frames ``decode_frames`` decodes for ``indices`` (None: the file has no usable sample
    table)."""
    with av.open(io.BytesIO(bytes(video))) as container:
        table = frame_table(container.streams.video[0])
    if table is None:
        return None
    runs = decode_runs(table.keyframes, sorted(set(int(i) for i in np.asarray(indices).ravel())))
    return sum(last - first + 1 for first, last in runs)


def _decode_indexed(codec, data: bytes, table: FrameTable, wanted: list[int]) -> dict[int, np.ndarray] | None:
    """Feed the decoder each run's packets straight from the sample's bytes (``decode_runs``).

    Frame i is packet i only when the decoder outputs one frame per packet with no delay (no B-frames, no
    frame threads); any other count returns None and the caller falls back to timestamps.
    """
    if wanted[-1] >= len(table.offsets):
        return {}
    want, got = set(wanted), {}
    for first, last in decode_runs(table.keyframes, wanted):
        codec.flush_buffers()
        for i in range(first, last + 1):
            start = table.offsets[i]
            frames = codec.decode(av.Packet(data[start : start + table.sizes[i]]))
            if len(frames) != 1:
                codec.flush_buffers()
                return None
            if i in want:
                got[i] = rgb24(frames[0])
    return got


def rgb24(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB, through the reused swscale context."""
    return _REFORMATTER.reformat(frame, format="rgb24").to_ndarray()


@dataclass(frozen=True)
class PacketScan:
    """One pass over a stream's packets, nothing decoded: how many frames, and to seek by, every frame's
    timestamp in presentation order and the keyframes' (both [] when a timestamp is missing or repeated)."""

    count: int
    pts: list[int]
    key_pts: list[int]


def scan_packets(container, stream) -> PacketScan:
    packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
    pts = sorted(p for p, _ in packets) if all(p is not None for p, _ in packets) else []
    if len(set(pts)) != len(pts):
        pts = []
    return PacketScan(len(packets), pts, [p for p, k in packets if k] if pts else [])


def decode_scanned(
    container, stream, wanted: list[int], scan: PacketScan, convert: Callable = rgb24
) -> dict[int, np.ndarray]:
    """Frames `wanted` (sorted, unique) as convert(frame): by seeking with the scan's timestamps, or decoding
    forward from the start without usable ones."""
    if not scan.pts or wanted[-1] >= len(scan.pts):
        return _decode_forward(container, stream, wanted, convert)
    return _decode_seeking(container, stream, wanted, scan.pts, scan.key_pts, convert)


def _decode_demuxed(container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
    """Map frame numbers to timestamps by scanning the packets (no decoding), then seek; without usable
    timestamps decode forward."""
    return decode_scanned(container, stream, wanted, scan_packets(container, stream))


def _decode_forward(container, stream, wanted: list[int], convert: Callable = rgb24) -> dict[int, np.ndarray]:
    container.seek(0)
    got, want = {}, set(wanted)
    for i, frame in enumerate(container.decode(stream)):
        if i in want:
            got[i] = convert(frame)
        if i >= wanted[-1]:
            break
    return got


def _decode_seeking(
    container, stream, wanted: list[int], pts: list[int], key_pts: list[int], convert: Callable = rgb24
) -> dict[int, np.ndarray]:
    index_of = {p: i for i, p in enumerate(pts)}
    want = set(wanted)
    key_index = sorted(index_of[p] for p in key_pts if p in index_of)
    got: dict[int, np.ndarray] = {}
    frames, position = None, None  # decoder generator, index of the last decoded frame
    for target in wanted:
        if target in got:
            continue
        key = key_index[max(bisect.bisect_right(key_index, target) - 1, 0)] if key_index else 0
        if frames is None or position >= target or key - position > SEEK_GAP:
            container.seek(pts[key], stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            position = index_of.get(frame.pts, -1)
            if position in want and position not in got:
                got[position] = convert(frame)
            if position >= target:
                break
    return got


def render_views(frames_FHWC: np.ndarray, views: Views, num_segments: int) -> torch.Tensor:
    """(clips*T, H, W, 3) uint8 -> (clips*crops, T, S, S, 3) float32, normalised, clip-major views (T: frames
    per clip, num_segments * frames_per_segment).

    Crops are resized in uint8 (antialiased bilinear, as PIL's and DALI's resize; channels-last, which torch's
    uint8 kernel is fast on) and normalised in one fused op at the end: 10x cheaper than resizing in float32,
    within 1/255 of it.
    """
    frames = torch.from_numpy(frames_FHWC).permute(0, 3, 1, 2)  # a channels-last view, no copy
    crops = []
    for (x0, y0, x1, y1), flip in zip(views.boxes.tolist(), views.flips.tolist()):
        x = frames[:, :, y0:y1, x0:x1]
        if (y1 - y0, x1 - x0) != (views.out_size, views.out_size):
            x = F.interpolate(
                x, size=(views.out_size, views.out_size), mode="bilinear", antialias=True, align_corners=False
            )
        crops.append((x.flip(-1) if flip else x).permute(0, 2, 3, 1))  # contiguous (clips*T, S, S, 3)
    x = torch.stack(crops)  # (crops, clips*T, S, S, 3) uint8
    scale, shift = _normalisation_rows(views.out_size)
    x = x.float()
    x.view(-1, scale.numel()).mul_(scale).add_(shift)  # (x - mean) / std, in place
    x = x.view(x.shape[0], -1, num_segments, *x.shape[2:]).transpose(0, 1)
    return x.reshape(-1, num_segments, *x.shape[3:])


@functools.lru_cache(maxsize=8)
def _normalisation_rows(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / (255 std) and -mean / std repeated along one image row of RGB pixels: broadcasting a whole row
    is 3x faster than broadcasting the 3 channels of every pixel."""
    std = torch.tensor(IMAGENET_STD)
    return (1 / (255 * std)).repeat(size), (-torch.tensor(IMAGENET_MEAN) / std).repeat(size)


class _Decoder(torch.utils.data.Dataset):
    """Item (epoch, sample ids) = that batch decoded: [(sample_id, views tensor or error text, label, key)].

    Only configuration and the shard reader travel to the workers; the epoch comes with every item, so
    persistent workers stay correct across set_epoch.
    """

    def __init__(self, cfg: LoaderConfig, mode: str, dataset: ShardDataset, views: TestViews):
        self.cfg, self.mode, self.dataset, self.test_views = cfg, mode, dataset, views

    def __getitem__(self, job: tuple[int, tuple[int, ...]]):
        """(the loaded samples' views stacked, or None; results with None in place of each loaded tensor).
        In a worker the stack is written straight into shared memory, which is how it reaches the training
        process: one copy instead of one per sample there plus a stack in the training process."""
        epoch, ids = job
        results = [self.load_one(epoch, sid) for sid in ids]
        loaded = [r[1] for r in results if isinstance(r[1], torch.Tensor)]
        x = None
        if loaded:
            x = torch.empty((len(loaded), *loaded[0].shape), dtype=loaded[0].dtype)
            if torch.utils.data.get_worker_info() is not None:
                x.share_memory_()
            torch.stack(loaded, out=x)
        return x, [
            (sid, None if isinstance(v, torch.Tensor) else v, label, key) for sid, v, label, key in results
        ]

    def load_one(self, epoch: int, sid: int):
        try:
            sample = self.dataset[sid]
            views = make_views(self.cfg, self.mode, epoch, sid, sample, self.test_views)
            idx = view_frame_indices(self.cfg, sample.num_frames, views)
            x = render_views(decode_frames(sample.video, idx), views, self.cfg.clip_length)
            return sid, x, sample.label, sample.key
        except (ValueError, KeyError, OSError, MemoryError, av.FFmpegError) as e:
            ref = self.dataset.refs[sid]
            lack = resource_error(e, ref.key, ref.tar)  # raised by the main process, like a DatasetError
            return sid, lack if lack is not None else f"{type(e).__name__}: {e}", -1, ""
        except DatasetError as e:  # not a broken file but a broken dataset: the main process raises it
            return sid, e, -1, ""


class _Jobs(torch.utils.data.Sampler):
    """The current epoch's jobs, set by the loader before each epoch. No reference back to the loader: a
    DataLoader with persistent workers that is freed by the cycle collector takes 5 s per worker to shut
    down."""

    def __init__(self):
        self.jobs: list[tuple[int, tuple[int, ...]]] = []

    def __iter__(self):
        return iter(self.jobs)


def _exit_with_parent(parent_pid: int, worker_id: int) -> None:
    """Workers are children of the forkserver, not of the training process, so neither the kernel nor
    torch's own watchdog (which watches the direct parent) ends them when training dies: a killed run would
    leave them (and the forkserver) behind. Poll the training process instead.

    Ctrl-C and `scancel` signal the whole process group: the training process alone decides when its loader
    ends (it checkpoints first, reading batches until then), so the workers ignore SIGINT and SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # the pid was reused by another user's process: the parent is gone
                os._exit(0)

    threading.Thread(target=watch, name=f"parent-watch-{worker_id}", daemon=True).start()
    threading.excepthook = _quiet_fd_server_errors


def _quiet_fd_server_errors(args) -> None:
    """A worker hands each batch's shared memory to the training process through multiprocessing's
    resource-sharer thread (a file descriptor server). When training stops (SIGTERM, the end of a run) that
    thread can fail in accept() as the worker shuts down, and its traceback would land in the user's
    terminal: nothing is lost then, so it is logged at debug level. Other threads' errors print as usual."""
    if args.thread is not None and args.thread.name.endswith("(_serve)"):
        log.debug("resource sharer: %s: %s", args.exc_type.__name__, args.exc_value)
        return
    threading.__excepthook__(args)


def _worker_context():
    """Workers fork from a clean forkserver: forking this process after DALI or OpenMP threads started can
    deadlock the children; the preload makes each worker start in milliseconds instead of re-importing
    torch."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "av", "numpy", "pipeline.torch_loader"])
    return ctx


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, cfg: LoaderConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.decoder = _Decoder(cfg, self.mode, self.dataset, self.test_views)
        self.plan: list[np.ndarray] = []
        self._jobs = _Jobs()
        self._data = None
        if cfg.workers > 0:
            self._data = torch.utils.data.DataLoader(
                self.decoder,
                sampler=self._jobs,
                batch_size=None,
                num_workers=cfg.workers,
                collate_fn=_identity,
                prefetch_factor=4,
                persistent_workers=True,
                multiprocessing_context=_worker_context(),
                worker_init_fn=functools.partial(_exit_with_parent, os.getpid()),
            )

    def _take(self, results, out: list) -> None:
        for sid, x, label, key in results:
            self._reads += 1
            if isinstance(x, (DatasetError, ResourceError)):
                raise x
            if isinstance(x, str):
                self.mark_bad(sid, x)
            else:
                out.append((x, label, key))

    def _load(self, sid: int):
        got: list = []
        self._take([self.decoder.load_one(self.epoch, sid)], got)
        return got[0] if got else None

    def __iter__(self):
        self.plan = self.batches()
        # samples already known to be broken are not sent to the workers (counted as skipped below)
        self._jobs.jobs = [(self.epoch, tuple(int(i) for i in ids if i not in self.bad)) for ids in self.plan]
        data = self._data if self._data is not None else map(self.decoder.__getitem__, self._jobs.jobs)
        for (x_loaded, results), ids in zip(data, self.plan):  # data first: it must see StopIteration
            self.skipped += len(ids) - len(results)  # known broken, not sent to the workers
            got: list = []
            self._take(results, got)  # the loaded ones as (None, label, key): their views are x_loaded
            loaded = len(got)
            got = self.refill(ids, got, self._load)
            if not got:
                continue
            parts = [x_loaded] if loaded else []
            if len(got) > loaded:  # stand-ins for broken samples, decoded here
                parts.append(torch.stack([g[0] for g in got[loaded:]]))
            x = parts[0] if len(parts) == 1 else torch.cat(parts)
            yield self.to_output(x, [g[1] for g in got], [g[2] for g in got])


def _identity(item):
    return item
