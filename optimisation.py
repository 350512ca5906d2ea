"""The optimiser, the learning-rate schedule and one training step: what train.py runs and the training
benchmark times.

    opt = Optimisation.build(model, cfg, steps_per_epoch, global_batch, precision, device, fine_tuning=False)
    loss, correct, nonfinite = train_step(net, x_NTCHW, labels_N, opt, precision, device.type)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import config
import models
import runtime


def scaled_lr(optim: config.OptimConfig, global_batch: int) -> float:
    """The reference rule: lr is given for base_batch clips per step and scales linearly with the batch."""
    return optim.lr * global_batch / optim.base_batch


def lr_factor(step: int, steps_per_epoch: int, optim: config.OptimConfig) -> float:
    """Multiplier of the base lr after `step` optimiser steps: linear warm-up, then step decay or cosine."""
    epoch = step / steps_per_epoch
    if epoch < optim.warmup_epochs:
        return optim.warmup_start_factor + (1.0 - optim.warmup_start_factor) * epoch / optim.warmup_epochs
    if optim.schedule == "step":
        return optim.lr_decay ** sum(epoch >= s for s in optim.lr_steps)
    progress = min((epoch - optim.warmup_epochs) / (optim.epochs - optim.warmup_epochs), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, cfg: config.Config, lr: float, fine_tuning: bool
) -> torch.optim.SGD:
    groups = models.param_groups(
        model,
        lr=lr,
        weight_decay=cfg.optim.weight_decay,
        gc_lr_mult=cfg.optim.gc_lr_mult,
        fc_lr_mult=cfg.optim.fc_lr_mult if fine_tuning else 1.0,
    )
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
        weight_decay=cfg.optim.weight_decay,
    )


def build_scheduler(
    optimizer, steps_per_epoch: int, optim: config.OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, optim))


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    params: list[torch.nn.Parameter]
    clip_grad: float = 0.0
    label_smoothing: float = 0.0

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        cfg: config.Config,
        *,
        steps_per_epoch: int,
        global_batch: int,
        precision: str,
        device: torch.device,
        fine_tuning: bool = False,
    ) -> Optimisation:
        """SGD over the plain model's parameter groups at the batch-scaled lr, the schedule, and a GradScaler
        for fp16 only."""
        optimizer = build_optimizer(model, cfg, scaled_lr(cfg.optim, global_batch), fine_tuning)
        return cls(
            optimizer,
            build_scheduler(optimizer, steps_per_epoch, cfg.optim),
            runtime.grad_scaler(precision, device),
            [p for p in model.parameters() if p.requires_grad],
            cfg.optim.clip_grad,
            cfg.optim.label_smoothing,
        )

    def base_lr(self) -> float:
        """The scheduled lr of the backbone (without any group's multiplier)."""
        return self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["lr_mult"]


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
        if opt.scaler is None:  # fp16 overflows are the scaler's business (it skips the step), not divergence
            nonfinite |= ~torch.isfinite(grad_norm)
    if opt.scaler is not None:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.scheduler.step()
    return loss, (logits.detach().argmax(1) == labels_N).sum().float(), nonfinite
