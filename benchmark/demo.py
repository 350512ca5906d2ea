"""`make train` measured: wall time of the demo from nothing (data generation, training, final evaluation)
and the accuracy it reaches, with the frame-order-blind TSN control.

    python -m benchmark demo                  # demo + demo_tsn, each from a fresh dataset and run directory
    python -m benchmark demo --no-control     # the demo only

Each step runs as its own process, exactly as a user runs it; the row records the CPU's instruction-set
class, since machines sold under one name differ ~3x in speed (the demo must fit the slowest).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark.common import cpu_isa, write_results

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-control", action="store_true", help="skip the demo_tsn control run")
    parser.add_argument("--extra", default="", help="more train.py options for both runs, space-separated")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run_preset(preset: str, work: Path, extra: list[str]) -> dict:
    data, run = work / f"{preset}-data", work / f"{preset}-run"
    data_s = timed([sys.executable, "-m", "preprocess", "synthetic", "--out", str(data), "--no-progress"])
    args = ["--preset", preset, "--data.index", str(data / "index.json"), "--run.out", str(run)]
    train_s = timed(
        [sys.executable, "train.py", *args, "--run.live", "false", "--run.tensorboard", "false", *extra]
    )
    report = json.loads((run / "eval-val" / "results.json").read_text())
    epochs = len((run / "metrics.jsonl").read_text().splitlines())
    return {
        "preset": preset,
        "cpu_isa": cpu_isa(),
        "data_s": round(data_s, 1),
        "train_and_eval_s": round(train_s, 1),
        "total_s": round(data_s + train_s, 1),
        "epochs": epochs,
        "top1": round(report["top1"], 4),
        "top5": round(report["top5"], 4),
        "pair_accuracy": round(report.get("pair_accuracy", float("nan")), 4),
    }


def main(args: argparse.Namespace) -> None:
    presets = ["demo"] + ([] if args.no_control else ["demo_tsn"])
    with tempfile.TemporaryDirectory(prefix="gcvideo-bench-demo-") as tmp:
        rows = [run_preset(p, Path(tmp), args.extra.split()) for p in presets]
    meta = {
        "what": "wall time of `make train` from nothing, split into data generation and training + final "
        "evaluation; accuracy of best.pt on the 512 validation clips",
        "target": "under 8 minutes on the slowest 2-core CPU (AVX2-only), >= 90% val top-1",
    }
    write_results("demo", rows, meta=meta)
