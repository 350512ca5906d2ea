"""Paths and data shared by the test files: the repository, ../shared/data, a preprocess runner, and one
tiny synthetic dataset (built once per session by the preprocess CLI, as `make train` builds the demo set)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# GCVIDEO_SHARED_DATA: where ../shared/data is when the tests run from a copy of the project elsewhere
# (`make mutate` runs them from mutants/, one level deeper).
DATA = Path(os.environ.get("GCVIDEO_SHARED_DATA") or ROOT.parent / "shared" / "data")
VIDEOS = DATA / "videos"
KINETICS = VIDEOS / "kinetics"
EDGE = VIDEOS / "edge"
K400_CLASSES = DATA / "annotations" / "label_maps" / "kinetics_label_map_k400.txt"
# 8 classes x (4 train + 2 val) clips of 8 frames at 32x32: seconds to build and to train on
TINY_SYNTHETIC = ["--train-per-class", "4", "--val-per-class", "2", "--frames", "8", "--frame-size", "32"]


def run_preprocess(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m preprocess ARGV --no-progress` from the repository root; a non-zero exit fails the test."""
    cmd = [sys.executable, "-m", "preprocess", *argv, "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory) -> Path:
    """index.json of the tiny synthetic dataset (MJPEG, 32 train and 16 val clips)."""
    out = tmp_path_factory.mktemp("tiny-synthetic")
    run_preprocess("synthetic", "--out", str(out), *TINY_SYNTHETIC, "--workers", "1")
    return out / "index.json"


def tiny_args(index: Path, out: Path, batch_size: int) -> list[str]:
    """Tiny clips on the torch loader in-process, no warm-up, no live view, TensorBoard or final
    evaluation."""
    return [
        "--data.index",
        str(index),
        "--run.out",
        str(out),
        "--data.num_segments",
        "4",
        "--data.crop_size",
        "28",
        "--data.scale_size",
        "32",
        "--data.batch_size",
        str(batch_size),
        "--data.backend",
        "torch",
        "--data.workers",
        "0",
        "--optim.warmup_epochs",
        "0",
        "--run.device",
        "cpu",
        "--run.live",
        "false",
        "--run.tensorboard",
        "false",
        "--run.final_eval",
        "false",
    ]
