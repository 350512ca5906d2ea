"""Export a trained model to ONNX and check it against PyTorch with ONNX Runtime.

    python -m models.export runs/demo/best.pt model.onnx                       # a gcvideo checkpoint
    python -m models.export tsm_r50_k400.pth model.onnx --model tsm_r50 --num-segments 8   # a state_dict

The graph takes `clips` (batch, T, 3, size, size) float32, frames normalised as in training, and returns
`logits` (batch, num_classes), the average of the per-frame logits as in VideoNet.forward.

Axes. batch is dynamic by default (`--batch N` fixes it). T is static, always: the temporal shift and the GC
calibrators regroup the N*T frame batch with reshape(-1, num_segments, ...), so T is baked into the graph and
a clip of another length would be split into wrong clips. The spatial size is static too (`--size`, 224 by
default): every operator would accept another size, but TensorRT builds its fastest kernels for fixed shapes
and a model is evaluated at the one crop size it was trained for.

Opset. 18 by default: the lowest opset that torch.onnx's torch.export-based exporter (the supported one; the
TorchScript exporter is deprecated) emits, since its Pad cannot be converted down to 17. TensorRT's ONNX
parser reads opsets 9-20 from TensorRT 10.0 on (8.x stops at 17), so the default builds on every TensorRT
10.x and later. Every node is in the default ONNX domain: the shift is Split / Slice / Pad / Concat and the
calibrators are Conv / ReduceMean / Gemm / Sigmoid / Mul, so no custom op or plugin is needed.

On a GPU machine with TensorRT (not run here), a bf16 engine for batches of 1 to 32 clips of 8 frames:

    trtexec --onnx=model.onnx --bf16 --saveEngine=model.plan \\
        --minShapes=clips:1x8x3x224x224 --optShapes=clips:8x8x3x224x224 --maxShapes=clips:32x8x3x224x224

(--fp16 on GPUs without bf16; drop the shape flags for an export with a static --batch.)
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import checkpoints
import config

from . import list_models
from .video import VideoNet

DEFAULT_OPSET = 18
# fp32 ONNX Runtime vs PyTorch on the same CPU: differences come from summation order only (~1e-6 on logits
# of magnitude ~1); 1e-4 of the largest logit (at least 1) flags a wrong graph, not rounding.
CHECK_RTOL = 1e-4


def export_onnx(
    model: VideoNet,
    path: str | Path,
    *,
    size: int = 224,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Write `model` (put in eval mode) as a self-contained ONNX file; batch None: a dynamic batch axis."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} < {DEFAULT_OPSET}: torch.onnx's exporter emits opset 18 or later")
    model.eval()
    # Two clips: torch.export specialises an axis of size 1, so the example must not fix the batch to 1.
    example = torch.zeros(batch or 2, model.input_frames, 3, size, size)
    dynamic_shapes = None if batch else ({0: torch.export.Dim("batch")},)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["clips"],
        output_names=["logits"],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    # One file, weights inside: ResNet-101 is ~170 MB, far below protobuf's 2 GB limit.
    program.save(str(path), external_data=False)


def check_onnx(
    model: VideoNet, path: str | Path, *, batches: tuple[int, ...] = (1, 3), seed: int = 0
) -> tuple[float, float]:
    """(max abs difference between ONNX Runtime (CPU) and PyTorch logits, max abs PyTorch logit) on random
    clips of each batch size."""
    import onnxruntime  # a dev dependency, needed by nothing else

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (clip_input,) = session.get_inputs()
    _, frames, channels, height, width = clip_input.shape
    generator = torch.Generator().manual_seed(seed)
    worst, scale = 0.0, 0.0
    model.eval()
    for batch in batches:
        clips = torch.randn(batch, frames, channels, height, width, generator=generator)
        with torch.no_grad():
            expected = model(clips).numpy()
        (got,) = session.run(["logits"], {clip_input.name: clips.numpy()})
        worst = max(worst, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return worst, scale


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("weights", help="gcvideo checkpoint (last.pt / best.pt) or a plain state_dict")
    parser.add_argument("out", help="ONNX file to write")
    parser.add_argument("--model", help="registry name (required for a state_dict; see models.list_models())")
    parser.add_argument("--num-classes", type=int, help="default: the checkpoint's config, or fc.weight rows")
    parser.add_argument("--num-segments", type=int, help="frames per clip T (default: checkpoint, or 8)")
    parser.add_argument("--size", type=int, default=224, help="frame height and width (default 224)")
    parser.add_argument("--batch", type=int, help="a static batch size (default: dynamic)")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"default {DEFAULT_OPSET}, minimum 18"
    )
    return parser


def usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line before any file is read, or None."""
    if args.model is not None and args.model not in list_models():
        return f"unknown model {args.model!r}; known: {', '.join(list_models())}"
    if args.opset < DEFAULT_OPSET:
        return f"--opset {args.opset}: torch.onnx's exporter emits opset {DEFAULT_OPSET} or later"
    if args.size < 32 or (args.batch is not None and args.batch < 1):
        return "--size must be >= 32 and --batch >= 1"
    if not Path(args.weights).is_file():
        return f"{args.weights} not found"
    return None


def fail(message: str, code: int) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 exported and checked, 2 a mistake on the command line, 1 files that cannot give a model
    or a faithful graph."""
    args = build_parser().parse_args(argv)
    # The exporter logs a warning per torchvision op it skips (torchvision is not needed here) and torch's
    # pytree a FutureWarning about its own internals: neither is actionable for a user of this command.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    problem = usage_error(args)
    if problem is not None:
        return fail(problem, 2)
    try:
        loaded = checkpoints.load_model(
            args.weights,
            name=args.model,
            num_classes=args.num_classes,
            num_segments=args.num_segments,
            hint="--model NAME [--num-segments 8]",
        )
    except (checkpoints.CheckpointError, config.ConfigError) as err:
        return fail(str(err), 1)
    model, name = loaded.model, loaded.cfg.model.name
    try:
        export_onnx(model, args.out, size=args.size, batch=args.batch, opset=args.opset)
        diff, scale = check_onnx(model, args.out, batches=(args.batch,) if args.batch else (1, 3))
    except ModuleNotFoundError as err:  # torch.onnx imports onnx and onnxscript only when it exports
        return fail(f"{err.name} is missing: install the dev extras (pip install -e '.[dev]')", 1)
    except OSError as err:
        return fail(f"cannot write {args.out}: {err}", 1)
    batch_axis = f"static {args.batch}" if args.batch else "dynamic"
    t, size = model.input_frames, args.size
    sys.stdout.write(
        f"{name} ({model.fc.out_features} classes, T={t}) -> {args.out}: "
        f"clips (batch {batch_axis}, {t}, 3, {size}, {size}), opset {args.opset}\n"
    )
    sys.stdout.write(
        f"ONNX Runtime vs PyTorch on random clips: max abs diff {diff:.3g} (logits up to {scale:.3g})\n"
    )
    tolerance = CHECK_RTOL * max(scale, 1.0)
    if diff > tolerance:
        return fail(f"ONNX Runtime and PyTorch disagree: max abs diff {diff:.3g} > {tolerance:.3g}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
