"""Model throughput: GC-TSM-R50 against TSM-R50 (or any registered names, `--models`), forward and
forward+backward, in four execution modes.

Modes: eager fp32 NCHW, channels_last (fp32), bf16 autocast (channels_last), compiled (torch.compile, bf16,
channels_last). Synthetic input, warm-up, synchronised timers, medians. The GC overhead is how much longer a
gc_* step takes than the same name without 'gc_' (gc_tsm_mbv2 against tsm_mbv2) in the same mode, where
both were measured. `--models tables` adds the other rows of the GC/TSM tables: the MobileNetV2, non-local
and ResNeXt-101 names. `--quick` (CPU): batch 2 x 8 frames x 112 px and no
compiled mode unless asked (compiling two ResNet-50s for forward and backward takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from rich.progress import Progress

import runtime
from benchmark.common import Plot, device_sync, summary, timeit, write_results
from models import build_model, list_models

log = logging.getLogger(__name__)

MODES = {  # name -> (channels_last, precision, compile)
    "eager_fp32_nchw": (False, "fp32", False),
    "channels_last": (True, "fp32", False),
    "bf16_autocast": (True, "bf16", False),
    "compiled": (True, "bf16", True),
}
MODELS = ("tsm_r50", "gc_tsm_r50")
TABLE_MODELS = (
    *MODELS,
    "tsn_mbv2",
    "tsm_mbv2",
    "gc_tsm_mbv2",
    "tsm_r50_nl",
    "tsn_rx101",
    "tsm_rx101",
    "gc_tsm_rx101",
)


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default 2 quick, 16 full)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (num_segments)")
    parser.add_argument(
        "--size", type=int, default=None, help="frame side in pixels (default 112 quick, 224 full)"
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated subset of {','.join(MODES)} (default: all; quick: all but compiled)",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated build_model names, or 'tables' for {','.join(TABLE_MODELS)} "
        f"(default {','.join(MODELS)})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores; 1 is steadier on a shared machine)",
    )


def model_names(spec: str) -> list[str]:
    """'tables' or comma-separated registry names -> names; SystemExit naming unknown ones."""
    names = list(TABLE_MODELS) if spec == "tables" else spec.split(",")
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; known: {', '.join(list_models())} (or 'tables')")
    return names


def _measure(model, x, labels, *, precision: str, device: torch.device, warmup: int, iters: int) -> dict:
    sync = device_sync(device)

    def forward():
        with torch.no_grad(), runtime.autocast(precision, device.type):
            model(x)

    def forward_backward():
        with runtime.autocast(precision, device.type):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    fwd = summary(timeit(forward, warmup=warmup, iters=iters, sync=sync), items_per_call=x.shape[0])
    model.train()
    train = summary(
        timeit(forward_backward, warmup=warmup, iters=iters, sync=sync), items_per_call=x.shape[0]
    )
    return {
        "fwd_median_s": fwd["median_s"],
        "fwd_clips_per_s": fwd["per_s"],
        "train_median_s": train["median_s"],
        "train_clips_per_s": train["per_s"],
    }


def main(args: argparse.Namespace) -> int:
    device = torch.device(getattr(args, "device", "cpu"))
    quick = getattr(args, "quick", device.type == "cpu")
    batch = getattr(args, "batch", None) or (2 if quick else 16)
    frames = getattr(args, "frames", 8)
    size = getattr(args, "size", None) or (112 if quick else 224)
    modes_arg = getattr(args, "modes", None)
    modes = modes_arg.split(",") if modes_arg else [m for m in MODES if not (quick and MODES[m][2])]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {', '.join(MODES)}")
    names = model_names(getattr(args, "models", ",".join(MODELS)))
    warmup = args.warmup if getattr(args, "warmup", None) is not None else (2 if quick else 10)
    iters = args.iters if getattr(args, "iters", None) is not None else (5 if quick else 30)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(getattr(args, "seed", 0))
    clips: dict[int, torch.Tensor] = {}  # input frames -> clip batch (TDN takes 5 frames per segment)

    def clip_batch(model) -> torch.Tensor:
        t = runtime.unwrap_model(model).input_frames
        if t not in clips:
            clips[t] = torch.randn(batch, t, 3, size, size, device=device)
        return clips[t]

    labels = torch.randint(0, 400, (batch,), device=device)

    # oneDNN builds its kernels on first use: prime them so the first configuration is not charged for it.
    primer = runtime.setup_model(build_model(names[0], 400, frames), device=device, channels_last=False)
    _measure(primer, clip_batch(primer), labels, precision="fp32", device=device, warmup=1, iters=1)
    del primer

    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("model benchmark", total=len(modes) * len(names))
        for mode in modes:
            channels_last, precision, compile_ = MODES[mode]
            for name in names:
                progress.update(task, description=f"{name} {mode}")
                torch._dynamo.reset()  # each compiled model starts from empty caches, as in a fresh process
                model = runtime.setup_model(
                    build_model(name, 400, frames),
                    device=device,
                    channels_last=channels_last,
                    compile=compile_,
                )
                row = {"model": name, "mode": mode, "batch": batch, "frames": frames, "size": size}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                row |= _measure(
                    model,
                    clip_batch(model),
                    labels,
                    precision=precision,
                    device=device,
                    warmup=warmup,
                    iters=iters,
                )
                if device.type == "cuda":  # forward+backward's activations: the peak of the two
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                rows.append(row)
                log.info(
                    "%-12s %-16s fwd %.2f clips/s, fwd+bwd %.2f clips/s",
                    name,
                    mode,
                    row["fwd_clips_per_s"],
                    row["train_clips_per_s"],
                )
                del model
                progress.advance(task)

    by_key = {(r["model"], r["mode"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["model"].removeprefix("gc_"), row["mode"]))
        if row["model"].startswith("gc_") and base is not None:
            row["gc_overhead_fwd_pct"] = 100 * (row["fwd_median_s"] / base["fwd_median_s"] - 1)
            row["gc_overhead_train_pct"] = 100 * (row["train_median_s"] / base["train_median_s"] - 1)
    meta = {
        "device": str(device),
        "quick": quick,
        "batch": batch,
        "frames": frames,
        "size": size,
        "warmup": warmup,
        "iters": iters,
        "threads": torch.get_num_threads(),
        "modes": {m: dict(zip(("channels_last", "precision", "compile"), MODES[m])) for m in modes},
    }
    write_results(
        "model",
        rows,
        meta=meta,
        plots=[
            Plot(x="mode", y="fwd_clips_per_s", group="model", title=f"Forward, {batch}x{frames}x{size}px"),
            Plot(
                x="mode",
                y="train_clips_per_s",
                group="model",
                title=f"Forward+backward, {batch}x{frames}x{size}px",
            ),
        ],
    )
    return 0
