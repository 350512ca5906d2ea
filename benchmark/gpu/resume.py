"""The suite's multi-process step: train.py under torchrun (NCCL on a GPU, gloo in the CPU rehearsal) for
two epochs straight, twice, and once stopped mid-epoch by --run.max_steps then continued with --resume.

The resumed run must end where the straight one does: the same step, and weights as close to it as two
straight runs are to each other (on a GPU some kernels are not bit-deterministic, so the two straight runs
give the noise floor; on a CPU it is zero, the second straight run is skipped, and the match must be exact
to float precision).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import checkpoints

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 2
CPU_SAMPLES = 20  # the rehearsal's train split: 5 steps an epoch at batch 4


def train_command(index: Path, out: Path, sizes, *, gpu: bool, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["train.py", "--preset", "gc_tsm_r50_k400_8f" if gpu else "demo"]
    options = {
        "model.name": sizes.train_model,
        "model.pretrained": "",
        "model.compile": "false",  # three runs: compiling each would spend the step's budget on compilation
        "data.index": str(index),
        "data.batch_size": sizes.train_batch,
        "data.crop_size": sizes.train_crop,
        "data.scale_size": sizes.train_crop * 8 // 7,
        "data.num_segments": 8,
        "data.backend": "dali-gpu" if gpu else "torch",
        "data.workers": 4 if gpu else 0,
        "optim.epochs": EPOCHS,
        "optim.warmup_epochs": 0,
        "run.out": str(out),
        "run.device": "cuda" if gpu else "cpu",
        "run.dist_backend": "nccl" if gpu else "gloo",
        "run.live": "false",
        "run.tensorboard": "false",
        "run.final_eval": "false",
        "run.overwrite": "true",
    }
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    return cmd + extra


def run(cmd: list[str], log_path: Path) -> float:
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_path.read_text()[-1500:]
        raise RuntimeError(f"{' '.join(cmd[3:8])}... exited {done.returncode}:\n{tail}")
    return round(time.monotonic() - t0, 1)


def weights_distance(a: Path, b: Path) -> tuple[int, int, float]:
    """(step of a, step of b, max over tensors of |a - b| / (|a| + 1e-12)) of two last.pt files."""
    ca, cb = checkpoints.load(a), checkpoints.load(b)
    worst = 0.0
    for k, ta in ca["model"].items():
        if ta.is_floating_point():
            tb = cb["model"][k]
            worst = max(worst, float((ta - tb).norm() / (ta.norm() + 1e-12)))
    return int(ca["state"]["step"]), int(cb["state"]["step"]), worst


def rehearsal_index(index: Path, samples: int) -> Path:
    """index_rehearsal.json beside the kit's index (shard paths stay relative to the dataset folder), with
    the train split cut to the first `samples` listed: a few steps an epoch at the CPU rehearsal's sizes."""
    meta = json.loads(index.read_text())
    shards, kept = [], 0
    for shard in meta["splits"]["train"]["shards"]:
        if kept >= samples:
            break
        shards.append(shard)
        kept += shard["num_samples"]
    meta["splits"]["train"] = {"num_samples": kept, "shards": shards}
    out = index.with_name("index_rehearsal.json")
    out.write_text(json.dumps(meta))
    return out


def straight_and_resumed(index: Path, work: Path, sizes, *, gpu: bool) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if not gpu:
        index = rehearsal_index(index, CPU_SAMPLES)
    meta = json.loads(index.read_text())
    per_epoch = sum(s["num_samples"] for s in meta["splits"]["train"]["shards"]) // sizes.train_batch
    stop_at = per_epoch + per_epoch // 2  # inside the second epoch
    seconds = {}
    # the CPU is deterministic (noise floor 0): the rehearsal skips the second straight run
    runs = ["straight", "straight_again", "stopped"] if gpu else ["straight", "stopped"]
    for name in runs:
        extra = ["--run.max_steps", str(stop_at)] if name == "stopped" else []
        seconds[name] = run(
            train_command(index, work / name, sizes, gpu=gpu, extra=extra), work / f"{name}.log"
        )
    resumed = train_command(index, work / "stopped", sizes, gpu=gpu, extra=["--resume"])
    resumed = _drop_option(resumed, "--run.overwrite")
    seconds["resumed"] = run(resumed, work / "resumed.log")
    noise = 0.0
    if gpu:
        _, _, noise = weights_distance(work / "straight" / "last.pt", work / "straight_again" / "last.pt")
    steps, resumed_steps, diff = weights_distance(work / "straight" / "last.pt", work / "stopped" / "last.pt")
    tolerance = 3 * noise + 1e-6
    return {
        "device": "cuda" if gpu else "cpu",
        "backend": "nccl" if gpu else "gloo",
        "torch": torch.__version__,
        "steps_per_epoch": per_epoch,
        "epochs": EPOCHS,
        "stopped_at_step": stop_at,
        "straight_steps": steps,
        "resumed_steps": resumed_steps,
        "noise_floor_rel_diff": noise,
        "resumed_rel_diff": diff,
        "tolerance": tolerance,
        "resume_matches": steps == resumed_steps == EPOCHS * per_epoch and diff <= tolerance,
        "run_seconds": seconds,  # whole processes: start-up, NCCL, the loaders, validation included
        "clips_per_s_straight": EPOCHS * per_epoch * sizes.train_batch / seconds["straight"],
    }


def _drop_option(cmd: list[str], option: str) -> list[str]:
    """cmd without `option VALUE`."""
    if option not in cmd:
        return cmd
    i = cmd.index(option)
    return cmd[:i] + cmd[i + 2 :]
