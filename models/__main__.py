"""Parameter counts and multiply-accumulates per clip of registered models (the README's model table).

    python -m models                          # every name, 400 classes, one 8 x 224 x 224 clip
    python -m models tsm_mbv2 tsm_r50_nl --frames 16

Counted on the meta device (nothing is allocated or computed) with torch.utils.flop_counter in eval mode:
GMACs = FLOPs / 2 of the convolutions and linear layers, and separately of the batched matrix products
(the non-local blocks' attention); elementwise work (BN, activations, gates, pooling) is not counted.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import build_model, list_models

_CONV_LINEAR = {"aten.convolution", "aten.addmm", "aten.mm"}


def count(name: str, *, num_classes: int = 400, frames: int = 8, size: int = 224) -> dict:
    """{'params', 'conv_linear_gmacs', 'matmul_gmacs'} of one clip through build_model(name)."""
    with torch.device("meta"):
        model = build_model(name, num_classes, frames).eval()
        clip = torch.empty(1, model.input_frames, 3, size, size)  # TDN: 5 frames per segment
    with FlopCounterMode(display=False) as counter:
        model(clip)
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    conv_linear = sum(n for op, n in flops.items() if op in _CONV_LINEAR)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "conv_linear_gmacs": conv_linear / 2e9,
        "matmul_gmacs": (counter.get_total_flops() - conv_linear) / 2e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="registry names (default: all of models.list_models())")
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument(
        "--frames", type=int, default=8, help="num_segments (T) of the clip (TDN: 5 frames each)"
    )
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in list_models()]
    if unknown:
        sys.stderr.write(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}\n")
        return 2
    sys.stdout.write(
        f"{'model':<18} {'params':>12} {'GMACs conv+linear':>18} {'GMACs matmul':>13}"
        f"   (1 clip of {args.frames} x {args.size} x {args.size}, {args.classes} classes)\n"
    )
    for name in args.names or list_models():
        c = count(name, num_classes=args.classes, frames=args.frames, size=args.size)
        sys.stdout.write(
            f"{name:<18} {c['params']:>12,} {c['conv_linear_gmacs']:>18.2f} {c['matmul_gmacs']:>13.2f}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
