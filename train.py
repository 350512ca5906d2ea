"""Train, evaluate and apply TSN/TSM/GC video models.

    python train.py                                   # the demo: make data/synthetic if missing, train, test
    python train.py train --preset gc_tsm_r50_k400_8f --data.index data/k400/index.json --optim.lr 0.01
    torchrun --nproc_per_node 8 train.py train --preset gc_tsm_r50_k400_8f    # DDP (docs/train.md)
    python train.py train --preset demo --resume                               # continue runs/demo exactly
    python train.py evaluate runs/a/best.pt runs/b/best.pt --eval.num_clips 10 --eval.num_crops 3
    python train.py predict runs/demo/best.pt video.mp4                       # top-5 classes of one video

The script reads top-down, each function before the ones it calls: the run's state; `train` and `fit`, then
the loop they run (setup_run, train_epochs, run_epoch, end_epoch); what those call: resuming, checkpoints,
live feedback, data; the command line last (`main` at the bottom). Everything a run does is decided by one
`config.Config` (presets in config.py, any field overridable as --section.field VALUE); the resolved config
is saved as <run>/config.json and inside every checkpoint. Distribution, precision, channels_last, compile
and DDP come from runtime.py (the distributed state and the device are resolved once per process and passed
down); the optimiser and the step from optimisation.py; evaluation and prediction from evaluation.py and
predict.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

import checkpoints
import config
import evaluation
import optimisation
import predict
import progress
import rundir
import runtime
from pipeline import DatasetError, ResourceError, build_loader
from pipeline.video_file import VideoFileError

log = logging.getLogger("train")
ROOT = Path(__file__).resolve().parent
SYNTHETIC_INDEX = Path("data/synthetic/index.json")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, missing data); the message says why and what to do."""


class Stopped(TrainingError):
    """SIGTERM (a scheduler, `docker stop`, torchrun shutting down) or SIGINT (Ctrl-C) asked the run to end;
    the command exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """The SIGTERM / SIGINT handler. While the training loop runs (`graceful`), the first signal ends the run
    at the next step, after a checkpoint; elsewhere (set-up, evaluation), or at a second signal, the command
    stops at once. Either way it ends in one line, never a traceback."""

    def __init__(self) -> None:
        self.signum, self.graceful = 0, False

    def __call__(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.graceful and not self.signum:
            self.signum = signum
            log.warning("%s: the run ends after this step, with a checkpoint (%s again: at once)", name, name)
            return
        raise Stopped(f"stopped by {name}", signum)


STOP = StopRequest()


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint, restored by --resume."""

    epoch: int = 0
    start_batch: int = 0  # the next batch of `epoch`
    step: int = 0
    best_top1: float = -1.0

    def position(self) -> str:
        """Where the run stands in words, epochs counted from 1 as the live view and metrics.jsonl count."""
        if self.start_batch:
            return f"step {self.step} (batch {self.start_batch} of epoch {self.epoch + 1})"
        return f"step {self.step} (the end of epoch {self.epoch})" if self.epoch else f"step {self.step}"


@dataclass
class Run:
    """What the loop needs besides the state: decided once by setup_run."""

    cfg: config.Config
    out: Path
    dist: runtime.Dist
    device: torch.device
    precision: str
    net: torch.nn.Module  # the model as trained (DDP / compiled wrappers)
    opt: optimisation.Optimisation
    classes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # checkpoints.inference_facts of the training data


# --------------------------------------------------------------------------------------------------- training


