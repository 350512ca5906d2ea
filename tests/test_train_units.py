"""optimisation.py and checkpoints.py without data: lr scaling and schedule, parameter groups, checkpoint
writing, RNG state, fine-tune loading."""

from __future__ import annotations

import math

import pytest
import torch

import checkpoints
import config
import optimisation


def optim(**kw) -> config.OptimConfig:
    return config.OptimConfig(**{"lr": 0.1, "epochs": 10, "schedule": "step", "lr_steps": (4, 8), **kw})


def test_lr_scales_linearly_with_the_global_batch():
    o = config.OptimConfig(lr=0.02, base_batch=128)
    assert optimisation.scaled_lr(o, 64) == pytest.approx(0.01)
    assert optimisation.scaled_lr(o, 8 * 16) == pytest.approx(0.02)


def test_step_schedule_with_linear_warmup():
    o = optim(warmup_epochs=1, warmup_start_factor=0.1)
    spe = 10  # steps per epoch
    assert optimisation.lr_factor(0, spe, o) == pytest.approx(0.1)
    assert optimisation.lr_factor(5, spe, o) == pytest.approx(0.55)  # half-way through the warm-up
    assert optimisation.lr_factor(10, spe, o) == pytest.approx(1.0)
    assert optimisation.lr_factor(39, spe, o) == pytest.approx(1.0)
    assert optimisation.lr_factor(40, spe, o) == pytest.approx(0.1)  # epoch 4
    assert optimisation.lr_factor(80, spe, o) == pytest.approx(0.01)  # epoch 8


def test_a_two_epoch_warmup_and_the_cosine_after_its_end():
    o = optim(schedule="cosine", lr_steps=(), warmup_epochs=2, warmup_start_factor=0.2)
    assert optimisation.lr_factor(10, 10, o) == pytest.approx(0.6)  # half-way through the 2 warm-up epochs
    assert optimisation.lr_factor(15, 10, o) == pytest.approx(0.8)
    # past the last epoch: stays at 0
    assert optimisation.lr_factor(120, 10, o) == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_after_warmup():
    o = optim(schedule="cosine", lr_steps=(), warmup_epochs=2)
    spe = 5
    assert optimisation.lr_factor(10, spe, o) == pytest.approx(1.0)
    assert optimisation.lr_factor(30, spe, o) == pytest.approx(0.5)  # half-way through the 8 cosine epochs
    assert optimisation.lr_factor(50, spe, o) == pytest.approx(0.0, abs=1e-12)
    assert optimisation.lr_factor(20, spe, o) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_scheduler_keeps_the_group_multipliers():
    cfg = config.demo()
    model = checkpoints.build_model(cfg, 8)
    opt = optimisation.build_optimizer(model, cfg, 0.1, fine_tuning=True)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["fc_weight"]["lr"] == pytest.approx(0.5) and groups["fc_bias"]["lr"] == pytest.approx(0.5)
    assert groups["fc_bias"]["weight_decay"] == 0 and groups["norm"]["weight_decay"] == 0
    assert groups["weight"]["weight_decay"] == cfg.optim.weight_decay
    sched = optimisation.build_scheduler(opt, 4, optim(lr_steps=(1,)))
    for _ in range(4):
        opt.step()
        sched.step()
    assert groups["fc_weight"]["lr"] == pytest.approx(0.05) and groups["weight"]["lr"] == pytest.approx(0.01)
    # not fine-tuning: the classifier is ordinary (its bias at the usual lr x2, no weight decay)
    plain = {g["name"]: g for g in optimisation.build_optimizer(model, cfg, 0.1, False).param_groups}
    assert "fc_weight" not in plain and plain["bias"]["lr"] == pytest.approx(0.2)


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"step": 1}, path)
    assert torch.load(path)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1  # the old checkpoint is intact
    checkpoints.copy_atomic(path, tmp_path / "best.pt")
    assert torch.load(tmp_path / "best.pt")["step"] == 1


def test_rng_state_round_trip():
    state = checkpoints.rng_state()
    a = torch.rand(3)
    checkpoints.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_tune_from_loads_the_backbone_and_replaces_the_classifier(tmp_path):
    cfg = config.demo()
    kinetics = checkpoints.build_model(cfg, 10)
    with torch.no_grad():
        for p in kinetics.parameters():
            p.add_(1.0)  # make every weight differ from a fresh model's
    torch.save({"model": kinetics.state_dict(), "config": config.to_dict(cfg)}, tmp_path / "k.pt")
    ucf = checkpoints.build_model(cfg, 4)
    new_fc = checkpoints.load_for_finetuning(ucf, str(tmp_path / "k.pt"))
    assert new_fc == ["fc.bias", "fc.weight"]
    src, dst = kinetics.state_dict(), ucf.state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in dst if not k.startswith("fc."))
    assert dst["fc.weight"].shape == (4, src["fc.weight"].shape[1])
    # DDP-prefixed 'state_dict' files (the TSM/GC release layout) load too
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in kinetics.state_dict().items()}}, tmp_path / "d.pt"
    )
    checkpoints.load_for_finetuning(checkpoints.build_model(cfg, 4), str(tmp_path / "d.pt"))
    # a checkpoint of another architecture is refused by name
    tsn = checkpoints.build_model(config.apply_overrides(config.demo(), ["--model.name", "tsn_mini"]), 10)
    torch.save({"model": tsn.state_dict()}, tmp_path / "tsn.pt")
    with pytest.raises(checkpoints.CheckpointError, match="same --model.name"):
        checkpoints.load_for_finetuning(checkpoints.build_model(cfg, 4), str(tmp_path / "tsn.pt"))


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(config.ConfigError, match="unknown --model.name 'gc_tsm_tiny'"):
        config.validate(config.apply_overrides(config.demo(), ["--model.name", "gc_tsm_tiny"]))


def test_rng_state_from_a_machine_with_more_gpus_restores_what_matches(caplog):
    state = checkpoints.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # saved on a 2-GPU machine
    a = torch.rand(3)
    with caplog.at_level("WARNING"):
        checkpoints.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)  # the CPU streams are restored
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert f"RNG states of 2 GPU(s) and this machine has {present}" in caplog.text


def test_checkpoints_load_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoints.CheckpointError, match="could run code"):
        checkpoints.load(tmp_path / "evil.pt")
    assert not marker.exists()
    state = checkpoints.rng_state()
    checkpoints.save_atomic({"rng": [state], "config": config.to_dict(config.demo())}, tmp_path / "ok.pt")
    assert checkpoints.load(tmp_path / "ok.pt")["rng"][0]["numpy"]["pos"] == state["numpy"]["pos"]
