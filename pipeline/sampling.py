"""Frame sampling and crop geometry: the one definition every loader uses (pure numpy, explicit RNG).

Frame sampling is split into *draws* (uniform numbers in [0, 1), one row per clip) and a deterministic *rule*
that turns draws and a video's frame count into frame indices. Training draws come from an RNG; evaluation
draws are fixed. The DALI graph recomputes the rule in float32 DALI arithmetic from the same draws
(``pipeline.dali_loader``); tests/test_pipeline.py proves both give the same indices.

Rules (0-based frame indices, ``L`` = frames in the video, ``T`` = frames per clip):

- TSN (``sampling="tsn"``): the video is cut into ``T`` equal real-valued segments; clip frame ``k`` is
  ``floor((k + u_k) * L / T)``. Train: ``u_k`` uniform (a random frame inside each segment); val: ``u_k =
  0.5``
  (segment centres); test: one row per clip, ``u = (c + 0.5) / num_clips`` for clip ``c`` (evenly offset
  clips)
  or, with ``twice_sample``, the centres and the starts (``u = 0.5`` and ``u = 0``).
- Dense (``sampling="dense"``, I3D / non-local): ``T`` frames ``stride`` apart from a window of ``W = T *
stride``
  frames starting at ``floor(u * max(L - W + 1, 1))``. Train: ``u`` uniform (a random window); val: ``u =
  0.5``
  (the centre window); test: ``num_clips`` evenly spaced windows, ``u = (c + 0.5) / num_clips``.
- Frames per segment (``frames_per_segment=F``, TDN's 5): each index above becomes the centre of ``F``
  consecutive frames ``i - F//2 .. i + F//2``, each clamped to ``[0, L - 1]`` (the ends repeat their first /
  last frame); a clip is then ``T * F`` frames, segment-major. Train draws a random centre, val the segment
  centre, as for ``F = 1``.
- Short videos: TSN needs no special case (``L < T`` repeats frames in order, every index stays below ``L``).
  Dense windows longer than the video start at 0 and wrap around (``index mod L``, "loop" as in mmaction2).

Crop geometry returns boxes ``(x0, y0, x1, y1)`` in integer pixel coordinates of the stored frame (end
exclusive);
every loader crops the box and resizes it to the output size, so one box means the same pixels everywhere.
"""

from __future__ import annotations

import numpy as np

SAMPLINGS = ("tsn", "dense")
MODES = ("train", "val", "test")


def frame_draws(
    rng: np.random.Generator | None,
    *,
    mode: str,
    sampling: str,
    num_segments: int,
    num_clips: int = 1,
    twice_sample: bool = False,
) -> np.ndarray:
    """Uniform draws (num_views_in_time, T) float32 for one video; rng is only used in train mode."""
    if mode not in MODES or sampling not in SAMPLINGS:
        raise ValueError(
            f"mode must be one of {MODES} and sampling one of {SAMPLINGS}, got {mode!r}, {sampling!r}"
        )
    width = num_segments if sampling == "tsn" else 1
    if mode == "train":
        assert rng is not None, "train-mode draws need an RNG"
        u = rng.random((1, width), dtype=np.float32)  # float32 draws: the DALI graph computes in float32
    elif mode == "val":
        u = np.full((1, width), 0.5)
    elif twice_sample and sampling == "tsn":
        u = np.array([[0.5] * width, [0.0] * width])
    else:
        u = ((np.arange(num_clips) + 0.5) / num_clips)[:, None].repeat(width, axis=1)
    u = u.astype(np.float32)
    return np.repeat(u, num_segments, axis=1) if sampling == "dense" else u


