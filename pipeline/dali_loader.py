"""NVIDIA DALI loaders: CPU decode (MJPEG/VP9) or `mixed` NVDEC decode (H.264/HEVC) of only the sampled
frames.

Python reads each batch's encoded files by offset (pipeline.shards, in a reader thread pool ahead of use)
and feeds them, with the per-sample draws and crop boxes, through ``fn.external_source``. Two graphs:

- video (NVDEC, VP9): the graph computes the frame indices from the stored frame count (the float32 rule
  of pipeline.sampling, proven equal by a test), ``fn.decoders.video`` decodes them, each view is cropped +
  resized in one ``fn.resize`` (roi) and flipped + normalised.
- JPEG frames (MJPEG on the CPU): DALI 2.4's CPU video decoder keeps no frame index, so reaching frame k
  decodes every frame before it (docs/pipeline.md, measured). Every MJPEG frame is a whole JPEG: Python
  slices the sampled frames' bytes out of the MP4 (pipeline.mp4) and the graph, one frame per DALI sample,
  decodes only the crop box of each (``fn.decoders.image_slice``, libjpeg-turbo ROI decoding), resizes it
  and flips + normalises.

A decode error fails a whole DALI batch: the loader then decodes that batch's samples one by one in a
batch-size-1 pipeline, skips and counts the broken ones, and continues (the main pipeline keeps running
after a failed iteration).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections import deque

import numpy as np
import torch

from pipeline import sampling
from pipeline.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Loader,
    LoaderConfig,
    ResourceError,
    clip_draws,
    view_frame_indices,
)
from pipeline.mp4 import frame_ranges
from pipeline.shards import BufferPool, ReadAhead, Sample

# Batches whose samples are read ahead of the one being fed: with DALI's prefetch queue of 2 this keeps
# reads ~3-4 batches ahead of the model.
READ_AHEAD_BATCHES = 2

log = logging.getLogger(__name__)


def frame_index_graph(
    num_frames, u, *, sampling_rule: str, num_segments: int, dense_stride: int, frames_per_segment: int = 1
):
    """pipeline.sampling.frame_indices in DALI float32 arithmetic: draws (clips, T) -> flat int32 indices
    (clips * T * frames_per_segment, segment-major)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    length = fn.cast(num_frames, dtype=types.FLOAT)
    seg = types.Constant(np.arange(num_segments, dtype=np.float32))
    if sampling_rule == "tsn":
        idx = dmath.floor((seg + u) * length / np.float32(num_segments))
    elif sampling_rule == "dense":
        span = dmath.max(length - np.float32(num_segments * dense_stride - 1), np.float32(1))
        pos = dmath.floor(u * span) + seg * np.float32(dense_stride)
        idx = pos - length * dmath.floor(pos / length)
    else:
        raise ValueError(f"sampling must be one of {sampling.SAMPLINGS}, got {sampling_rule!r}")
    idx = dmath.min(idx, length - np.float32(1))
    if frames_per_segment > 1:  # (clips * T, 1) + (F,) broadcasts to each segment's F frames
        offsets = types.Constant(sampling.segment_offsets(frames_per_segment))
        window = fn.reshape(idx, shape=[-1, 1]) + offsets
        idx = dmath.clamp(window, np.float32(0), length - np.float32(1))
    return fn.cast(fn.reshape(idx, shape=[-1]), dtype=types.INT32)


def decode_frames_dali(
    video: np.ndarray, indices: np.ndarray, *, gpu: bool = False, device_id: int | None = None
) -> np.ndarray:
    """Frames ``indices`` of one encoded file decoded by DALI, (len, H, W, 3) uint8 (tests, benchmarks)."""
    from nvidia.dali import fn, pipeline_def, types

    if gpu and device_id is None:
        device_id = torch.cuda.current_device()

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id if gpu else None)
    def pipe():
        data, idx = fn.external_source(
            source=lambda: ([video], [np.asarray(indices, np.int32)]),
            num_outputs=2,
            batch=True,
            dtype=[types.UINT8, types.INT32],
        )
        return fn.decoders.video(data, frames=idx, device="mixed" if gpu else "cpu", pad_mode="none")

    p = pipe()
    p.build()
    out = p.run()[0]
    return np.array(out.as_cpu()[0] if gpu else out[0])


