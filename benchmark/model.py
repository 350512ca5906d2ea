"""Model throughput: GC-TSM-R50 against TSM-R50 (or any registered names, `--models`), forward and
forward+backward, in four execution modes.

Modes: eager fp32 NCHW, channels_last (fp32), bf16 autocast (channels_last), compiled (torch.compile, bf16,
channels_last). Synthetic input, warm-up, synchronised timers, medians. The GC overhead is how much longer a
gc_* step takes than the same name without 'gc_' (gc_tsm_mbv2 against tsm_mbv2) in the same mode, where
both were measured. `--models tables` adds the other rows of the GC/TSM tables: the MobileNetV2, non-local
and ResNeXt-101 names. `--quick` (CPU): batch 2 x 8 frames x 112 px and no
compiled mode unless asked (compiling two ResNet-50s for forward and backward takes minutes on 2 cores).
On a CPU without native bf16 (AVX512-BF16 or AMX) the bf16 modes are skipped unless `--modes` names them:
emulated bf16 is ~10x slower than fp32 and would take most of the time; their rows say why.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

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
        help="torch CPU threads (default: all cores; --quick on a busy CPU: 1, steadier when shared)",
    )


def model_names(spec: str) -> list[str]:
    """'tables' or comma-separated registry names -> names; SystemExit naming unknown ones."""
    names = list(TABLE_MODELS) if spec == "tables" else spec.split(",")
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; known: {', '.join(list_models())} (or 'tables')")
    return names


def skipped_modes(modes: list[str], device: torch.device) -> dict[str, str]:
    """The default modes not worth measuring here, with the reason: bf16 on a CPU without native bf16 is
    emulated, ~10x slower than fp32 (there `--run.precision auto` picks fp32); `--modes` measures them."""
    if device.type != "cpu" or runtime.cpu_has_native_bf16():
        return {}
    why = (
        "bf16 autocast is emulated on this CPU (no AVX512-BF16 or AMX), ~10x slower than fp32, and "
        "--run.precision auto trains fp32 here; --modes MODE measures it anyway"
    )
    return {m: why for m in modes if MODES[m][1] == "bf16"}


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


@dataclass
class Settings:
    device: torch.device
    quick: bool
    batch: int
    frames: int
    size: int
    modes: list[str]
    skipped: dict[str, str]  # mode -> why it is not measured
    names: list[str]
    warmup: int
    iters: int


def settings(args: argparse.Namespace) -> Settings:
    """The run's settings from the command line and the mode's defaults; sets torch's CPU threads."""
    device = torch.device(getattr(args, "device", "cpu"))
    quick = getattr(args, "quick", device.type == "cpu")
    modes_arg = getattr(args, "modes", None)
    modes = modes_arg.split(",") if modes_arg else [m for m in MODES if not (quick and MODES[m][2])]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {', '.join(MODES)}")
    given = {k: getattr(args, k, None) for k in ("warmup", "iters", "threads")}
    if device.type == "cpu":
        torch.set_num_threads(given["threads"] or cpu_threads(quick))
    return Settings(
        device=device,
        quick=quick,
        batch=getattr(args, "batch", None) or (2 if quick else 16),
        frames=getattr(args, "frames", 8),
        size=getattr(args, "size", None) or (112 if quick else 224),
        modes=modes,
        skipped={} if modes_arg else skipped_modes(modes, device),
        names=model_names(getattr(args, "models", ",".join(MODELS))),
        warmup=given["warmup"] if given["warmup"] is not None else (1 if quick else 10),
        iters=given["iters"] if given["iters"] is not None else (3 if quick else 30),
    )


def cpu_threads(quick: bool) -> int:
    """Every core, but 1 for --quick on a busy CPU: torch's OpenMP threads spin at their barriers while
    other jobs hold the cores (measured on 2 cores at load 12: a quick run took 15 minutes, its steps 15x
    the idle ones)."""
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    if quick and cores > 1 and load >= cores:
        log.info(
            "the CPU is busy (load average %.1f on %d cores): 1 torch thread (--threads to choose)",
            load,
            cores,
        )
        return 1
    return cores


