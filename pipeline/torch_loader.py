"""The CPU fallback: a torch DataLoader over the same shards, PyAV decode, torch crop/resize/flip/normalise.

Same plan, draws and boxes as the DALI loaders (pipeline.loader.Loader); each DataLoader item is one whole
batch, so the workers parallelise across batches and the main process only assembles tensors.
"""

from __future__ import annotations

import bisect
import functools
import io
import multiprocessing
import os
import threading
import time

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

from pipeline import sampling
from pipeline.loader import IMAGENET_MEAN, IMAGENET_STD, Loader, LoaderConfig, Views, make_views
from pipeline.shards import DatasetError, ShardDataset

# Reusing one swscale context is 2.5x faster than frame.to_ndarray(format="rgb24") on small frames.
_REFORMATTER = VideoReformatter()
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def decode_frames(video: np.ndarray | bytes, indices: np.ndarray) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of an encoded file as (len, H, W, 3) uint8 RGB.

    Frame numbers count frames in presentation order, as DALI's ``frames=`` does. The packets are scanned
    first (no decoding) to map frame numbers to timestamps and find the keyframes; decoding then seeks to the
    keyframe before a wanted frame whenever that skips more than SEEK_GAP frames, so sparse TSN sampling of a
    long video decodes a few GOPs instead of the whole file. Without usable timestamps it decodes forward.
    """
    indices = np.asarray(indices).ravel()
    wanted = sorted(set(int(i) for i in indices))
    with av.open(io.BytesIO(bytes(video))) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
        pts = sorted(p for p, _ in packets) if all(p is not None for p, _ in packets) else []
        if len(set(pts)) != len(pts) or not pts or wanted[-1] >= len(pts):
            got = _decode_forward(container, stream, wanted)
        else:
            got = _decode_seeking(container, stream, wanted, pts, [p for p, k in packets if k])
    if len(got) < len(wanted):
        raise ValueError(
            f"the video has fewer frames than its metadata says (wanted index {wanted[-1]}); "
            f"it is truncated or num_frames is wrong"
        )
    return np.stack([got[int(i)] for i in indices])


SEEK_GAP = 4  # frames: decoding a few frames through is cheaper than a seek and a decoder flush


def _decode_forward(container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
    container.seek(0)
    got, want = {}, set(wanted)
    for i, frame in enumerate(container.decode(stream)):
        if i in want:
            got[i] = _REFORMATTER.reformat(frame, format="rgb24").to_ndarray()
        if i >= wanted[-1]:
            break
    return got


def _decode_seeking(
    container, stream, wanted: list[int], pts: list[int], key_pts: list[int]
) -> dict[int, np.ndarray]:
    index_of = {p: i for i, p in enumerate(pts)}
    want = set(wanted)
    key_index = sorted(index_of[p] for p in key_pts if p in index_of)
    got: dict[int, np.ndarray] = {}
    frames, position = None, None  # decoder generator, index of the last decoded frame
    for target in wanted:
        if target in got:
            continue
        key = key_index[max(bisect.bisect_right(key_index, target) - 1, 0)]
        if frames is None or position >= target or key - position > SEEK_GAP:
            container.seek(pts[key], stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            position = index_of.get(frame.pts, -1)
            if position in want and position not in got:
                got[position] = _REFORMATTER.reformat(frame, format="rgb24").to_ndarray()
            if position >= target:
                break
    return got


def render_views(frames_FHWC: np.ndarray, views: Views, num_segments: int) -> torch.Tensor:
    """(clips*T, H, W, 3) uint8 -> (clips*crops, T, S, S, 3) float32, normalised, clip-major views (T: frames
    per clip, num_segments * frames_per_segment)."""
    frames = torch.from_numpy(frames_FHWC).permute(0, 3, 1, 2)
    crops = []
    for (x0, y0, x1, y1), flip in zip(views.boxes.tolist(), views.flips.tolist()):
        x = frames[:, :, y0:y1, x0:x1].float()
        x = F.interpolate(
            x, size=(views.out_size, views.out_size), mode="bilinear", antialias=True, align_corners=False
        )
        if flip:
            x = x.flip(-1)
        crops.append(x.sub_(_MEAN).div_(_STD).permute(0, 2, 3, 1))
    x = torch.stack(crops)  # (crops, clips*T, S, S, 3)
    x = x.view(x.shape[0], -1, num_segments, *x.shape[2:]).transpose(0, 1)
    return x.reshape(-1, num_segments, *x.shape[3:])


class _Decoder(torch.utils.data.Dataset):
    """Item (epoch, sample ids) = that batch decoded: [(sample_id, views tensor or error text, label, key)].

    Only configuration and the shard reader travel to the workers; the epoch comes with every item, so
    persistent workers stay correct across set_epoch.
    """

    def __init__(self, cfg: LoaderConfig, mode: str, dataset: ShardDataset):
        self.cfg, self.mode, self.dataset = cfg, mode, dataset

    def __getitem__(self, job: tuple[int, tuple[int, ...]]):
        epoch, ids = job
        return [self.load_one(epoch, sid) for sid in ids]

    def load_one(self, epoch: int, sid: int):
        try:
            sample = self.dataset[sid]
            views = make_views(self.cfg, self.mode, epoch, sid, sample)
            idx = sampling.frame_indices(
                sample.num_frames,
                views.u,
                sampling=self.cfg.sampling,
                dense_stride=self.cfg.dense_stride,
                frames_per_segment=self.cfg.frames_per_segment,
            )
            x = render_views(decode_frames(sample.video, idx), views, self.cfg.clip_length)
            return sid, x, sample.label, sample.key
        except (ValueError, KeyError, OSError, av.FFmpegError) as e:
            return sid, f"{type(e).__name__}: {e}", -1, ""
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
    leave them (and the forkserver) behind. Poll the training process instead."""

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
        self.decoder = _Decoder(cfg, self.mode, self.dataset)
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
            if isinstance(x, DatasetError):
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
        for results, ids in zip(data, self.plan):  # data first: its iterator must see StopIteration
            self.skipped += len(ids) - len(results)  # known broken, not sent to the workers
            got: list = []
            self._take(results, got)
            got = self.refill(ids, got, self._load)
            if not got:
                continue
            x = torch.stack([g[0] for g in got])
            yield self.to_output(x, [g[1] for g in got], [g[2] for g in got])


def _identity(item):
    return item
