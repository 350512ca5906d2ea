"""LoaderConfig, TestViews and the part every backend shares: the epoch plan, views per sample, broken-sample
handling and the output contract. Backends subclass Loader; pipeline.build chooses and builds one."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from pipeline import sampling
from pipeline.shards import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_DIR, DatasetError, Sample, ShardDataset

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def option(default: Any, help: str) -> Any:
    """A config field with its `python train.py --help` description (config.help_text prints it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TestViews:
    """The views a test-mode loader gives each video: num_clips (or twice_sample's 2) clips x num_crops
    crops. Their one home: config.EvalConfig inherits them as the --eval.* options, and evaluation hands that
    to build_loader(..., views=); train and val modes always take one clip and one crop."""

    __test__ = False  # not a pytest test class, although its name starts with Test

    num_clips: int = option(1, "clips per video, averaged")
    num_crops: Literal[1, 3, 10] = option(
        1, "crops per clip; 1: centre, 3: full short side at start/centre/end, 10: corners, centre, flips"
    )
    twice_sample: bool = option(False, "TSM's twice sampling: the segments' centres and starts, 2 clips")


def mode_views(mode: str, views: TestViews | None) -> TestViews:
    """The views a loader in `mode` gives: test: `views` (None: one clip, one centre crop); train, val: one.
    A plain TestViews copy, also of an EvalConfig: the torch loader's workers get it without importing config,
    and a later change to the config does not reach a built loader."""
    if mode != "test" or views is None:
        return TestViews()
    if type(views) is TestViews:  # already a plain copy (a loader's, resolved once): per sample, no copy
        return views
    return TestViews(**{f.name: getattr(views, f.name) for f in fields(TestViews)})


@dataclass
class LoaderConfig:
    index: str = option(
        "data/synthetic/index.json",
        "the dataset's index.json (python -m preprocess writes it): a path or an fsspec URL (s3://, gs://)",
    )
    cache_dir: str = option(
        DEFAULT_CACHE_DIR, "a remote index's local shard cache: whole shards fetched on first use"
    )
    cache_gb: float = option(
        DEFAULT_CACHE_BYTES / 1e9, "the shard cache's bound in GB (least recently used shards evicted)"
    )
    backend: Literal["auto", "dali-gpu", "dali-cpu", "torch"] = option(
        "auto",
        "auto: dali-gpu for NVDEC codecs on a GPU, else the CPU backend measured fastest for the codec "
        "(pipeline.build.select_backend: dali-cpu for MJPEG, torch otherwise)",
    )
    num_segments: int = option(8, "T: segments (frames the model sees) per clip")
    frames_per_segment: int = option(
        1, "consecutive frames per segment around each sampled index (TDN: 5); a clip is T x this"
    )
    sampling: Literal["tsn", "dense"] = option(
        "tsn", "tsn: one frame per equal segment of the video; dense: T frames dense_stride apart"
    )
    dense_stride: int = option(8, "dense sampling: frames between two sampled frames")
    crop_size: int = option(224, "side of the square crops the model sees, in pixels")
    scale_size: int = option(256, "evaluation: the short side is resized to this before cropping")
    scales: tuple[float, ...] = option(
        (1.0, 0.875, 0.75, 0.66), "training: multi-scale crop sizes as fractions of the short side"
    )
    flip: bool = option(True, "training: random horizontal flips (off where labels name directions)")
    batch_size: int = option(8, "clips per step on each rank (the global batch is this x ranks)")
    workers: int = option(2, "DALI threads / DataLoader worker processes (torch backend; 0: in-process)")
    dali_pipelines: int = option(
        4,
        "dali-gpu: batches go round-robin to this many DALI pipelines, so several batches decode at once "
        "(a throughput setting to measure per GPU; the CPU backends use one pipeline)",
    )
    seed: int = option(0, "seed of the epoch order and of the augmentation draws")

    @property
    def clip_length(self) -> int:
        """Frames per clip the loader outputs: num_segments * frames_per_segment."""
        return self.num_segments * self.frames_per_segment


@dataclass
class Views:
    """How one video becomes model input: draws for frame sampling and crop boxes (see pipeline.sampling)."""

    u: np.ndarray  # (clips, T) float32 draws
    boxes: np.ndarray  # (crops, 4) int (x0, y0, x1, y1)
    flips: np.ndarray  # (crops,) bool
    out_size: int


def clip_draws(
    cfg: LoaderConfig, mode: str, rng: np.random.Generator | None, views: TestViews | None = None
) -> np.ndarray:
    """The (clips, T) uniform draws of one sample under cfg's sampling (one clip but in test mode, where
    `views` says how many)."""
    views = mode_views(mode, views)
    return sampling.frame_draws(
        rng,
        mode=mode,
        sampling=cfg.sampling,
        num_segments=cfg.num_segments,
        num_clips=views.num_clips,
        twice_sample=views.twice_sample,
    )


def view_frame_indices(cfg: LoaderConfig, num_frames: int, views: Views) -> np.ndarray:
    """The frame numbers the views' draws pick in a video of num_frames frames, under cfg's rule (with its
    frames_per_segment consecutive frames a segment)."""
    return sampling.frame_indices(
        num_frames,
        views.u,
        sampling=cfg.sampling,
        dense_stride=cfg.dense_stride,
        frames_per_segment=cfg.frames_per_segment,
    )


def make_views(
    cfg: LoaderConfig, mode: str, epoch: int, sample_id: int, sample: Sample, views: TestViews | None = None
) -> Views:
    """The draws and crop boxes of one sample in one epoch (a pure function of its arguments); test mode
    takes `views`' clips and crops (None: one clip, one centre crop)."""
    rng = sampling.sample_rng(cfg.seed, epoch, sample_id) if mode == "train" else None
    views = mode_views(mode, views)
    u = clip_draws(cfg, mode, rng, views)
    if mode == "train":
        box = sampling.multiscale_crop_box(rng, sample.width, sample.height, cfg.crop_size, cfg.scales)
        flip = bool(cfg.flip and rng.random() < 0.5)
        return Views(u, np.array([box]), np.array([flip]), cfg.crop_size)
    boxes, flips, out = sampling.eval_crop_boxes(
        sample.width,
        sample.height,
        scale_size=cfg.scale_size,
        crop_size=cfg.crop_size,
        num_crops=views.num_crops,
    )
    return Views(u, boxes, flips, out)


class ResourceError(RuntimeError):
    """Reading or decoding failed for lack of a resource (open files, memory, GPU memory, decoder sessions),
    not because of a file."""


# errnos that say nothing about the file read: the process ran out of descriptors or memory.
RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def resource_error(error: BaseException, key: str, tar: str) -> ResourceError | None:
    """The ResourceError a failed read of sample `key` stands for, or None when it may be the file's fault."""
    if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS):
        reason = error.strerror if isinstance(error, OSError) else "out of memory"
        return ResourceError(
            f"reading sample {key} from {tar} failed for lack of a system resource ({reason}); no sample was "
            f"marked broken. Raise the open-file limit (ulimit -n) or free memory, or lower --data.workers"
        )
    return None