def build_pipeline(
    *,
    gpu: bool,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    source,
    sampling_rule: str,
    num_segments: int,
    dense_stride: int,
    frames_per_segment: int = 1,
    num_crops: int,
    out_size: int,
    fp16: bool,
    prefetch: int = 2,
    seed: int = 0,
    pipelined: bool = True,
):
    """A DALI pipeline for one loader mode. Inputs (per sample, from ``source``): encoded video (uint8),
    num_frames (int32 scalar), draws (clips, T) float32, roi_start/roi_end (crops, 2) float32 as (y, x),
    flips (crops,) int32. Output: (crops, clips*T, S, S, 3) normalised float (crops axis only if crops >
    1)."""
    from nvidia.dali import fn, types

    def graph():
        video, num_frames, u, roi_start, roi_end, flips = _inputs(
            source, types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32
        )
        idx = frame_index_graph(
            num_frames,
            u,
            sampling_rule=sampling_rule,
            num_segments=num_segments,
            dense_stride=dense_stride,
            frames_per_segment=frames_per_segment,
        )
        frames = fn.decoders.video(video, frames=idx, device="mixed" if gpu else "cpu", pad_mode="none")
        return _views(frames, num_crops, out_size, roi_start, roi_end, flips, "FHWC", fp16)

    return _pipeline(graph, batch_size, num_threads, device_id, prefetch, seed, pipelined)


def build_jpeg_pipeline(
    *,
    batch_size: int,
    num_threads: int,
    source,
    num_crops: int,
    out_size: int,
    fp16: bool,
    prefetch: int = 2,
    seed: int = 0,
    pipelined: bool = True,
    **_video_only,
):
    """A DALI pipeline over single JPEG frames (batch_size = frames, not clips). Inputs per frame: JPEG bytes
    (uint8), roi_start/roi_end (crops, 2) int32 as (y, x), flips (crops,) int32. Output per frame:
    ([crops,] S, S, 3) normalised float. One crop decodes only its box (ROI decoding, ~2x faster than
    decoding the frame and resizing a roi of it, measured); several crops decode the frame once."""
    from nvidia.dali import fn, types

    def graph():
        jpeg, roi_start, roi_end, flips = _inputs(source, types.UINT8, types.INT32, types.INT32, types.INT32)
        if num_crops == 1:
            box = fn.decoders.image_slice(jpeg, start=roi_start[0], end=roi_end[0], axis_names="HW")
            return _normalise(_resize(box, out_size), flips[0], "HWC", fp16)
        image = fn.decoders.image(jpeg)
        roi_start, roi_end = (fn.cast(roi, dtype=types.FLOAT) for roi in (roi_start, roi_end))
        return _views(image, num_crops, out_size, roi_start, roi_end, flips, "HWC", fp16)

    return _pipeline(graph, batch_size, num_threads, None, prefetch, seed, pipelined)


def _pipeline(graph, batch_size: int, num_threads: int, device_id: int | None, prefetch, seed, pipelined):
    """`graph` (a function of no arguments returning DALI outputs) as a DALI pipeline. `pipelined` False:
    the synchronous executor (the batch-size-1 pipeline that decodes a failed batch's samples one by one)."""
    from nvidia.dali import pipeline_def

    return pipeline_def(
        graph,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,
        exec_async=pipelined,
        exec_pipelined=pipelined,
    )()


def _inputs(source, *dtypes):
    """The per-sample inputs Python feeds (one DALI output per dtype), whole batches at a time."""
    from nvidia.dali import fn

    return fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=list(dtypes))


def _views(images, num_crops: int, out_size: int, roi_start, roi_end, flips, layout: str, fp16: bool):
    """Crop box k of `images` resized to out_size x out_size, flipped by flips[k] and normalised; the crops
    stacked on a new first axis when there are several."""
    from nvidia.dali import fn

    views = [
        _normalise(_resize(images, out_size, roi_start[k], roi_end[k]), flips[k], layout, fp16)
        for k in range(num_crops)
    ]
    return fn.stack(*views) if num_crops > 1 else views[0]


def _resize(images, out_size: int, roi_start=None, roi_end=None):
    from nvidia.dali import fn, types

    roi = {} if roi_start is None else dict(roi_start=roi_start, roi_end=roi_end)
    return fn.resize(
        images, size=[out_size, out_size], interp_type=types.INTERP_LINEAR, antialias=True, **roi
    )


def _normalise(images, flip, layout: str, fp16: bool):
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        images,
        mirror=flip,
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
        output_layout=layout,
        dtype=types.FLOAT16 if fp16 else types.FLOAT,
    )


