"""optimisation.py learns: a few dozen seeded CPU steps on a tiny synthetic task lower the loss and beat
chance, in fp32 with the demo's model and in every precision (bf16, fp16 with its GradScaler, `auto`);
gradient-norm clipping clips to --optim.clip_grad (20 by default), and 0 turns it off."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import checkpoints
import config
import optimisation
import runtime

CLASSES, FRAMES, SIDE, BATCH = 4, 4, 16, 16
CPU = torch.device("cpu")


def toy_task(seed: int = 0, noise: float = 0.5):
    """Clips of a per-class template (random, fixed by the seed) plus noise; a draw() gives a fresh batch."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(CLASSES, FRAMES, 3, SIDE, SIDE, generator=g)

    def draw(n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        return templates[labels] + noise * torch.randn(n, FRAMES, 3, SIDE, SIDE, generator=g), labels

    return draw


def optim_cfg(lr: float, clip_grad: float = 20.0) -> config.Config:
    cfg = config.demo()
    cfg.data.num_segments = FRAMES
    cfg.optim = config.OptimConfig(
        lr=lr, base_batch=BATCH, epochs=1, schedule="step", lr_steps=(), warmup_epochs=0, clip_grad=clip_grad
    )
    return cfg


def train_and_score(model: nn.Module, cfg: config.Config, precision: str, steps: int, seed: int = 0):
    """(mean loss of the first 3 steps, of the last 3, top-1 on 64 fresh clips) after `steps` train_steps."""
    torch.manual_seed(seed)
    draw = toy_task(seed)
    opt = optimisation.Optimisation.build(
        model, cfg, steps_per_epoch=steps, global_batch=BATCH, precision=precision, device=CPU
    )
    model.train()
    losses = []
    for _ in range(steps):
        x, y = draw()
        loss, correct, bad = optimisation.train_step(model, x, y, opt, precision, "cpu")
        assert not bad.item() and 0 <= correct.item() <= BATCH
        losses.append(loss.item())
    model.eval()
    x, y = draw(64)
    with torch.no_grad(), runtime.autocast(precision, "cpu"):
        top1 = (model(x).argmax(1) == y).float().mean().item()
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3, top1


class TinyVideoNet(nn.Module):
    """A per-frame linear classifier averaged over frames: the step's arithmetic without a backbone's cost."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * SIDE * SIDE, CLASSES)

    def forward(self, x_NTCHW: torch.Tensor) -> torch.Tensor:
        return self.fc(x_NTCHW.flatten(2)).mean(1)


def test_the_demo_model_learns_in_a_few_dozen_fp32_steps():
    torch.manual_seed(0)
    model = checkpoints.build_model(optim_cfg(0.02), CLASSES)
    first, last, top1 = train_and_score(model, optim_cfg(0.02), "fp32", steps=30)
    assert first == pytest.approx(math.log(CLASSES), rel=0.25)  # starts at chance
    assert last < 0.5 * first, (first, last)  # the loss falls clearly (a climbing loss fails here)
    assert top1 >= 0.75  # chance is 0.25


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_every_precision_steps_and_learns(precision):
    resolved = runtime.resolve_precision(precision, CPU)
    assert resolved == ("fp32" if precision == "auto" else precision)  # auto is fp32 on a CPU
    opt = optimisation.Optimisation.build(
        TinyVideoNet(), optim_cfg(0.05), steps_per_epoch=1, global_batch=BATCH, precision=resolved, device=CPU
    )
    assert (opt.scaler is not None) == (resolved == "fp16")  # a GradScaler for fp16 only
    torch.manual_seed(0)
    first, last, top1 = train_and_score(TinyVideoNet(), optim_cfg(0.05), resolved, steps=30)
    assert last < 0.5 * first, (first, last)
    assert top1 >= 0.75


def test_fp16_steps_unscale_before_clipping_and_skip_overflows():
    # fp16 gradients are scaled by the GradScaler: the clip must see (and cap) the true, unscaled norm
    torch.manual_seed(0)
    model = TinyVideoNet()
    opt = optimisation.Optimisation.build(
        model, optim_cfg(0.05, 0.01), steps_per_epoch=1, global_batch=BATCH, precision="fp16", device=CPU
    )
    x, y = toy_task()()
    optimisation.train_step(model, x, y, opt, "fp16", "cpu")
    assert total_grad_norm(model) == pytest.approx(0.01, rel=1e-3)
    # an overflowing step is the scaler's to skip (weights unchanged), not a divergence
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, bad = optimisation.train_step(model, x * float("inf"), y, opt, "fp16", "cpu")
    assert bool(bad.item())  # the loss itself is not finite: reported
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- gradient-norm clipping ---------------------------------------------------------------------------------


def total_grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def raw_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    norm = total_grad_norm(model)
    model.zero_grad()
    return norm


def one_step(clip_grad: float, scale: float) -> tuple[float, float, TinyVideoNet]:
    """(gradient norm before clipping, after train_step, model) for one step on inputs times `scale`."""
    torch.manual_seed(0)
    model = TinyVideoNet()
    x, y = toy_task()()
    x = x * scale
    raw = raw_grad_norm(model, x, y)
    opt = optimisation.Optimisation.build(
        model, optim_cfg(0.01, clip_grad), steps_per_epoch=1, global_batch=BATCH, precision="fp32", device=CPU
    )
    optimisation.train_step(model, x, y, opt, "fp32", "cpu")
    return raw, total_grad_norm(model), model


def test_the_default_clip_is_20_as_in_the_reference_scripts():
    assert config.OptimConfig().clip_grad == 20.0
    for preset in ("demo", "gc_tsm_r50_k400_8f"):
        cfg = config.PRESETS[preset]()
        opt = optimisation.Optimisation.build(
            TinyVideoNet(), cfg, steps_per_epoch=1, global_batch=8, precision="fp32", device=CPU
        )
        assert opt.clip_grad == cfg.optim.clip_grad == 20.0


def test_a_gradient_above_the_clip_is_scaled_down_to_it():
    raw, clipped, _ = one_step(clip_grad=20.0, scale=1000.0)
    assert raw > 100  # well above the default clip
    assert clipped == pytest.approx(20.0, rel=1e-4)


def test_a_gradient_below_the_clip_and_clip_0_are_left_alone():
    raw, kept, _ = one_step(clip_grad=20.0, scale=1.0)
    assert raw < 20 and kept == pytest.approx(raw, rel=1e-5)
    raw, unclipped, _ = one_step(clip_grad=0.0, scale=1000.0)
    assert raw > 100 and unclipped == pytest.approx(raw, rel=1e-5)


def test_the_clipped_gradient_is_the_one_applied():
    # SGD's first step (no momentum history yet, weight decay on weights only): w1 = w0 - lr * (g + wd * w0)
    torch.manual_seed(0)
    w0 = TinyVideoNet().fc.bias.detach().clone()
    _, _, model = one_step(clip_grad=0.5, scale=1000.0)
    step = (w0 - model.fc.bias.detach()) / (0.01 * 2)  # biases train at lr x2, without weight decay
    torch.testing.assert_close(step, model.fc.bias.grad, rtol=1e-4, atol=1e-6)
    assert total_grad_norm(model) == pytest.approx(0.5, rel=1e-4)


def test_the_step_loss_is_cross_entropy_with_the_configured_label_smoothing():
    torch.manual_seed(0)
    model = TinyVideoNet()
    x, y = toy_task()()
    cfg = optim_cfg(0.01)
    cfg.optim.label_smoothing = 0.2
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y, label_smoothing=0.2)
    opt = optimisation.Optimisation.build(
        model, cfg, steps_per_epoch=1, global_batch=BATCH, precision="fp32", device=CPU
    )
    loss, _, _ = optimisation.train_step(model, x, y, opt, "fp32", "cpu")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() != pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-3)


class BiasOnly(nn.Module):
    """A model whose first (and only) parameter group is the biases, at lr x2."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(CLASSES))

    def forward(self, x_NTCHW: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x_NTCHW.shape[0], -1)


def test_base_lr_is_the_scheduled_lr_without_the_groups_multiplier():
    cfg = optim_cfg(0.1)
    cfg.optim.lr_steps, cfg.optim.epochs = (1,), 2
    model = BiasOnly()
    opt = optimisation.Optimisation.build(
        model, cfg, steps_per_epoch=2, global_batch=2 * BATCH, precision="fp32", device=CPU
    )
    assert opt.optimizer.param_groups[0]["lr_mult"] == 2
    assert opt.base_lr() == pytest.approx(0.2)  # 0.1 for 16 clips, batch 32
    x, y = toy_task()()
    for _ in range(2):
        optimisation.train_step(model, x, y, opt, "fp32", "cpu")
    assert opt.base_lr() == pytest.approx(0.02)  # epoch 1: x0.1


def test_the_optimiser_takes_momentum_nesterov_gc_and_fine_tuning_multipliers():
    cfg = optim_cfg(0.1)
    cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.gc_lr_mult = 0.8, True, 5.0
    model = checkpoints.build_model(cfg, CLASSES)
    opt = optimisation.Optimisation.build(
        model, cfg, steps_per_epoch=1, global_batch=BATCH, precision="fp32", device=CPU, fine_tuning=True
    )
    groups = {g["name"]: g for g in opt.optimizer.param_groups}
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in groups.values())
    assert groups["gc_weight"]["lr_mult"] == 5.0 and groups["gc_weight"]["lr"] == pytest.approx(0.5)
    assert groups["fc_weight"]["lr_mult"] == cfg.optim.fc_lr_mult == 5.0  # the new classifier's x5


