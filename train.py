"""Train, evaluate and apply TSN/TSM/GC video models.

    python train.py                                   # the demo: make data/synthetic if missing, train, test
    python train.py train --preset gc_tsm_r50_k400_8f --data.index data/k400/index.json --optim.lr 0.01
    torchrun --nproc_per_node 8 train.py train --preset gc_tsm_r50_k400_8f    # DDP (see docs/train.md)
    python train.py train --preset demo --resume                               # continue runs/demo exactly
    python train.py evaluate runs/a/best.pt runs/b/best.pt --eval.num_clips 10 --eval.num_crops 3
    python train.py predict runs/demo/best.pt video.mp4                       # top-5 classes of one video

The script reads top to bottom: distributed set-up, data, model, optimiser and schedule, checkpoints, live
feedback, the training loop, and the entry points. Everything a run does is decided by one `config.Config`
(presets in config.py, any field overridable as --section.field VALUE); the resolved config is saved as
<run>/config.json and inside every checkpoint. channels_last, autocast, torch.compile and DDP are applied only
through runtime.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

import config as C
import evaluation
import models
import runtime
from pipeline import build_loader

log = logging.getLogger("train")
ROOT = Path(__file__).resolve().parent
SYNTHETIC_INDEX = Path("data/synthetic/index.json")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, missing data, unusable checkpoint); the message says why."""


