"""checkpoints.py without training: the model a checkpoint (or a plain state_dict) describes, the messages of
every unusable file, weights found under 'model' / 'state_dict' / at the top, RNG streams (numpy's cached
Gaussian too), a full disk while copying best.pt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import checkpoints
import config

CPU = torch.device("cpu")


def demo_cfg(classes: int = 3) -> config.Config:
    cfg = config.demo()
    cfg.data.num_segments, cfg.model.num_classes = 2, classes
    return cfg


def test_checkpoint_model_is_built_from_the_config_inside(tmp_path):
    cfg = demo_cfg()
    model = checkpoints.build_model(cfg, 3)
    torch.save(
        {"model": model.state_dict(), "config": config.to_dict(cfg), "classes": ["a", "b", "c"]},
        tmp_path / "c.pt",
    )
    loaded, got_cfg, classes = checkpoints.checkpoint_model(tmp_path / "c.pt", CPU)
    assert classes == ["a", "b", "c"] and got_cfg.model.name == "gc_tsm_mini" and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({"model": model.state_dict(), "config": config.to_dict(cfg)}, tmp_path / "no-classes.pt")
    assert checkpoints.checkpoint_model(tmp_path / "no-classes.pt", CPU)[2] == []


def test_a_plain_state_dict_takes_the_named_model_and_its_class_count(tmp_path):
    model = checkpoints.build_model(demo_cfg(), 5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "p.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"p.pt .*\(no config inside\): .*--model.name"):
        checkpoints.checkpoint_model(tmp_path / "p.pt", CPU)
    plain = demo_cfg(classes=0)
    loaded, cfg, classes = checkpoints.checkpoint_model(tmp_path / "p.pt", CPU, plain)
    assert cfg.model.num_classes == 5 and classes == [] and loaded.fc.out_features == 5
    assert torch.equal(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"])
    other = config.apply_overrides(demo_cfg(), ["--model.name", "tsn_mini"])
    with pytest.raises(checkpoints.CheckpointError, match="does not fit model tsn_mini with 5 classes: "):
        checkpoints.checkpoint_model(tmp_path / "p.pt", CPU, other)


def test_unusable_files_are_named_with_the_reason(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match=f"^checkpoint {tmp_path / 'x.pt'} not found$"):
        checkpoints.load(tmp_path / "x.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(
        checkpoints.CheckpointError, match=r"^--resume checkpoint .*empty.pt is empty \(0 bytes\)"
    ):
        checkpoints.load(tmp_path / "empty.pt", "--resume checkpoint")
    torch.save({"model": {"w": torch.zeros(1000)}}, tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a save cut short
    with pytest.raises(checkpoints.CheckpointError, match=r"cut.pt cannot be read \(.+\): it is truncated"):
        checkpoints.load(tmp_path / "cut.pt")


def test_an_unsafe_pickle_names_the_reason(tmp_path):
    torch.save({"model": {}, "x": np.dtype("float64").type}, tmp_path / "obj.pt")  # a class: not plain data
    with pytest.raises(
        checkpoints.CheckpointError, match=r"obj.pt refused: .*could run code from the file \(.+\)"
    ):
        checkpoints.load(tmp_path / "obj.pt")


@pytest.mark.parametrize(
    "ckpt",
    [
        {},
        {"model": {}},
        {"model": {"w": 1.0}},
        [torch.zeros(1)],
        {"state_dict": {"w": torch.zeros(1), "n": 3}},
    ],
)
def test_files_without_weights_are_refused(ckpt, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="holds no model weights"):
        checkpoints.model_state(ckpt, tmp_path / "f.pt")


def test_weights_at_the_top_level_are_weights():
    state = {"module.w": torch.ones(1)}
    assert list(checkpoints.model_state(state, "f.pt")) == ["w"]


def test_fine_tuning_refuses_a_backbone_weight_of_another_shape(tmp_path):
    cfg = demo_cfg()
    source = checkpoints.build_model(cfg, 10).state_dict()
    source["backbone.conv1.weight"] = torch.zeros(1)  # same name, another shape
    torch.save({"model": source}, tmp_path / "k.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"1 weights of VideoNet are not in it .*conv1"):
        checkpoints.load_for_finetuning(checkpoints.build_model(cfg, 4), str(tmp_path / "k.pt"))


def test_numpys_cached_gaussian_is_restored():
    np.random.seed(0)
    np.random.standard_normal()  # Box-Muller: the second value is cached (has_gauss = 1)
    state = checkpoints.rng_state()
    expected = [np.random.standard_normal() for _ in range(3)]
    np.random.seed(1)
    checkpoints.set_rng_state(state)
    assert [np.random.standard_normal() for _ in range(3)] == expected


def test_disk_full_while_copying_best_keeps_the_old_copy(tmp_path, monkeypatch):
    checkpoints.save_atomic({"step": 1}, tmp_path / "last.pt")
    checkpoints.copy_atomic(tmp_path / "last.pt", tmp_path / "best.pt")
    checkpoints.save_atomic({"step": 2}, tmp_path / "last.pt")

    def full(src, dst):
        open(dst, "wb").write(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.shutil, "copyfile", full)
    with pytest.raises(
        checkpoints.CheckpointError, match=f"^no space left on {tmp_path}: best.pt was not written"
    ):
        checkpoints.copy_atomic(tmp_path / "last.pt", tmp_path / "best.pt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "best.pt")["step"] == 1 and not list(tmp_path.glob(".*.tmp"))


def test_the_model_takes_the_configs_model_options():
    cfg = demo_cfg()
    cfg.model.cdiv, cfg.model.gc_loop, cfg.model.shift_div = 8, True, 4
    model = checkpoints.build_model(cfg, 3)
    blocks = [b for layer in (model.backbone.layer1, model.backbone.layer2) for b in layer]
    assert blocks[0].gc.split_sizes == [2] * 8 and blocks[1].gc.targets == [1, 2, 3, 4]  # 16 / 8; rotated
    assert blocks[0].shift.shift_div == 4
