"""Decode correctness: the frames DALI's `mixed` decoder (NVDEC) returns against PyAV's (the torch
fallback's decoder) at the same indices, per sample of the kit's H.264 shards.

Colour conversion differs a little between the two (NVDEC's YUV->RGB against swscale's), so frames are not
bit-equal; what must hold is that each returned frame is the one asked for. For every index the PyAV frames
at offsets -2..+2 are compared too: `frame_exact` says the asked-for frame was the closest each time.
"""

from __future__ import annotations

import numpy as np

from pipeline import sampling
from pipeline.shards import ShardDataset

OFFSETS = (-2, -1, 0, 1, 2)


def indices_to_check(num_frames: int, seed: int) -> np.ndarray:
    """8 TSN training draws, the first and the last frame, and a run of consecutive frames (seek then
    step), sorted and unique: where a decoder that seeks wrongly shows it."""
    rng = np.random.default_rng(seed)
    u = sampling.frame_draws(rng, mode="train", sampling="tsn", num_segments=8)
    picks = sampling.frame_indices(num_frames, u, sampling="tsn").ravel()
    middle = num_frames // 2
    run = np.arange(middle, min(num_frames, middle + 4))
    return np.unique(np.concatenate([picks, [0, num_frames - 1], run])).astype(np.int32)


def closest_offsets(frames_FHWC: np.ndarray, reference: dict[int, np.ndarray], indices) -> list[int]:
    """For each decoded frame, the offset o in OFFSETS whose reference frame index+o is closest (mean abs
    difference); ties go to 0, so a static scene does not read as a wrong frame."""
    out = []
    for frame, k in zip(frames_FHWC.astype(np.int16), indices):
        errors = {
            o: float(np.abs(frame - reference[k + o].astype(np.int16)).mean())
            for o in OFFSETS
            if k + o in reference
        }
        best = min(errors.values())
        out.append(0 if errors[0] == best else min(errors, key=errors.__getitem__))
    return out


def compare_sample(video, num_frames: int, seed: int, *, gpu: bool) -> dict:
    from pipeline.torch_loader import decode_frames

    idx = indices_to_check(num_frames, seed)
    around = sorted({int(k + o) for k in idx for o in OFFSETS if 0 <= k + o < num_frames})
    reference = dict(zip(around, decode_frames(video, np.array(around))))
    row = {"num_frames": num_frames, "indices": len(idx)}
    if not gpu:
        return {**row, "dali": "skipped: no CUDA"}
    from pipeline.dali_loader import decode_frames_dali

    dali = decode_frames_dali(video, idx, gpu=True)
    ref = np.stack([reference[int(k)] for k in idx])
    if dali.shape != ref.shape:
        return {**row, "frame_exact": False, "error": f"shape {dali.shape} against PyAV's {ref.shape}"}
    diff = np.abs(dali.astype(np.int16) - ref.astype(np.int16))
    offsets = closest_offsets(dali, reference, idx)
    return {
        **row,
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": round(float(diff.mean()), 3),
        "wrong_frames": sum(o != 0 for o in offsets),
        "frame_exact": all(o == 0 for o in offsets),
    }


def compare_shards(index, *, gpu: bool) -> list[dict]:
    """One row per distinct sample of the index's val split (each clip once)."""
    dataset = ShardDataset(index, "val")
    rows = []
    for i in range(len(dataset)):
        sample = dataset[i]
        row = compare_sample(sample.video, sample.num_frames, seed=i, gpu=gpu)
        rows.append({"key": sample.key, **row})
    return rows