def train(
    cfg: config.Config, dist: runtime.Dist | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Build the data (the demo set if missing) and the loaders of `cfg`, then fit. `dist` and `device` are
    the process's (runtime.init_distributed, which `python train.py` calls once); resolved here if not
    given."""
    config.validate(cfg)
    if dist is None or device is None:
        dist, device = runtime.init_distributed(cfg.run.device, cfg.run.dist_backend)
    runtime.use_cpu_threads(device, cfg.run.threads, cfg.data.workers)
    ensure_dataset(cfg.data.index, dist)
    return fit(cfg, *build_loaders(cfg, dist, device), dist, device)


def fit(
    cfg: config.Config, train_loader, val_loader, dist: runtime.Dist, device: torch.device
) -> dict[str, Any]:
    """Train `cfg` with these loaders to the end (or to --run.max_steps) in its locked run directory; the
    last validation and where the run stands."""
    out = (
        rundir.claim(cfg.run.out, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
        if dist.is_main
        else Path(cfg.run.out)
    )
    runtime.barrier(dist)
    try:
        run, state = setup_run(cfg, train_loader, out, dist, device)
        last_val, stopped = train_epochs(run, state, train_loader, val_loader)
    finally:
        if dist.is_main:
            rundir.unlock(out)
    runtime.barrier(run.dist)
    return {
        "out": run.out,
        "val": last_val,
        "best_top1": state.best_top1,
        "step": state.step,
        "epoch": state.epoch,
        "precision": run.precision,
        "device": str(run.device),
        "world_size": run.dist.world_size,
        "stopped_early": stopped,
    }


def setup_run(
    cfg: config.Config, train_loader, out: Path, dist: runtime.Dist, device: torch.device
) -> tuple[Run, TrainState]:
    """Model (fresh, resumed or fine-tuned), optimisation, wrappers; the run directory gets config.json."""
    if cfg.model.sync_bn and (device.type != "cuda" or not dist.enabled):
        raise config.ConfigError("--model.sync_bn needs DDP on CUDA devices (torchrun on GPUs); drop it here")
    precision = runtime.resolve_precision(cfg.run.precision, device)
    seed_everything(cfg.run.seed + dist.rank)
    classes = list(train_loader.classes)
    cfg.model.num_classes = cfg.model.num_classes or len(classes)
    resume = load_resume(cfg, out, dist) if cfg.run.resume else None
    model = checkpoints.build_model(cfg, cfg.model.num_classes)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif cfg.run.tune_from:
        new_fc = checkpoints.load_for_finetuning(model, cfg.run.tune_from)
        log.info(
            "fine-tuning from %s: new classifier %s, lr x%g", cfg.run.tune_from, new_fc, cfg.optim.fc_lr_mult
        )
    global_batch = cfg.data.batch_size * dist.world_size
    opt = optimisation.Optimisation.build(
        model,
        cfg,
        steps_per_epoch=len(train_loader),
        global_batch=global_batch,
        precision=precision,
        device=device,
        fine_tuning=bool(cfg.run.tune_from),
    )
    net = runtime.setup_model(
        model,
        device=device,
        channels_last=cfg.model.channels_last,
        compile=cfg.model.compile,
        ddp=dist.enabled,
        sync_bn=cfg.model.sync_bn,
    )
    state = restore(resume, opt, dist) if resume is not None else TrainState()
    if dist.is_main and cfg.run.resume:
        forget_later_metrics(out, state.epoch)
    if dist.is_main:
        tmp = out / ".config.json.tmp"  # a kill never leaves half a config.json for --resume to read
        tmp.write_text(json.dumps(config.to_dict(cfg), indent=2) + "\n")
        os.replace(tmp, out / "config.json")
        log.info(
            "%s: %s on %s x%d (%s), %d steps/epoch, global batch %d, lr %.4g",
            cfg.preset,
            cfg.model.name,
            device,
            dist.world_size,
            precision,
            len(train_loader),
            global_batch,
            optimisation.scaled_lr(cfg.optim, global_batch),
        )
    facts = checkpoints.inference_facts(cfg.data.index, getattr(train_loader, "dataset", None))
    return Run(cfg, out, dist, device, precision, net, opt, classes, facts), state


def train_epochs(run: Run, state: TrainState, train_loader, val_loader) -> tuple[dict[str, Any], bool]:
    """The epochs from `state` on: (the last validation, whether --run.max_steps stopped the run)."""
    cfg = run.cfg
    total = len(train_loader) * cfg.optim.epochs
    feedback = Feedback(cfg, run.out, total, state.step, enabled=run.dist.is_main)
    meter = Meter(run.device)
    last_val: dict[str, Any] = {}
    stopped = False
    run.net.train()
    started, first_epoch = time.monotonic(), state.epoch
    STOP.signum, STOP.graceful = 0, True
    try:
        while state.epoch < cfg.optim.epochs and not stopped:
            stopped = run_epoch(run, state, train_loader, meter, feedback)
            if not stopped:
                last_val = end_epoch(run, state, val_loader, meter, feedback) or last_val
                signum = stop_requested(run, at_sync=True)
                if signum and state.epoch < cfg.optim.epochs:  # end_epoch wrote the checkpoint
                    raise Stopped(f"stopped by {signal.Signals(signum).name}", signum)
                if cfg.run.target_top1 and last_val.get("top1", 0.0) >= cfg.run.target_top1:
                    log.info(
                        "val top-1 %.1f%% reached --run.target_top1: training ends", 100 * last_val["top1"]
                    )
                    break
                if out_of_time(run, time.monotonic() - started, state.epoch - first_epoch):
                    log.info("another epoch would pass --run.time_budget_min: training ends")
                    break
    except Stopped as e:
        last = run.out / "last.pt"
        kept = (
            f"{last} holds the last checkpoint: continue with --resume" if last.exists() else "no checkpoint"
        )
        raise Stopped(f"{e} at {state.position()}; {kept}", e.signum) from None
    finally:
        STOP.graceful = False
        feedback.close()
    return last_val, stopped


def run_epoch(run: Run, state: TrainState, loader, meter: Meter, feedback: Feedback) -> bool:
    """Train the rest of epoch state.epoch; True when --run.max_steps stopped it (after a checkpoint)."""
    r = run.cfg.run
    steps = len(loader)
    loader.set_epoch(state.epoch, state.start_batch)
    batches = iter(loader)
    meter.reset()
    for b in range(state.start_batch, steps):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # a DataLoader seeds itself from the global RNG:
            x_NTCHW, labels_N = next(batches)  # keep the model's random stream independent of it
        wait = time.perf_counter() - t0
        loss, correct, bad = optimisation.train_step(
            run.net, x_NTCHW, labels_N, run.opt, run.precision, run.device.type
        )
        meter.add(loss, correct, bad, labels_N.shape[0], wait)
        state.step, state.start_batch = state.step + 1, b + 1
        if state.step % r.log_every == 0 or b == steps - 1:
            check_finite(meter.nonfinite, run, state)
            feedback.step(state.step, state.epoch, meter.read(run))
        if r.max_steps and state.step >= r.max_steps:
            write_checkpoint(run, state, meter.nonfinite)
            return True
        signum = stop_requested(run, at_sync=state.step % r.log_every == 0 or b == steps - 1)
        if signum:
            write_checkpoint(run, state, meter.nonfinite)
            raise Stopped(f"stopped by {signal.Signals(signum).name}", signum)
        if r.ckpt_every and state.step % r.ckpt_every == 0 and b < steps - 1:
            write_checkpoint(run, state, meter.nonfinite)
    return False


def end_epoch(run: Run, state: TrainState, val_loader, meter: Meter, feedback: Feedback) -> dict[str, Any]:
    """Validate when due, checkpoint (best.pt on a new best top-1); returns the validation, {} if none."""
    state.epoch, state.start_batch = state.epoch + 1, 0
    val: dict[str, Any] = {}
    if state.epoch % run.cfg.run.eval_every == 0 or state.epoch == run.cfg.optim.epochs:
        with torch.random.fork_rng(devices=[]):
            val = evaluation.validate(run.net, val_loader, run.dist, run.device, run.precision)
        feedback.evaluation({"epoch": state.epoch, "step": state.step, **val, "time": time.time()})
    is_best = bool(val) and val["top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, val.get("top1", -1.0))
    write_checkpoint(run, state, meter.nonfinite, best=is_best)
    return val


def stop_requested(run: Run, at_sync: bool) -> int:
    """The signal that asked the run to end, 0 if none. One process checks at every step; under DDP the
    ranks agree at the log points (where they sync anyway), so that all of them checkpoint the same step."""
    if not run.dist.enabled:
        return STOP.signum
    if not at_sync:
        return 0
    flag = torch.tensor([float(bool(STOP.signum))], device=run.device)
    return (STOP.signum or signal.SIGTERM) if runtime.all_reduce_sum(flag, run.dist).item() else 0


def out_of_time(run: Run, elapsed_s: float, epochs_done: int) -> bool:
    """Whether one more epoch, as long as the mean one so far, would end past --run.time_budget_min. Rank 0's
    clock decides for every rank, so all ranks stop after the same epoch."""
    budget_s = 60 * run.cfg.run.time_budget_min
    late = float(
        bool(budget_s) and elapsed_s + elapsed_s / max(epochs_done, 1) > budget_s and run.dist.is_main
    )
    return runtime.all_reduce_sum(torch.tensor([late], device=run.device), run.dist).item() > 0


# --------------------------------------------------------------------------------------------------- resuming


def load_resume(cfg: config.Config, out: Path, dist: runtime.Dist) -> dict[str, Any] | None:
    """<out>/last.pt, refused when this run would not continue it exactly (another model, batch size, frame
    count or number of ranks shifts the loader position or the weights' meaning). None for a run that wrote
    no checkpoint yet (killed in its first epoch, or never started): it starts again from step 0, so an
    automatic restart with --resume always continues."""
    last = out / "last.pt"
    if not last.exists():
        restart_without_checkpoint(cfg, out, dist)
        return None
    try:
        ckpt = checkpoints.load(last, "--resume checkpoint")
    except checkpoints.CheckpointError as e:
        raise TrainingError(
            f"{e}. To go on from the best validation instead: copy {out / 'best.pt'} to {last} and --resume; "
            f"a complete {out / '.last.pt.tmp'}, if present, is the save that was interrupted"
        ) from None
    ranks = (len(ckpt["rng"]), dist.world_size)
    refuse_changes(config.from_dict(ckpt["config"]), cfg, last, ranks)
    done = finished(cfg, TrainState(**ckpt["state"]))
    if done:
        raise TrainingError(
            f"{out} holds a finished run ({done}): nothing to resume. Evaluate it with python train.py "
            f"evaluate {out / 'best.pt'}; train on with --resume and a larger --optim.epochs or "
            f"--run.target_top1; or start a new run from its weights with --tune-from {out / 'best.pt'}"
        )
    return ckpt


def refuse_changes(
    saved: config.Config, cfg: config.Config, source: Path, ranks: tuple[int, int] | None
) -> None:
    pairs = {
        "--model.name": (saved.model.name, cfg.model.name),
        "--data.batch_size": (saved.data.batch_size, cfg.data.batch_size),
        "--data.num_segments": (saved.data.num_segments, cfg.data.num_segments),
    }
    if ranks is not None:
        pairs["ranks (torchrun --nproc_per_node x nodes)"] = ranks
    changed = [f"{k} {a} -> {b}" for k, (a, b) in pairs.items() if a != b]
    if changed:
        raise TrainingError(
            f"--resume would not continue {source} exactly ({'; '.join(changed)}): resume with the same "
            f"settings, or start a new run from its weights with --tune-from {source}"
        )


def restart_without_checkpoint(cfg: config.Config, out: Path, dist: runtime.Dist) -> None:
    """--resume on a run directory without last.pt: checked against its config.json, started from step 0."""
    saved = out / "config.json"
    try:
        text = saved.read_text() if saved.exists() else ""
        saved_cfg = config.from_dict(json.loads(text)) if text else None
    except (OSError, json.JSONDecodeError):
        saved_cfg = None  # cut short by the kill: nothing to compare with
    if saved_cfg is not None:
        refuse_changes(saved_cfg, cfg, saved, None)
    if dist.is_main:
        why = "with the settings of its config.json" if saved_cfg is not None else "(it holds no config.json)"
        log.warning(
            "--resume: %s has no last.pt (the run stopped before its first checkpoint): training starts "
            "from step 0 %s",
            out,
            why,
        )


def finished(cfg: config.Config, state: TrainState) -> str:
    """Why a run in `state` has nothing left to train under `cfg` ('' if it has): every epoch is done, or its
    best validation reached --run.target_top1 (what ended it). A stop by --run.time_budget_min is not an end:
    --resume continues it in the next job."""
    if state.epoch >= cfg.optim.epochs:
        return f"all {cfg.optim.epochs} epochs of --optim.epochs are done"
    if cfg.run.target_top1 and state.best_top1 >= cfg.run.target_top1:
        return f"its best val top-1 {state.best_top1:.1%} reached --run.target_top1 {cfg.run.target_top1:g}"
    return ""


def restore(ckpt: dict[str, Any], opt: optimisation.Optimisation, dist: runtime.Dist) -> TrainState:
    """Optimizer, schedule, scaler and RNG streams of a last.pt; the state to continue from."""
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    if opt.scaler is not None and ckpt.get("scaler"):
        opt.scaler.load_state_dict(ckpt["scaler"])
    checkpoints.set_rng_state(ckpt["rng"][min(dist.rank, len(ckpt["rng"]) - 1)])
    return TrainState(**ckpt["state"])


def forget_later_metrics(out: Path, epoch: int) -> None:
    """Drop the metrics.jsonl lines of epochs after `epoch`: the resumed run redoes them (their checkpoint
    was never written), and would otherwise log them twice."""
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True)
        kept = [x for x in lines if x.endswith("\n") and _epoch_of(x) <= epoch]  # a cut last line goes
        if len(kept) < len(lines):
            metrics.write_text("".join(kept))


def _epoch_of(line: str) -> float:
    try:
        return json.loads(line).get("epoch", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------ checkpoints


def check_finite(bad: torch.Tensor, run: Run, state: TrainState) -> None:
    """Stop every rank together once the loss, a gradient norm or a weight is NaN/inf (read only where the
    host syncs anyway: log points and checkpoints)."""
    if runtime.all_reduce_sum(bad.float(), run.dist).item():
        last = run.out / "last.pt"
        good = f"{last} holds the last good state" if last.exists() else "no checkpoint was written yet"
        raise TrainingError(
            f"the loss or the weights became NaN or infinite by {state.position()}; "
            f"stopping. {good}: lower --optim.lr, check the data, or try --run.precision fp32, then --resume"
        )


def write_checkpoint(run: Run, state: TrainState, nonfinite: torch.Tensor, *, best: bool = False) -> None:
    """last.pt (and best.pt), from finite weights only; every rank's RNG is kept so --resume continues the
    same random streams."""
    weights = runtime.unwrap_model(run.net).state_dict()
    floats = [v.isfinite().all() for v in weights.values() if v.is_floating_point()]
    check_finite(nonfinite | ~torch.stack(floats).all(), run, state)
    rngs: list[Any] = [None] * run.dist.world_size
    if run.dist.enabled:
        torch_dist.all_gather_object(rngs, checkpoints.rng_state())
    if not run.dist.is_main:
        return
    opt = run.opt
    ckpt = {
        "model": weights,
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": opt.scaler.state_dict() if opt.scaler else None,
        "state": dataclasses.asdict(state),
        "classes": run.classes,
        "rng": rngs if run.dist.enabled else [checkpoints.rng_state()],
        "config": config.to_dict(run.cfg),
        "facts": run.facts,
    }
    if best:  # best.pt first: a last.pt recording a best top-1 must never be ahead of best.pt
        checkpoints.save_atomic(ckpt, run.out / "best.pt")
        checkpoints.copy_atomic(run.out / "best.pt", run.out / "last.pt")
    else:
        checkpoints.save_atomic(ckpt, run.out / "last.pt")


# ---------------------------------------------------------------------------------------------- live feedback


class Meter:
    """Running sums since the last read, kept on the device: reading them is the step's only host sync."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2, device=device)  # loss x clips, correct clips
        self.nonfinite = torch.zeros((), device=device, dtype=torch.bool)  # sticky: any bad step so far
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.clips, self.data_wait, self.start = 0, 0.0, time.perf_counter()

    def add(
        self, loss: torch.Tensor, correct: torch.Tensor, bad: torch.Tensor, clips: int, wait: float
    ) -> None:
        self.sums += torch.stack([loss * clips, correct])
        self.nonfinite |= bad
        self.clips += clips
        self.data_wait += wait

    def read(self, run: Run) -> dict[str, float]:
        (loss_sum, correct), n = self.sums.tolist(), max(self.clips, 1)
        elapsed = time.perf_counter() - self.start
        stats = {
            "loss": loss_sum / n,
            "top1": correct / n,
            "lr": run.opt.base_lr(),
            "clips_per_s": n * run.dist.world_size / elapsed,
            "data_wait": self.data_wait / elapsed,
        }
        if run.device.type == "cuda":
            stats["gpu_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        self.reset()
        return stats


def step_line(step: int, total: int, epoch: int, epochs: int, stats: dict[str, float], eta: str) -> str:
    """One complete progress line: where the run is, the metrics since the last line, and the ETA."""
    line = (
        f"step {step}/{total}  epoch {epoch}/{epochs}  loss {stats['loss']:.3f}  top-1 {stats['top1']:.1%}  "
        f"lr {stats['lr']:.2e}  {stats['clips_per_s']:.1f} clips/s  data wait {stats['data_wait']:.0%}"
    )
    if "gpu_mem_gib" in stats:
        line += f"  mem {stats['gpu_mem_gib']:.1f} GiB"
    return f"{line}  ETA {eta}"


class Feedback:
    """Rank 0's view of a run: on a terminal a rich live bar, elsewhere (Docker, Slurm, `> log`) a complete
    log line every --run.log_every steps; TensorBoard scalars and <run>/metrics.jsonl; silent elsewhere.
    Epochs are counted from 1 everywhere: the bar and the lines show the epoch in progress, the validation
    line and metrics.jsonl the epoch just finished."""

    def __init__(self, cfg: config.Config, out: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled, self.out = enabled, out
        self.total, self.epochs = total_steps, cfg.optim.epochs
        self.start_step, self.started = start_step, time.perf_counter()
        self.progress = self.writer = None
        self.lines = False
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.lines = cfg.run.live and not self.console.is_terminal
        if cfg.run.live and not self.lines:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task(
                "train", total=total_steps, completed=start_step, epoch="", stats="starting"
            )
            self.progress.start()
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tb"))

    def step(self, step: int, epoch: int, stats: dict[str, float]) -> None:
        """`epoch` is the 0-based epoch in progress (TrainState.epoch)."""
        if not self.enabled:
            return
        if self.lines:
            elapsed = time.perf_counter() - self.started
            eta = progress.clock(
                progress.eta_s(step - self.start_step, self.total - self.start_step, elapsed)
            )
            log.info("%s", step_line(step, self.total, epoch + 1, self.epochs, stats, eta))
        if self.progress is not None:
            text = (
                f"loss {stats['loss']:.3f}  acc {stats['top1']:.1%}  lr {stats['lr']:.2e}  "
                f"{stats['clips_per_s']:.0f} clips/s  data {stats['data_wait']:.0%}"
            )
            if "gpu_mem_gib" in stats:
                text += f"  mem {stats['gpu_mem_gib']:.1f} GiB"
            self.progress.update(self.task, completed=step, epoch=f"{epoch + 1}/{self.epochs}", stats=text)
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def evaluation(self, record: dict[str, Any]) -> None:
        """`record["epoch"]` is the number of epochs done (the epoch just finished, counted from 1)."""
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k in ("top1", "top5", "loss"):
                self.writer.add_scalar(f"val/{k}", record[k], record["step"])
            self.writer.flush()
        text = (
            f"epoch {record['epoch']}/{self.epochs}: val top-1 {record['top1']:.1%}  "
            f"top-5 {record['top5']:.1%}  loss {record['loss']:.3f}"
        )
        if self.lines:
            log.info("%s", text)
        else:
            self.console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------------- data


def ensure_dataset(index: str, dist: runtime.Dist) -> Path:
    """The dataset index; the synthetic demo set is generated (by the preprocess CLI) when it is missing."""
    path = Path(index)
    if not path.exists() and path.resolve() == SYNTHETIC_INDEX.resolve():
        if dist.is_main:
            log.info("%s is missing: generating the synthetic dataset (python -m preprocess synthetic)", path)
            # from the project root (where the preprocess package lives), writing where the index is expected
            cmd = [sys.executable, "-m", "preprocess", "synthetic", "--out", str(path.parent.resolve())]
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                raise TrainingError(
                    f"generating the synthetic dataset failed: run {' '.join(cmd)} to see why"
                )
        runtime.barrier(dist)
    return path


def build_loaders(cfg: config.Config, dist: runtime.Dist, device: torch.device):
    kw = dict(rank=dist.rank, world_size=dist.world_size, device=device)
    return build_loader(cfg.data, "train", "train", **kw), build_loader(cfg.data, "val", "val", **kw)


# ----------------------------------------------------------------------------------------------- command line


def usage(argv: list[str]) -> str:
    """--help: the commands, presets and aliases, and every option with its value in the chosen preset."""
    name, _ = config.split_preset(argv)
    wrap = functools.partial(textwrap.fill, width=110, subsequent_indent="  ")
    return USAGE.format(
        presets=wrap(", ".join(config.PRESETS)),
        aliases=wrap(", ".join(f"{k}={v}" for k, v in config.ALIASES.items())),
        preset=name,
        options=config.help_text(config.preset(name)),
    )


USAGE = """usage:
  python train.py [train] [--preset NAME] [--section.field VALUE ...]   train (default preset: demo)
  python train.py evaluate CKPT [CKPT ...] [--eval.num_clips N --eval.num_crops 1|3|10 ...]
  python train.py predict CKPT VIDEO [--classes FILE] [--top 5] [--device cpu] [--stream ...]   (predict -h)
presets: {presets}
aliases: {aliases}
options, with their values in preset {preset} (--preset NAME --help shows another's):
{options}"""


def summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def run_train(argv: list[str]) -> None:
    cfg = config.parse_train_args(argv)
    dist, device = runtime.init_distributed(cfg.run.device, cfg.run.dist_backend)  # once per process
    given_out = any(a.split("=")[0] in ("--run.out", "--out") for a in argv)
    if not (given_out or cfg.run.resume or cfg.run.overwrite) and dist.is_main:
        out = rundir.fresh(cfg.run.out)  # a preset's default directory: never over an earlier run
        if out != cfg.run.out:
            log.info("%s holds an earlier run (--resume continues it): this one goes to %s", cfg.run.out, out)
        cfg.run.out = out
    start = time.perf_counter()
    result = train(cfg, dist, device)
    train_s = time.perf_counter() - start
    if result["stopped_early"] or not cfg.run.final_eval:
        return
    # every rank scores its share of the videos (evaluate gathers them on rank 0, which alone reports); the
    # checkpoint holds the run's config, --eval.* views included
    report = evaluation.evaluate([str(result["out"] / "best.pt")], dist=dist, device=device)
    if not report:
        return
    rows = [
        ("model", cfg.model.name),
        ("device", f"{result['device']} x{result['world_size']} ({result['precision']})"),
        ("epochs / steps", f"{result['epoch']} / {result['step']}"),
        ("training time", f"{train_s:.0f} s"),
        ("val top-1 (best checkpoint)", f"{report['top1']:.1%}"),
        ("val top-5", f"{report['top5']:.1%}"),
        ("mean class accuracy", f"{report['mean_class_accuracy']:.1%}"),
    ]
    if "pair_accuracy" in report:
        rows.append(("pair accuracy (order-dependent pairs)", f"{report['pair_accuracy']:.1%}"))
    summary_table(f"{cfg.preset}: {result['out']}", [*rows, ("results", report["out"])])


def run_evaluate(argv: list[str]) -> None:
    paths = []
    while argv and not argv[0].startswith("--"):
        paths.append(argv.pop(0))
    report = evaluation.evaluate(paths, argv)
    if report:
        keys = ("top1", "top5", "mean_class_accuracy", "pair_accuracy")
        rows = [(k, f"{report[k]:.2%}") for k in keys if k in report]
        summary_table(
            f"{len(paths)} checkpoint(s), {report['videos']} videos",
            [*rows, ("results", report["out"])],
        )


USER_ERRORS = (
    config.ConfigError,
    TrainingError,
    DatasetError,
    ResourceError,
    rundir.RunDirError,
    checkpoints.CheckpointError,
    runtime.DeviceError,
    predict.PredictError,
    VideoFileError,
)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run that failed (data, divergence, checkpoint), 2 bad usage or config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    command = argv.pop(0) if argv and argv[0] in ("train", "evaluate", "predict") else "train"
    signal.signal(signal.SIGTERM, STOP)
    if command != "predict":  # predict's camera stream ends at Ctrl-C by itself
        signal.signal(signal.SIGINT, STOP)
    try:
        if ("-h" in argv or "--help" in argv) and command != "predict":
            sys.stdout.write(usage(argv) + "\n")
            return 0
        {"train": run_train, "evaluate": run_evaluate, "predict": predict.main}[command](argv)
    except USER_ERRORS as e:
        log.error("%s", e)
        return 2 if isinstance(e, config.ConfigError) else 128 + e.signum if isinstance(e, Stopped) else 1
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