def bias_step(bias: list[float], labels: list[int]) -> tuple[float, float, bool, BiasOnly]:
    model = BiasOnly()
    with torch.no_grad():
        model.bias.copy_(torch.tensor(bias))
    opt = optimisation.Optimisation.build(
        model, optim_cfg(0.01), steps_per_epoch=1, global_batch=BATCH, precision="fp32", device=CPU
    )
    x = torch.zeros(len(labels), FRAMES, 3, SIDE, SIDE)
    loss, correct, bad = optimisation.train_step(model, x, torch.tensor(labels), opt, "fp32", "cpu")
    return loss.item(), correct.item(), bool(bad.item()), model


class Readout(nn.Module):
    """Logits read off the input (its first CLASSES pixel values), plus a bias for the optimiser to move."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(CLASSES))

    def forward(self, x_NTCHW: torch.Tensor) -> torch.Tensor:
        return x_NTCHW[:, 0, 0, 0, :CLASSES] + self.bias


def test_the_step_counts_the_clips_it_got_right():
    predicted, labels = [1, 3, 0, 2, 2], [1, 3, 2, 0, 2]  # 3 right
    x = torch.zeros(len(labels), FRAMES, 3, SIDE, SIDE)
    x[torch.arange(len(labels)), 0, 0, 0, torch.tensor(predicted)] = 5.0
    model = Readout()
    opt = optimisation.Optimisation.build(
        model, optim_cfg(0.01), steps_per_epoch=1, global_batch=BATCH, precision="fp32", device=CPU
    )
    _, correct, _ = optimisation.train_step(model, x, torch.tensor(labels), opt, "fp32", "cpu")
    assert correct.item() == 3


def test_an_infinite_loss_with_finite_gradients_is_reported():
    # the target class's logit is -inf: the loss is infinite, its gradient (softmax - one-hot) is finite
    loss, _, bad, model = bias_step([-float("inf"), 0.0, 0.0, 0.0], [0, 0])
    assert loss == float("inf") and torch.isfinite(model.bias.grad).all() and bad


def test_an_infinite_gradient_with_a_finite_loss_is_reported():
    # huge inputs, zero weights: finite logits (the bias), gradients that overflow float32
    torch.manual_seed(0)
    model = TinyVideoNet()
    with torch.no_grad():
        model.fc.weight.zero_()
    opt = optimisation.Optimisation.build(
        model, optim_cfg(0.01), steps_per_epoch=1, global_batch=BATCH, precision="fp32", device=CPU
    )
    x = torch.full((BATCH, FRAMES, 3, SIDE, SIDE), 3e38)
    loss, _, bad = optimisation.train_step(model, x, torch.zeros(BATCH, dtype=torch.long), opt, "fp32", "cpu")
    assert torch.isfinite(loss) and bool(bad)