# ------------------------------------------------------------------------------------------------ distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: C.Config) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; NCCL on GPUs, gloo on CPUs; device auto = cuda if available."""
    dist = Dist(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(
            f"--run.device {cfg.run.device} asks for a GPU but torch sees none; use --run.device cpu"
        )
    device = torch.device(f"cuda:{dist.local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.enabled and not torch_dist.is_initialized():
        backend = (
            cfg.run.dist_backend
            if cfg.run.dist_backend != "auto"
            else ("nccl" if device.type == "cuda" else "gloo")
        )
        torch_dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist, device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


# ------------------------------------------------------------------------------------------------------- data


def ensure_dataset(index: str, dist: Dist) -> Path:
    """The dataset index; the synthetic demo set is generated (by the preprocess CLI) when it is missing."""
    path = Path(index)
    if not path.exists() and path.resolve() == SYNTHETIC_INDEX.resolve():
        if dist.is_main:
            log.info("%s is missing: generating the synthetic dataset (python -m preprocess synthetic)", path)
            # from the project root (where the preprocess package lives), writing where the index is expected
            cmd = [sys.executable, "-m", "preprocess", "synthetic", "--out", str(path.parent.resolve())]
            done = subprocess.run(cmd, cwd=ROOT)
            if done.returncode != 0:
                raise TrainingError(
                    f"generating the synthetic dataset failed ({' '.join(cmd)} exited with "
                    f"{done.returncode}); run it yourself to see why"
                )
        barrier(dist)
    if not path.exists():
        raise TrainingError(
            f"dataset index {path} not found: build the dataset with `python -m preprocess ...` "
            f"(see docs) or point --data.index at an existing index.json"
        )
    return path


def loaders(cfg: C.Config, dist: Dist, device: torch.device):
    train_loader = build_loader(
        cfg.data, split="train", mode="train", rank=dist.rank, world_size=dist.world_size, device=device
    )
    val_loader = build_loader(
        cfg.data, split="val", mode="val", rank=dist.rank, world_size=dist.world_size, device=device
    )
    if len(train_loader) == 0:
        raise TrainingError(
            f"the train split of {cfg.data.index} gives no full batch of {cfg.data.batch_size} "
            f"per rank on {dist.world_size} rank(s): lower --data.batch_size"
        )
    return train_loader, val_loader


# ------------------------------------------------------------------------------------------------------ model


def build_model(cfg: C.Config, num_classes: int) -> torch.nn.Module:
    m = cfg.model
    if m.name not in models.list_models():
        raise C.ConfigError(f"unknown --model.name {m.name!r}; known: {', '.join(models.list_models())}")
    return models.build_model(
        m.name,
        num_classes,
        cfg.data.num_segments,
        dropout=m.dropout,
        shift_div=m.shift_div,
        shift_place=m.shift_place,
        cdiv=m.cdiv,
        gc_loop=m.gc_loop,
        partial_bn=m.partial_bn,
        pretrained=m.pretrained or None,
    )


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The plain nn.Module inside DDP / torch.compile wrappers."""
    while isinstance(getattr(net, "_orig_mod", None) or getattr(net, "module", None), torch.nn.Module):
        net = getattr(net, "_orig_mod", None) or net.module
    return net


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A gcvideo checkpoint's weights, or a {'state_dict': ...} file with DDP's 'module.' prefix removed."""
    state = ckpt.get("model") or ckpt.get("state_dict") or ckpt
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_for_finetuning(model: torch.nn.Module, path: str) -> list[str]:
    """Load every weight of `path` but the classifier (the model has a new one); return the new classifier
    keys."""
    source = model_state(torch.load(path, map_location="cpu", weights_only=False))
    target = model.state_dict()
    classifier = set(model.classifier_names())
    keep = {
        k: v for k, v in source.items() if k in target and k not in classifier and v.shape == target[k].shape
    }
    missing = sorted(set(target) - set(keep) - classifier)
    if missing:
        raise TrainingError(
            f"--tune-from {path}: {len(missing)} weights of {type(model).__name__} are not in it "
            f"(first: {missing[:3]}); was it trained with the same --model.name?"
        )
    model.load_state_dict(keep, strict=False)
    return sorted(classifier)


# ---------------------------------------------------------------------------------------- optimiser, schedule


def scaled_lr(o: C.OptimConfig, global_batch: int) -> float:
    """The reference rule: lr is given for base_batch clips per step and scales linearly with the batch."""
    return o.lr * global_batch / o.base_batch


def lr_factor(step: int, steps_per_epoch: int, o: C.OptimConfig) -> float:
    """Multiplier of the base lr after `step` optimiser steps: linear warm-up, then step decay or cosine."""
    epoch = step / steps_per_epoch
    if epoch < o.warmup_epochs:
        return o.warmup_start_factor + (1.0 - o.warmup_start_factor) * epoch / o.warmup_epochs
    if o.schedule == "step":
        return o.lr_decay ** sum(epoch >= s for s in o.lr_steps)
    progress = min((epoch - o.warmup_epochs) / (o.epochs - o.warmup_epochs), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: C.Config, lr: float, fine_tuning: bool):
    groups = models.param_groups(
        model,
        lr=lr,
        weight_decay=cfg.optim.weight_decay,
        gc_lr_mult=cfg.optim.gc_lr_mult,
        fc_lr_mult=cfg.optim.fc_lr_mult if fine_tuning else 1.0,
    )
    optimizer = torch.optim.SGD(
        groups,
        lr=lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
        weight_decay=cfg.optim.weight_decay,
    )
    return optimizer


def build_scheduler(optimizer, steps_per_epoch: int, o: C.OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, o))


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    params: list[torch.nn.Parameter]
    clip_grad: float = 0.0
    label_smoothing: float = 0.0


def train_step(
    net: torch.nn.Module,
    x_NTCHW: torch.Tensor,
    labels_N: torch.Tensor,
    opt: Optimisation,
    precision: str,
    device_type: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step. Returns (loss, correct clips, non-finite flag) as device tensors: nothing here
    waits for the GPU, the caller reads them every few steps."""
    with runtime.autocast(precision, device_type):
        logits = net(x_NTCHW)
        loss = F.cross_entropy(logits.float(), labels_N, label_smoothing=opt.label_smoothing)
    opt.optimizer.zero_grad(set_to_none=True)
    if opt.scaler is not None:
        opt.scaler.scale(loss).backward()
        opt.scaler.unscale_(opt.optimizer)
    else:
        loss.backward()
    loss = loss.detach()
    nonfinite = ~torch.isfinite(loss)
    if opt.clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(opt.params, opt.clip_grad)
        if (
            opt.scaler is None
        ):  # fp16 overflows are the scaler's business (it skips the step), not a divergence
            nonfinite |= ~torch.isfinite(grad_norm)
    if opt.scaler is not None:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.scheduler.step()
    return loss, (logits.detach().argmax(1) == labels_N).sum().float(), nonfinite


# ------------------------------------------------------------------------------------------------ checkpoints


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file beside `path` and rename it: a reader never sees half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise TrainingError(f"checkpoint {path} not found: nothing to resume (start without --resume)")
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- live feedback


class Feedback:
    """Rank 0's view of a run: a rich live line, TensorBoard scalars and <run>/metrics.jsonl; silent
    elsewhere."""

    def __init__(self, cfg: C.Config, out: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled, self.out = enabled, out
        self.progress = self.writer = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        if cfg.run.live:
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
                "train", total=total_steps, completed=start_step, epoch=0, stats="starting"
            )
            self.progress.start()
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tb"))

    def step(self, step: int, epoch: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            text = (
                f"loss {stats['loss']:.3f}  acc {stats['top1']:.1%}  lr {stats['lr']:.2e}  "
                f"{stats['clips_per_s']:.0f} clips/s  data {stats['data_wait']:.0%}"
            )
            if "gpu_mem_gib" in stats:
                text += f"  mem {stats['gpu_mem_gib']:.1f} GiB"
            self.progress.update(self.task, completed=step, epoch=epoch, stats=text)
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def evaluation(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k in ("top1", "top5", "loss"):
                self.writer.add_scalar(f"val/{k}", record[k], record["step"])
            self.writer.flush()
        self.console.print(
            f"epoch {record['epoch']}: val top-1 {record['top1']:.1%}  top-5 {record['top5']:.1%}  "
            f"loss {record['loss']:.3f}"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------------- training


@torch.no_grad()
def validate(net, loader, dist: Dist, device: torch.device, precision: str) -> dict[str, float]:
    """Loss, top-1 and top-5 over the val split (each rank its part, summed over ranks)."""
    net.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    for x_NTCHW, labels_N in loader:
        with runtime.autocast(precision, device.type):
            logits = net(x_NTCHW)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[:3] += torch.stack(
            [
                F.cross_entropy(logits, labels_N, reduction="sum"),
                (top5[:, 0] == labels_N).sum(),
                (top5 == labels_N[:, None]).any(1).sum(),
            ]
        ).double()
        sums[3] += labels_N.shape[0]
    loss, top1, top5, n = all_reduce_sum(sums, dist).tolist()
    net.train()
    return {"loss": loss / max(n, 1), "top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "videos": int(n)}


def train(cfg: C.Config) -> dict[str, Any]:
    """Train `cfg` to the end (or to --run.max_steps); returns the last validation and the run directory."""
    C.validate(cfg)
    dist, device = init_distributed(cfg)
    precision = resolve_precision(cfg.run.precision, device)
    out = Path(cfg.run.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed + dist.rank)
    np.random.seed(cfg.run.seed + dist.rank)
    random.seed(cfg.run.seed + dist.rank)

    ensure_dataset(cfg.data.index, dist)
    train_loader, val_loader = loaders(cfg, dist, device)
    classes = list(train_loader.classes)
    cfg.model.num_classes = cfg.model.num_classes or len(classes)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.optim.epochs

    resume = load_checkpoint(out / "last.pt") if cfg.run.resume else None
    model = build_model(cfg, cfg.model.num_classes)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif cfg.run.tune_from:
        new_fc = load_for_finetuning(model, cfg.run.tune_from)
        log.info(
            "fine-tuning from %s: new classifier %s, fc lr x%g",
            cfg.run.tune_from,
            new_fc,
            cfg.optim.fc_lr_mult,
        )
    if cfg.model.sync_bn and (device.type != "cuda" or not dist.enabled):
        raise C.ConfigError("--model.sync_bn needs DDP on CUDA devices (torchrun on GPUs); drop it here")
    global_batch = cfg.data.batch_size * dist.world_size
    lr = scaled_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg, lr, fine_tuning=bool(cfg.run.tune_from))
    scheduler = build_scheduler(optimizer, steps_per_epoch, cfg.optim)
    scaler = runtime.grad_scaler(precision, device)
    net = runtime.setup_model(
        model,
        device=device,
        channels_last=cfg.model.channels_last,
        compile=cfg.model.compile,
        ddp=dist.enabled,
        sync_bn=cfg.model.sync_bn,
    )
    epoch, start_batch, step, best_top1 = 0, 0, 0, -1.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        epoch, start_batch = resume["loader"]["epoch"], resume["loader"]["start_batch"]
        step, best_top1 = resume["step"], resume["best_top1"]
        set_rng_state(resume["rng"][min(dist.rank, len(resume["rng"]) - 1)])
    if dist.is_main:
        (out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=2) + "\n")
        log.info(
            "%s: %s on %s x%d (%s), %d steps/epoch, global batch %d, lr %.4g",
            cfg.preset,
            cfg.model.name,
            device,
            dist.world_size,
            precision,
            steps_per_epoch,
            global_batch,
            lr,
        )

    def checkpoint(batch_in_epoch: int, epoch_now: int, *, best: bool = False) -> None:
        """last.pt (and best.pt); every rank's RNG is kept, so --resume continues the same random stream."""
        # the weights after the last step have not been through a forward pass yet: check them directly
        model_state_now = unwrap(net).state_dict()
        check_finite(
            nonfinite
            | ~torch.stack(
                [v.isfinite().all() for v in model_state_now.values() if v.is_floating_point()]
            ).all()
        )
        rngs = [None] * dist.world_size if dist.enabled else None
        if dist.enabled:
            torch_dist.all_gather_object(rngs, rng_state())
        if not dist.is_main:
            return
        state = {
            "model": model_state_now,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "epoch": epoch_now,
            "step": step,
            "best_top1": best_top1,
            "classes": classes,
            "loader": {"epoch": epoch_now, "start_batch": batch_in_epoch},
            "rng": rngs or [rng_state()],
            "config": C.to_dict(cfg),
        }
        save_atomic(state, out / "last.pt")
        if best:
            copy_atomic(out / "last.pt", out / "best.pt")

    def check_finite(bad: torch.Tensor) -> None:
        """Called only where the host reads device values anyway (log points, before checkpoints)."""
        if all_reduce_sum(bad.float(), dist).item():  # every rank stops together
            raise TrainingError(
                f"the loss or the weights became NaN or infinite by step {step} (epoch {epoch}); "
                f"stopping. "
                f"{out / 'last.pt'} holds the last good state: lower --optim.lr, check the "
                f"data, or try --run.precision fp32, then --resume"
            )

    opt = Optimisation(
        optimizer,
        scheduler,
        scaler,
        [p for p in model.parameters() if p.requires_grad],
        cfg.optim.clip_grad,
        cfg.optim.label_smoothing,
    )
    feedback = Feedback(cfg, out, total_steps, step, enabled=dist.is_main)
    sums = torch.zeros(2, device=device)  # loss sum, correct clips: read only every log_every steps
    clips = 0
    nonfinite = torch.zeros((), device=device, dtype=torch.bool)
    last_val: dict[str, Any] = {}
    stopped_early = False
    net.train()
    try:
        while epoch < cfg.optim.epochs and not stopped_early:
            train_loader.set_epoch(epoch, start_batch)
            batches = iter(train_loader)
            t_read, data_wait = time.perf_counter(), 0.0
            for batch_in_epoch in range(start_batch, steps_per_epoch):
                t0 = time.perf_counter()
                with torch.random.fork_rng(devices=[]):  # a DataLoader seeds itself from the global RNG:
                    x_NTCHW, labels_N = next(batches)  # keep the model's random stream independent of it
                data_wait += time.perf_counter() - t0

                loss, correct, bad = train_step(net, x_NTCHW, labels_N, opt, precision, device.type)
                step += 1
                nonfinite |= bad
                sums += torch.stack([loss * labels_N.shape[0], correct])
                clips += labels_N.shape[0]
                if step % cfg.run.log_every == 0 or batch_in_epoch == steps_per_epoch - 1:
                    check_finite(nonfinite)
                    (loss_sum, correct), n = sums.tolist(), clips
                    elapsed = time.perf_counter() - t_read
                    stats = {
                        "loss": loss_sum / n,
                        "top1": correct / n,
                        "lr": scheduler.get_last_lr()[0] / optimizer.param_groups[0]["lr_mult"],
                        "clips_per_s": n * dist.world_size / elapsed,
                        "data_wait": data_wait / elapsed,
                    }
                    if device.type == "cuda":
                        stats["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    feedback.step(step, epoch, stats)
                    sums.zero_()
                    clips = 0
                    t_read, data_wait = time.perf_counter(), 0.0
                if cfg.run.max_steps and step >= cfg.run.max_steps:
                    checkpoint(batch_in_epoch + 1, epoch)
                    stopped_early = True
                    break
                if (
                    cfg.run.ckpt_every
                    and step % cfg.run.ckpt_every == 0
                    and batch_in_epoch < steps_per_epoch - 1
                ):
                    checkpoint(batch_in_epoch + 1, epoch)
            if stopped_early:
                break
            epoch, start_batch = epoch + 1, 0
            is_best = False
            if epoch % cfg.run.eval_every == 0 or epoch == cfg.optim.epochs:
                with torch.random.fork_rng(devices=[]):
                    last_val = validate(net, val_loader, dist, device, precision)
                is_best = last_val["top1"] > best_top1
                best_top1 = max(best_top1, last_val["top1"])
                feedback.evaluation({"epoch": epoch, "step": step, **last_val, "time": time.time()})
            checkpoint(0, epoch, best=is_best)
    finally:
        feedback.close()
    barrier(dist)
    return {
        "out": out,
        "val": last_val,
        "best_top1": best_top1,
        "step": step,
        "epoch": epoch,
        "precision": precision,
        "device": str(device),
        "world_size": dist.world_size,
        "stopped_early": stopped_early,
    }


# ------------------------------------------------------------------------------------------------- evaluation


def checkpoint_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, C.Config, list[str]]:
    """The plain model of a gcvideo checkpoint, in eval mode, with the config and class names it was trained
    with."""
    if not Path(path).exists():
        raise TrainingError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "config" not in ckpt:
        raise TrainingError(
            f"{path} is not a gcvideo checkpoint (no config inside); convert released weights "
            f"with models.convert first"
        )
    cfg = C.from_dict(ckpt["config"])
    model = build_model(cfg, cfg.model.num_classes)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, list(ckpt.get("classes") or [])


def evaluate(checkpoints: list[str], overrides: list[str]) -> dict[str, Any]:
    """Test every checkpoint with the --eval.* views, ensemble their scores by video key, write the report.

    `overrides` apply to each checkpoint's own config (so an 8- and a 16-frame model keep their frame counts).
    """
    if not checkpoints:
        raise C.ConfigError(
            "evaluate needs at least one checkpoint: python train.py evaluate RUN/best.pt [...]"
        )
    for path in checkpoints:
        if not Path(path).is_file():
            raise TrainingError(f"checkpoint {path} not found")
    first_cfg = C.validate(
        C.apply_overrides(
            C.from_dict(torch.load(checkpoints[0], map_location="cpu", weights_only=False)["config"]),
            overrides,
        )
    )
    dist, device = init_distributed(first_cfg)
    precision = resolve_precision(first_cfg.run.precision, device)
    score_sets, labels, per_checkpoint = [], {}, {}
    classes: list[str] = []
    for path in checkpoints:
        model, cfg, classes = checkpoint_model(path, device)
        cfg = C.validate(C.apply_overrides(cfg, overrides))
        e = cfg.eval
        cfg.data.num_clips, cfg.data.num_crops, cfg.data.twice_sample = (
            e.num_clips,
            e.num_crops,
            e.twice_sample,
        )
        cfg.data.sampling, cfg.data.batch_size = e.sampling, e.batch_size
        if e.full_res:
            cfg.data.crop_size = cfg.data.scale_size
        net = runtime.setup_model(model, device=device, channels_last=cfg.model.channels_last, compile=False)
        loader = build_loader(
            cfg.data, split=e.split, mode="test", rank=dist.rank, world_size=dist.world_size, device=device
        )
        classes = classes or list(loader.classes)
        scores, labels_here = evaluation.score_videos(
            net, loader, autocast=lambda: runtime.autocast(precision, device.type)
        )
        if dist.enabled:  # every rank scored its own videos: gather them on rank 0
            parts: list[Any] = [None] * dist.world_size
            torch_dist.all_gather_object(parts, (scores, labels_here))
            scores = {k: v for s, _ in parts for k, v in s.items()}
            labels_here = {k: v for _, lab in parts for k, v in lab.items()}
        score_sets.append(scores)
        labels.update(labels_here)
        per_checkpoint[str(path)] = evaluation.metrics(scores, labels_here, len(classes))
        views = f"{e.num_clips} clip(s) x {e.num_crops} crop(s)"
        log.info(
            "%s (%s, T=%d, %s): top-1 %.2f%%",
            path,
            cfg.model.name,
            cfg.data.num_segments,
            views,
            100 * per_checkpoint[str(path)]["top1"],
        )
    if not dist.is_main:
        return {}
    index = json.loads(Path(first_cfg.data.index).read_text())
    pairs = evaluation.class_pairs(index)
    out = Path(first_cfg.eval.out or Path(checkpoints[0]).parent / f"eval-{first_cfg.eval.split}")
    meta = {
        "checkpoints": [str(p) for p in checkpoints],
        "per_checkpoint": per_checkpoint,
        "eval": C.to_dict(first_cfg)["eval"],
        "index": first_cfg.data.index,
    }
    result = evaluation.write_report(
        out, evaluation.ensemble(score_sets), labels, classes, pairs=pairs, meta=meta
    )
    return {**result, "out": str(out), "per_checkpoint": per_checkpoint}


# ---------------------------------------------------------------------------------------------------- predict


def read_clip(video: str | Path, cfg: C.Config) -> torch.Tensor:
    """One clip x_1TCHW of a video file exactly as the val loader renders it: PyAV decode, pipeline.sampling
    frame indices and centre crop, the torch loader's resize and normalisation."""
    import av

    from pipeline import sampling
    from pipeline.loader import Views
    from pipeline.torch_loader import render_views

    try:
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError) as e:
        raise TrainingError(f"cannot decode {video}: {e}") from None
    if not frames:
        raise TrainingError(f"{video} has no video frames")
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
        raise TrainingError(
            f"{checkpoint} has {cfg.model.num_classes} classes but the class list has "
            f"{len(classes)}: pass the list it was trained with via --classes FILE"
        )
    probs = model(read_clip(video, cfg).to(device)).float().softmax(-1)[0]
    scores, ids = probs.topk(min(top, len(classes)))
    return [(classes[i], float(s)) for s, i in zip(scores.tolist(), ids.tolist())]


# --------------------------------------------------------------------------------------------- command line

USAGE = """usage:
  python train.py [train] [--preset NAME] [--section.field VALUE ...]   train (default preset: demo)
  python train.py evaluate CKPT [CKPT ...] [--eval.num_clips N --eval.num_crops 1|3|10 ...]
  python train.py predict CKPT VIDEO [--classes FILE] [--top 5] [--device cpu]
presets: {presets}
aliases: {aliases}
options (demo defaults):
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
    preset_name = "demo"
    rest = []
    for i, arg in enumerate(argv):
        if arg.startswith("--preset="):
            preset_name = arg.split("=", 1)[1]
        elif arg == "--preset" and i + 1 < len(argv):
            preset_name = argv[i + 1]
        elif not (i > 0 and argv[i - 1] == "--preset"):
            rest.append(arg)
    cfg = C.validate(C.apply_overrides(C.preset(preset_name), rest))
    start = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - start
    if result["stopped_early"] or int(os.environ.get("RANK", 0)) != 0 or not cfg.run.final_eval:
        return
    best = result["out"] / "best.pt"
    report = evaluate([str(best)], [])
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
    rows.append(("results", report["out"]))
    summary_table(f"{cfg.preset}: {result['out']}", rows)


def run_evaluate(argv: list[str]) -> None:
    checkpoints = []
    while argv and not argv[0].startswith("--"):
        checkpoints.append(argv.pop(0))
    report = evaluate(checkpoints, argv)
    if report:
        rows = [
            (k, f"{report[k]:.2%}")
            for k in ("top1", "top5", "mean_class_accuracy", "pair_accuracy")
            if k in report
        ]
        summary_table(
            f"{len(checkpoints)} checkpoint(s), {report['videos']} videos",
            rows + [("results", report["out"])],
        )


def run_predict(argv: list[str]) -> None:
    import argparse

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    command = argv.pop(0) if argv and argv[0] in ("train", "evaluate", "predict") else "train"
    if "-h" in argv or "--help" in argv:
        if command == "predict":
            run_predict(["--help"])
        sys.stdout.write(
            USAGE.format(
                presets=", ".join(C.PRESETS),
                options=C.help_text(C.demo()),
                aliases=", ".join(f"{k}={v}" for k, v in C.ALIASES.items()),
            )
            + "\n"
        )
        return 0
    try:
        {"train": run_train, "evaluate": run_evaluate, "predict": run_predict}[command](argv)
    except (C.ConfigError, TrainingError) as e:
        log.error("%s", e)
        return 2 if isinstance(e, C.ConfigError) else 1
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