def explicit_device(device: torch.device | str) -> torch.device:
    """`cuda` -> `cuda:<current index>`: DALI's device_id and torch's allocations must name the same GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Loader:
    """Backend-independent part of a loader: the epoch plan, views per sample, skipping and the output
    contract.

    Sample order: train batches are a permutation of the split computed in numpy from (seed, epoch), cut into
    world_size equal contiguous parts (the remainder is dropped) and then into full batches, so every rank has
    the same number of batches; val/test take every world_size-th sample in index order and keep a partial
    last
    batch, so every sample is seen exactly once. Per-sample draws come from an RNG seeded by (seed, epoch,
    sample), so crops and flips do not depend on batching either; ``set_epoch(e, start_batch=b)`` therefore
    reproduces exactly the batches b, b+1, ... of an uninterrupted run.
    Broken samples: a sample that fails to read or decode is skipped and counted in ``skipped``; in train
    mode its
    slot is refilled with the next samples of this rank's order (wrapping) so batch shapes never change, in
    val/test the batch just gets smaller.
    """

    backend = ""  # set by each backend's class

    def __init__(
        self,
        cfg: LoaderConfig,
        *,
        split: str,
        mode: str,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        views: TestViews | None = None,
    ):
        if mode not in sampling.MODES:
            raise ValueError(f"mode must be one of {sampling.MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.split, self.mode = cfg, split, mode
        self.test_views = mode_views(mode, views)  # each sample's clips and crops (one of each but in test)
        self.rank, self.world_size = rank, world_size
        self.device, self.dtype = explicit_device(device), dtype
        self.dataset = ShardDataset(cfg.index, split, cfg.cache_dir, int(cfg.cache_gb * 1e9))
        self.classes = self.dataset.classes
        self.epoch, self.start_batch = 0, 0
        self.skipped = 0
        self.bad: set[int] = set()
        self._reads = 0
        n = len(self.dataset)
        if mode == "train":
            self._per_rank = n // world_size
            self.num_samples = self._per_rank // cfg.batch_size * cfg.batch_size
            if self.num_samples == 0:
                fix = (
                    f"lower --data.batch_size (now {cfg.batch_size})"
                    if cfg.batch_size > 1
                    else "add samples to the split (python -m preprocess ...)"
                )
                raise DatasetError(
                    f"{cfg.index} split {split!r} has {n} samples: not one full batch of "
                    f"{cfg.batch_size} on each of {world_size} rank(s); {fix}"
                )
        else:
            self.num_samples = len(range(rank, n, world_size))

    # ----- plan
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return -(-self.num_samples // self.cfg.batch_size)

    def rank_order(self) -> np.ndarray:
        """Sample ids this rank visits in the current epoch, in order."""
        n = len(self.dataset)
        if self.mode == "train":
            perm = sampling.epoch_permutation(n, self.cfg.seed, self.epoch)
            return perm[self.rank * self._per_rank : (self.rank + 1) * self._per_rank]
        return np.arange(self.rank, n, self.world_size)

    def batches(self) -> list[np.ndarray]:
        """Sample ids per batch for the rest of the current epoch (from start_batch)."""
        order = self.rank_order()[: self.num_samples]
        bs = self.cfg.batch_size
        return [order[i : i + bs] for i in range(self.start_batch * bs, len(order), bs)]

    def replacements(self, batch: np.ndarray) -> Iterator[int]:
        """Stand-ins for broken samples: the samples after ``batch`` in this rank's order, wrapping."""
        order = self.rank_order()
        pos = int(np.flatnonzero(order == batch[-1])[0]) if len(batch) else 0
        for i in range(1, len(order) + 1):
            sid = int(order[(pos + i) % len(order)])
            if sid not in self.bad:
                yield sid
        raise DatasetError(
            f"every sample of rank {self.rank} in {self.cfg.index} split {self.split!r} is broken "
            f"({self.skipped} skipped): nothing left to train on; check the dataset"
        )

    def refill(self, ids: np.ndarray, got: list[T], load: Callable[[int], T | None]) -> list[T]:
        """Train mode keeps batch shapes fixed: top ``got`` (the loaded part of batch ``ids``) up with the
        next loadable samples of this rank's order; ``load`` returns None for a broken sample."""
        if self.mode == "train" and len(got) < len(ids):
            fill = self.replacements(ids)
            while len(got) < len(ids):
                if (item := load(next(fill))) is not None:
                    got.append(item)
        return got

    def views(self, sample_id: int, sample: Sample) -> Views:
        return make_views(self.cfg, self.mode, self.epoch, sample_id, sample, self.test_views)

    def mark_bad(self, sample_id: int, error: BaseException | str) -> None:
        self.skipped += 1
        if sample_id not in self.bad:
            self.bad.add(sample_id)
            if len(self.bad) >= 8 and len(self.bad) > self._reads // 2:
                raise DatasetError(
                    f"{len(self.bad)} of the first {self._reads} samples of {self.cfg.index} failed "
                    f"to load, the last with: {error}. This is not a few broken files: check the "
                    f"dataset (codec {self.dataset.codec!r}) and the backend"
                ) from None
            log.warning(
                "skipping broken sample %s (%s): %s",
                self.dataset.refs[sample_id].key,
                self.dataset.refs[sample_id].tar,
                str(error).strip().splitlines()[-1][:300],
            )

    def fetch(self, sample_id: int) -> Sample:
        """A sample's bytes and metadata, checked; raises for a broken one. Safe to call from reader threads:
        it changes no loader state (``read`` does the bookkeeping)."""
        sample = self.dataset[sample_id]
        if sample.num_frames < 1 or sample.video.size == 0:
            raise ValueError(f"num_frames={sample.num_frames}, {sample.video.size} video bytes")
        return sample

    def read(self, sample_id: int, fetched: Sample | BaseException | None = None) -> Sample | None:
        """Read a sample, or take ``fetched`` (what ``fetch`` returned or raised, read ahead by a reader
        thread), or mark it broken. Called in sample order, so skipping does not depend on reader timing."""
        if sample_id in self.bad:
            self.skipped += 1
            return None
        self._reads += 1
        try:
            if fetched is None:
                fetched = self.fetch(sample_id)
            if isinstance(fetched, BaseException):
                raise fetched
            return fetched
        except (ValueError, KeyError, OSError, MemoryError) as e:
            ref = self.dataset.refs[sample_id]
            if (lack := resource_error(e, ref.key, ref.tar)) is not None:
                raise lack from None
            self.mark_bad(sample_id, e)
            return None

    # ----- output
    def to_output(self, x_NVTHWC: torch.Tensor, labels: list[int], keys: list[str]):
        """(N, V, T, H, W, C) -> the contract: (N, T, 3, H, W) (train/val) or (N, V, T, 3, H, W) (test).

        The permute is a view: read as (N*T, 3, H, W) it is channels_last in memory, so the model's
        channels_last conversion costs no copy.
        """
        x = x_NVTHWC.to(self.device, non_blocking=True)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        x = x.permute(0, 1, 2, 5, 3, 4)
        labels_N = torch.tensor(labels, dtype=torch.long).to(self.device, non_blocking=True)
        if self.mode == "test":
            return x, labels_N, keys
        return x[:, 0], labels_N