def measure_rows(s: Settings) -> list[dict]:
    """One row per model and mode: measured, or skipped with the reason."""
    clips: dict[int, torch.Tensor] = {}  # input frames -> clip batch (TDN takes 5 frames per segment)

    def clip_batch(model) -> torch.Tensor:
        t = runtime.unwrap_model(model).input_frames
        if t not in clips:
            clips[t] = torch.randn(s.batch, t, 3, s.size, s.size, device=s.device)
        return clips[t]

    labels = torch.randint(0, 400, (s.batch,), device=s.device)
    # oneDNN builds its kernels on first use: prime them so the first configuration is not charged for it.
    primer = runtime.setup_model(build_model(s.names[0], 400, s.frames), device=s.device, channels_last=False)
    _measure(primer, clip_batch(primer), labels, precision="fp32", device=s.device, warmup=1, iters=1)
    del primer

    rows: list[dict] = [
        {"model": n, "mode": m, "skipped": why} for m, why in s.skipped.items() for n in s.names
    ]
    for mode, why in s.skipped.items():
        log.info("%s skipped: %s", mode, why)
    measured = [(mode, name) for mode in s.modes if mode not in s.skipped for name in s.names]
    with Progress(transient=True) as progress:
        task = progress.add_task("model benchmark", total=len(measured))
        for mode, name in measured:
            progress.update(task, description=f"{name} {mode}")
            rows.append(measure_row(s, mode, name, clip_batch, labels))
            log.info(
                "%-12s %-16s fwd %.2f clips/s, fwd+bwd %.2f clips/s",
                name,
                mode,
                rows[-1]["fwd_clips_per_s"],
                rows[-1]["train_clips_per_s"],
            )
            progress.advance(task)
    return rows


def measure_row(s: Settings, mode: str, name: str, clip_batch, labels: torch.Tensor) -> dict:
    """One model in one mode, built afresh: its medians (and on a GPU the peak memory)."""
    channels_last, precision, compile_ = MODES[mode]
    torch._dynamo.reset()  # each compiled model starts from empty caches, as in a fresh process
    model = runtime.setup_model(
        build_model(name, 400, s.frames), device=s.device, channels_last=channels_last, compile=compile_
    )
    row = {"model": name, "mode": mode, "batch": s.batch, "frames": s.frames, "size": s.size}
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    row |= _measure(
        model, clip_batch(model), labels, precision=precision, device=s.device, warmup=s.warmup, iters=s.iters
    )
    if s.device.type == "cuda":  # forward+backward's activations: the peak of the two
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    return row


def main(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()[0]
    s = settings(args)
    torch.manual_seed(getattr(args, "seed", 0))
    rows = measure_rows(s)
    by_key = {(r["model"], r["mode"]): r for r in rows if "skipped" not in r}
    for row in by_key.values():
        base = by_key.get((row["model"].removeprefix("gc_"), row["mode"]))
        if row["model"].startswith("gc_") and base is not None:
            row["gc_overhead_fwd_pct"] = 100 * (row["fwd_median_s"] / base["fwd_median_s"] - 1)
            row["gc_overhead_train_pct"] = 100 * (row["train_median_s"] / base["train_median_s"] - 1)
    meta = {
        "device": str(s.device),
        "quick": s.quick,
        "batch": s.batch,
        "frames": s.frames,
        "size": s.size,
        "warmup": s.warmup,
        "iters": s.iters,
        "threads": torch.get_num_threads(),
        "modes": {m: dict(zip(("channels_last", "precision", "compile"), MODES[m])) for m in s.modes},
        "skipped": s.skipped,
        # other jobs on the CPU show here
        "load_average_1min": f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
    }
    shape = f"{s.batch}x{s.frames}x{s.size}px"
    write_results(
        "model",
        rows,
        meta=meta,
        plots=[
            Plot(x="mode", y="fwd_clips_per_s", group="model", title=f"Forward, {shape}"),
            Plot(x="mode", y="train_clips_per_s", group="model", title=f"Forward+backward, {shape}"),
        ],
    )
    return 0
