"""Labels for one video file: `python train.py predict CKPT VIDEO [--classes FILE] [--top 5]`.

The clip is rendered exactly as the val loader renders it (pipeline.sampling frame indices and centre crop,
the torch loader's decode, resize and normalisation), so a checkpoint scores a file the way it was validated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import config as C
from checkpoints import checkpoint_model


class PredictError(RuntimeError):
    """A video or class list predict cannot use; the message names it."""


def read_clip(video: str | Path, cfg: C.Config) -> torch.Tensor:
    """One clip x_1TCHW of a video file as the val loader renders it."""
    import av

    from pipeline import sampling
    from pipeline.loader import Views
    from pipeline.torch_loader import render_views

    try:
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError) as e:
        raise PredictError(f"cannot decode {video}: {e}") from None
    if not frames:
        raise PredictError(f"{video} has no video frames")
    d = cfg.data
    u = sampling.frame_draws(None, mode="val", sampling=d.sampling, num_segments=d.num_segments)
    idx = sampling.frame_indices(len(frames), u, sampling=d.sampling, dense_stride=d.dense_stride)
    h, w = frames[0].shape[:2]
    boxes, flips, size = sampling.eval_crop_boxes(
        w, h, scale_size=d.scale_size, crop_size=d.crop_size, num_crops=1
    )
    x_VTHWC = render_views(
        np.stack([frames[i] for i in idx.ravel()]), Views(u, boxes, flips, size), d.num_segments
    )
    return x_VTHWC.permute(0, 1, 4, 2, 3)


@torch.no_grad()
def predict(
    checkpoint: str, video: str, *, classes_file: str = "", top: int = 5, device: str = "cpu"
) -> list[tuple[str, float]]:
    """The `top` most likely classes of one video file, with their softmax scores."""
    model, cfg, classes = checkpoint_model(checkpoint, torch.device(device))
    if classes_file:
        classes = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
    if len(classes) != cfg.model.num_classes:
        raise PredictError(
            f"{checkpoint} has {cfg.model.num_classes} classes but the class list has "
            f"{len(classes)}: pass the list it was trained with via --classes FILE"
        )
    probs = model(read_clip(video, cfg).to(device)).float().softmax(-1)[0]
    scores, ids = probs.topk(min(top, len(classes)))
    return [(classes[i], float(s)) for s, i in zip(scores.tolist(), ids.tolist())]


def main(argv: list[str]) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python train.py predict")
    parser.add_argument("checkpoint")
    parser.add_argument("video")
    parser.add_argument(
        "--classes", default="", help="class names, one a line (default: those in the checkpoint)"
    )
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name, score in predict(
        args.checkpoint, args.video, classes_file=args.classes, top=args.top, device=args.device
    ):
        sys.stdout.write(f"{score:7.2%}  {name}\n")