def frame_indices(
    num_frames: int, u: np.ndarray, *, sampling: str, dense_stride: int = 8, frames_per_segment: int = 1
) -> np.ndarray:
    """Frame indices (clips, T * frames_per_segment) int64 from draws ``u`` (clips, T); float32 arithmetic
    mirrors the DALI graph."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if frames_per_segment < 1:
        raise ValueError(f"frames_per_segment must be >= 1, got {frames_per_segment}")
    u = np.asarray(u, dtype=np.float32)
    num_segments = u.shape[-1]
    length = np.float32(num_frames)
    if sampling == "tsn":
        seg = np.arange(num_segments, dtype=np.float32)
        idx = np.floor((seg + u) * length / np.float32(num_segments))
    elif sampling == "dense":
        span = np.float32(max(num_frames - num_segments * dense_stride + 1, 1))
        start = np.floor(u * span)
        pos = start + np.arange(num_segments, dtype=np.float32) * np.float32(dense_stride)
        idx = pos - length * np.floor(pos / length)
    else:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    idx = np.minimum(idx, length - 1)
    if frames_per_segment > 1:
        offsets = segment_offsets(frames_per_segment)
        idx = np.clip(idx[..., None] + offsets, np.float32(0), length - 1).reshape(idx.shape[0], -1)
    return idx.astype(np.int64)


def segment_offsets(frames_per_segment: int) -> np.ndarray:
    """Offsets of a segment's frames from its centre index: -F//2 .. F - 1 - F//2 (float32)."""
    return np.arange(frames_per_segment, dtype=np.float32) - np.float32(frames_per_segment // 2)


def tsm_fixed_offsets(
    image_w: int, image_h: int, crop_w: int, crop_h: int, more_fix_crop: bool = True
) -> list[tuple[int, int]]:
    """TSM's fill_fix_offset: corners and centre (+ 8 more positions with more_fix_crop), in pixels."""
    w_step, h_step = (image_w - crop_w) // 4, (image_h - crop_h) // 4
    ret = [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step)]
    if more_fix_crop:
        ret += [
            (0, 2 * h_step),
            (4 * w_step, 2 * h_step),
            (2 * w_step, 4 * h_step),
            (2 * w_step, 0),
            (w_step, h_step),
            (3 * w_step, h_step),
            (w_step, 3 * h_step),
            (3 * w_step, 3 * h_step),
        ]
    return ret


def multiscale_crop_pairs(
    image_w: int,
    image_h: int,
    crop_size: int,
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66),
    max_distort: int = 1,
) -> list[tuple[int, int]]:
    """TSM's GroupMultiScaleCrop candidate (w, h) pairs: scales of the short side, |i - j| <= max_distort."""
    base = min(image_w, image_h)
    sizes = [int(base * s) for s in scales]
    sizes = [crop_size if abs(s - crop_size) < 3 else s for s in sizes]
    return [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]


def multiscale_crop_box(
    rng: np.random.Generator,
    image_w: int,
    image_h: int,
    crop_size: int,
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66),
    max_distort: int = 1,
    more_fix_crop: bool = True,
) -> tuple[int, int, int, int]:
    """One training crop box (x0, y0, x1, y1) as TSM samples it (fix_crop=True): a pair, then a fixed
    offset."""
    pairs = multiscale_crop_pairs(image_w, image_h, crop_size, scales, max_distort)
    crop_w, crop_h = pairs[rng.integers(len(pairs))]
    crop_w, crop_h = min(crop_w, image_w), min(crop_h, image_h)
    offsets = tsm_fixed_offsets(image_w, image_h, crop_w, crop_h, more_fix_crop)
    x, y = offsets[rng.integers(len(offsets))]
    return x, y, x + crop_w, y + crop_h


def eval_crop_boxes(
    image_w: int, image_h: int, *, scale_size: int, crop_size: int, num_crops: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Evaluation views as (boxes (K, 4) int, flips (K,) bool, output size), boxes in stored-frame pixels.

    The frame is thought of as resized to short side ``scale_size`` (scale s); a crop of ``c`` pixels there
    is a
    box of ``round(c / s)`` pixels here. 1: centre ``crop_size`` crop. 3 (TSM full-resolution test): crops of
    ``scale_size`` (the whole short side) at the start, end and centre of the long side, output
    ``scale_size``.
    10: TSM's over-sampling, 4 corners + centre of ``crop_size`` and their mirror images.
    """
    short = min(image_w, image_h)
    s = scale_size / short
    if num_crops == 1:
        cw = ch = min(round(crop_size / s), short)
        positions = [((image_w - cw) // 2, (image_h - ch) // 2)]
        flips, out = [False], crop_size
    elif num_crops == 3:
        cw = ch = short
        # start, end, centre of the long side (TSM's (0,0), (4w,0), (2w,2h) for landscape; its portrait
        # case repeats the first crop, this one does not)
        positions = [tsm_fixed_offsets(image_w, image_h, cw, ch, False)[i] for i in (0, 3, 4)]
        flips, out = [False] * 3, scale_size
    elif num_crops == 10:
        cw = ch = min(round(crop_size / s), short)
        positions = tsm_fixed_offsets(image_w, image_h, cw, ch, False) * 2
        flips, out = [False] * 5 + [True] * 5, crop_size
    else:
        raise ValueError(f"num_crops must be 1, 3 or 10, got {num_crops}")
    boxes = np.array([(x, y, x + cw, y + ch) for x, y in positions], dtype=np.int64)
    return boxes, np.array(flips), out


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The RNG for one sample in one epoch: independent of batch composition, rank and world size (resume)."""
    return np.random.default_rng([seed, epoch, sample_id])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch (the same on every rank)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)