def decodes_jpeg_frames(codec: str, video_ext: str, *, gpu: bool) -> bool:
    """The JPEG-frames graph serves MJPEG in MP4 on the CPU backend; NVDEC and VP8/VP9 use the video one."""
    return not gpu and codec.lower() == "mjpeg" and video_ext.lower() == "mp4"


# Messages of failures that say nothing about the file: out of GPU memory, NVDEC sessions exhausted, a CUDA
# error, no descriptors or memory left. Such a sample is retried alone and, if it fails again, the run stops
# instead of skipping it for good.
RESOURCE_ERROR = re.compile(
    r"out of memory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|CUDA error|cuda runtime|"
    r"NVDEC.*(busy|limit|session)|cuvid.*(resource|memory)|no free decoder|Too many open files|"
    r"Cannot allocate memory",
    re.IGNORECASE,
)


def is_resource_error(message: str) -> bool:
    """True for a decode failure caused by the GPU's resources, not by the video file."""
    return RESOURCE_ERROR.search(message) is not None


def error_summary(error: BaseException) -> str:
    """The informative line of a DALI error (its message is mostly the pipeline-definition traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        if "failed:" in ln:
            return ln.split("failed:", 1)[1].strip()
    for ln in lines:
        if "rror" in ln and "Critical error" not in ln and "operator" not in ln:
            return ln
    return lines[0] if lines else type(error).__name__


def reader_threads(workers: int) -> int:
    """Reader threads per loader (0 with workers=0: read in the feeding thread): threads pay where a read
    waits on the disk, gain nothing on the page cache (a read is a memory copy) and cost little; 4 because 8
    read no more (`python -m benchmark reader`; its figures: docs/benchmark.md, "reader")."""
    return 4 if workers > 0 else 0


class DaliLoader(Loader):
    def __init__(self, cfg: LoaderConfig, *, gpu: bool, **kwargs):
        super().__init__(cfg, **kwargs)
        self.gpu = gpu
        self.backend = "dali-gpu" if gpu else "dali-cpu"
        if gpu and self.device.type != "cuda":
            raise ValueError("the dali-gpu backend needs a CUDA device")
        self.num_pipelines = cfg.dali_pipelines if gpu else 1
        self.jpeg = decodes_jpeg_frames(self.dataset.codec, self.dataset.video_ext, gpu=gpu)
        self.reader = ReadAhead(self.fetch, threads=reader_threads(cfg.workers))
        self.dataset.buffers = BufferPool()
        self._pipes: list = []
        self._states = [{"plan": deque(), "fifo": deque(), "fed": []} for _ in range(self.num_pipelines)]
        self._probe = None
        self._clean = True

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """A consumer that takes exactly len(self) batches never resumes the generator to its drain: drain
        here, so the next epoch resets the pipelines instead of rebuilding them and their thread pools."""
        if not self._clean and self._pipes:
            for state in self._states:
                state["plan"].clear()  # batches not taken yet are not decoded for nothing
            self._drain()
        self.reader.clear()
        super().set_epoch(epoch, start_batch)

    def fetch(self, sample_id: int) -> Sample:
        """The JPEG-frames graph also needs where each frame's bytes lie (read in the reader threads)."""
        sample = super().fetch(sample_id)
        if not self.jpeg:
            return sample
        offsets, sizes = frame_ranges(sample.video)
        if len(offsets) < sample.num_frames:
            raise ValueError(f"{len(offsets)} frames in the file, {sample.num_frames} in its metadata")
        return dataclasses.replace(sample, frames=(offsets, sizes))

    def frames_per_sample(self) -> int:
        """Decoded frames per sample: clips (views in time) x T x frames_per_segment."""
        rng = np.random.default_rng(0) if self.mode == "train" else None  # the count, not the values
        return clip_draws(self.cfg, self.mode, rng, self.test_views).size * self.cfg.frames_per_segment

    # ----- pipeline construction
    def _pipe_kwargs(self, batch_size: int, source) -> dict:
        cfg = self.cfg
        device_id = self.device.index if self.gpu else None
        threads = max(1, cfg.workers) if not self.gpu else max(2, cfg.workers)
        num_crops = self.test_views.num_crops  # one but in test mode
        out = cfg.scale_size if (self.mode == "test" and num_crops == 3) else cfg.crop_size
        return dict(
            gpu=self.gpu,
            batch_size=batch_size * self.frames_per_sample() if self.jpeg else batch_size,
            num_threads=threads,
            device_id=device_id,
            source=source,
            sampling_rule=cfg.sampling,
            num_segments=cfg.num_segments,
            dense_stride=cfg.dense_stride,
            frames_per_segment=cfg.frames_per_segment,
            num_crops=num_crops,
            out_size=out,
            fp16=self.dtype == torch.float16,
            seed=cfg.seed,
        )

    def _build(self, batch_size: int, source, **kwargs):
        builder = build_jpeg_pipeline if self.jpeg else build_pipeline
        return builder(**self._pipe_kwargs(batch_size, source), **kwargs)

    def _feed(self, sample_ids: list[int], samples: list) -> tuple:
        return self._feed_jpeg(sample_ids, samples) if self.jpeg else self._feed_video(sample_ids, samples)

    def _feed_jpeg(self, sample_ids: list[int], samples: list[Sample]) -> tuple:
        """One DALI sample per decoded frame: its JPEG bytes (a view into the read buffer), the sample's
        crop boxes as (y, x) and flips."""
        jpegs, starts, ends, flips = [], [], [], []
        for sid, s in zip(sample_ids, samples):
            v = self.views(sid, s)
            idx = view_frame_indices(self.cfg, s.num_frames, v).ravel()
            offsets, sizes = s.frames
            start = np.ascontiguousarray(v.boxes[:, [1, 0]], dtype=np.int32)
            end = np.ascontiguousarray(v.boxes[:, [3, 2]], dtype=np.int32)
            flip = v.flips.astype(np.int32)
            for i in idx:
                jpegs.append(s.video[offsets[i] : offsets[i] + sizes[i]])
            starts += [start] * len(idx)
            ends += [end] * len(idx)
            flips += [flip] * len(idx)
        return jpegs, starts, ends, flips

    def _feed_video(self, sample_ids: list[int], samples: list) -> tuple:
        videos, nums, us, starts, ends, flips = [], [], [], [], [], []
        for sid, s in zip(sample_ids, samples):
            v = self.views(sid, s)
            videos.append(s.video)
            nums.append(np.int32(s.num_frames))
            us.append(v.u)
            starts.append(np.ascontiguousarray(v.boxes[:, [1, 0]], dtype=np.float32))  # DALI's roi is (y, x)
            ends.append(np.ascontiguousarray(v.boxes[:, [3, 2]], dtype=np.float32))
            flips.append(v.flips.astype(np.int32))
        return videos, nums, us, starts, ends, flips

    def _batch_source(self, plan: deque, fifo: deque, fed: list | None = None):
        """A DALI source callback: the next planned batch, its sample ids and labels recorded in ``fifo``.
        DALI copies what a callback returns before it calls it again, so the read buffers of the samples
        it fed last time (``fed``) go back to the pool."""
        fed = [] if fed is None else fed

        def source():
            self.dataset.buffers.give_back(s.video for s in fed)
            fed.clear()
            while plan:
                ids = plan.popleft()
                for upcoming in itertools.islice(plan, READ_AHEAD_BATCHES):
                    self.reader.want(upcoming)
                got = [
                    (int(sid), s)
                    for sid in ids
                    if (s := self.read(int(sid), self.reader.get(int(sid)))) is not None
                ]
                got = self.refill(
                    ids, got, lambda sid: (sid, s) if (s := self.read(sid)) is not None else None
                )
                if got:
                    fifo.append(([g[0] for g in got], [g[1].label for g in got], [g[1].key for g in got]))
                    fed.extend(g[1] for g in got)
                    return self._feed([g[0] for g in got], [g[1] for g in got])
            raise StopIteration

        return source

    def _read_pair(self, sid: int):
        sample = self.read(sid)
        return (sid, sample) if sample is not None else None

    def _decode_one(self, sid: int):
        """Decode one sample alone (the slow path after a failed batch); None if it is broken."""
        sample = self.read(sid)
        if sample is None:
            return None
        if self._probe is None:  # runs exactly one source call per run(): no prefetching, no pipelining
            self._probe_queue: deque = deque()
            self._probe = self._build(1, lambda: self._probe_queue.popleft(), prefetch=1, pipelined=False)
            self._probe.build()
        self._probe_queue.append(self._feed([sid], [sample]))
        try:
            out = self._probe.run()[0]
        except Exception as e:  # noqa: BLE001 (DALI raises RuntimeError subclasses that vary by version)
            self._probe = None  # a DALI pipeline that raised may be unusable: build a fresh one next time
            reason = error_summary(e)
            if is_resource_error(reason):  # the batch failed, and so did this sample alone: fail loudly
                raise ResourceError(
                    f"decoding {sample.key} failed twice for lack of a GPU resource ({reason}); the file is "
                    f"not marked broken. Lower --data.batch_size or --data.dali_pipelines, or free GPU memory"
                ) from None
            self.mark_bad(sid, reason)
            return None
        return self._per_sample(self._to_torch(out), 1)[0], sample

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """One copy out of DALI's buffers (which the next run reuses) into a fresh torch tensor."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = tensor_list.as_tensor()
        out = torch.empty(
            dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device if self.gpu else "cpu"
        )
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        return feed_ndarray(dense, out, cuda_stream=stream)

    def _recover(self, ids: list[int], labels: list[int], keys: list[str]):
        """Decode a failed batch sample by sample, skipping broken samples (train: refilled to full size)."""
        got = [
            (res[0], label, key)
            for sid, label, key in zip(ids, labels, keys)
            if (res := self._decode_one(sid))
        ]
        got = self.refill(np.array(ids), got, self._decode_refill)
        if not got:
            return None
        return torch.stack([g[0] for g in got]), [g[1] for g in got], [g[2] for g in got]

    def _decode_refill(self, sid: int):
        res = self._decode_one(sid)
        return (res[0], res[1].label, res[1].key) if res is not None else None

    # ----- iteration
    def __iter__(self):
        batches = self.batches()
        P = self.num_pipelines
        for p in range(P):
            self._states[p]["plan"], self._states[p]["fifo"] = deque(batches[p::P]), deque()
        if self._clean and self._pipes:
            for pipe in self._pipes:
                pipe.reset()
        else:
            self._pipes = [self._build(self.cfg.batch_size, self._source(p)) for p in range(P)]
            for pipe in self._pipes:
                pipe.build()
        self._clean = False
        for b in range(len(batches)):
            pipe, fifo = self._pipes[b % P], self._states[b % P]["fifo"]
            try:
                x = self._to_torch(pipe.run()[0])
                ids, labels, keys = fifo.popleft()
                x = self._per_sample(x, len(ids))
            except StopIteration:
                continue
            except Exception as e:  # noqa: BLE001 (DALI raises RuntimeError subclasses that vary by version)
                if not fifo:
                    raise
                ids, labels, keys = fifo.popleft()
                log.debug(
                    "DALI batch failed (%s); decoding its %d samples one by one", error_summary(e), len(ids)
                )
                self._rebuild(b % P)
                res = self._recover(ids, labels, keys)
                if res is None:
                    continue
                x, labels, keys = res
            yield self.to_output(self._arrange(x), labels, keys)
        self._drain()

    def _per_sample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The JPEG-frames graph's (N*clips*T, [crops,] S, S, 3) -> the video graph's (N, [crops,] clips*T,
        S, S, 3)."""
        if not self.jpeg:
            return x
        x = x.view(n, -1, *x.shape[1:])
        return x.transpose(1, 2) if x.dim() == 6 else x

    def _arrange(self, x: torch.Tensor) -> torch.Tensor:
        """DALI's (N, [crops,] clips*T, S, S, 3) -> (N, V, T, S, S, 3), V = clips*crops, clip-major."""
        n, t = x.shape[0], self.cfg.clip_length
        x = (
            x.view(n, -1, x.shape[-4] // t, t, *x.shape[-3:])
            if x.dim() == 6
            else x.view(n, 1, x.shape[1] // t, t, *x.shape[-3:])
        )
        return x.transpose(1, 2).reshape(n, -1, t, *x.shape[-3:])

    def _rebuild(self, p: int) -> None:
        """Replace a pipeline that raised (it may be unusable), re-queueing the batches it had prefetched."""
        plan, fifo = self._states[p]["plan"], self._states[p]["fifo"]
        plan.extendleft(np.array(ids) for ids, _, _ in reversed(fifo))
        fifo.clear()
        self._pipes[p] = self._build(self.cfg.batch_size, self._source(p))
        self._pipes[p].build()

    def _source(self, p: int):
        state = self._states[p]
        return lambda: self._batch_source(state["plan"], state["fifo"], state["fed"])()

    def _drain(self) -> None:
        """Run the pipelines to their StopIteration so that reset() can start the next epoch."""
        for pipe in self._pipes:
            try:
                while True:
                    pipe.run()
            except StopIteration:
                pass
        self._clean = True
