"""train.py end to end on a tiny synthetic dataset: resume equivalence, 2-process gloo DDP, fine-tuning,
divergence handling, evaluation (multi-view, ensembles) and predict.

The dataset comes from the preprocess CLI (as `make train` makes it), with a few clips per class; models are
the mini ResNets with T=4 and 28-pixel crops, so every run here takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_args

import checkpoints
import config
import evaluation
import predict
import runtime
import train


def tiny_cfg(index: Path, out: Path, *extra: str) -> config.Config:
    """8 classes x 4 clips = 32 train clips, batch 4: 8 steps per epoch."""
    args = [
        *tiny_args(index, out, batch_size=4),
        "--optim.epochs",
        "2",
        "--optim.lr",
        "0.02",
        "--optim.base_batch",
        "4",
        "--model.dropout",
        "0.5",
        "--run.log_every",
        "3",
        "--eval.batch_size",
        "4",
        *extra,
    ]
    return config.validate(config.apply_overrides(config.demo(), args))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight_run(tiny_index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    result = train.train(tiny_cfg(tiny_index, out, "--run.tensorboard", "true"))
    assert result["step"] == 16 and result["epoch"] == 2 and not result["stopped_early"]
    return out


def test_run_directory_holds_config_checkpoints_metrics_and_tensorboard(straight_run):
    saved = json.loads((straight_run / "config.json").read_text())
    assert saved["model"]["name"] == "gc_tsm_mini" and saved["model"]["num_classes"] == 8
    ckpt = torch.load(straight_run / "last.pt", weights_only=True)
    assert set(ckpt) >= {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "config",
        "rng",
        "state",
    }
    assert config.from_dict(ckpt["config"]) == config.from_dict(saved) and ckpt["state"] == {
        "epoch": 2,
        "start_batch": 0,
        "step": 16,
        "best_top1": ckpt["state"]["best_top1"],
    }
    assert (straight_run / "best.pt").exists()
    assert not list(straight_run.glob(".*.tmp"))
    lines = [json.loads(x) for x in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(0 <= x["top1"] <= x["top5"] <= 1 and np.isfinite(x["loss"]) for x in lines)
    assert list((straight_run / "tb").glob("events.out.tfevents.*"))


def test_stopped_mid_epoch_and_resumed_reaches_the_same_weights(tiny_index, straight_run, tmp_path):
    # stop at step 5 of 16 (inside epoch 0), resume: the weights must match the run that never stopped
    # (dropout 0.5 is on, so the random stream must continue too)
    first = train.train(tiny_cfg(tiny_index, tmp_path, "--run.max_steps", "5"))
    assert first["stopped_early"] and first["step"] == 5
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["start_batch"] == 5
    # a second stop exactly at the end of epoch 0 (8 steps), then resume to the end
    again = train.train(tiny_cfg(tiny_index, tmp_path, "--resume", "--run.max_steps", "8"))
    assert again["stopped_early"] and again["step"] == 8
    resumed = train.train(tiny_cfg(tiny_index, tmp_path, "--resume"))
    assert resumed["step"] == 16
    a, b = weights(straight_run / "last.pt"), weights(tmp_path / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")
    # and the resumed run really continued: its metrics have the same two evaluations
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_from_step_0(
    tiny_index, tmp_path, caplog
):
    """config.json and a metrics line but no last.pt (killed between the validation and the checkpoint): a
    plain re-run points to --resume, and --resume (what an automatic restart passes) trains from step 0."""
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_index, run, "--optim.epochs", "1")
    train.train(cfg)
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    with pytest.raises(train.rundir.RunDirError, match="continue it with --resume"):
        train.train(tiny_cfg(tiny_index, run, "--optim.epochs", "1"))
    with pytest.raises(train.TrainingError, match=f"would not continue {run / 'config.json'} exactly"):
        train.train(tiny_cfg(tiny_index, run, "--optim.epochs", "1", "--resume", "--model.name", "tsm_mini"))
    with caplog.at_level("WARNING"):
        result = train.train(tiny_cfg(tiny_index, run, "--optim.epochs", "1", "--resume"))
    assert f"{run} has no last.pt" in caplog.text and "starts from step 0" in caplog.text
    assert result["step"] == 8 and (run / "best.pt").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the killed run's line was dropped
    caplog.clear()
    with caplog.at_level("WARNING"):  # a first launch with --resume (one restart command for every try)
        assert train.train(tiny_cfg(tiny_index, tmp_path / "new", "--run.max_steps", "1", "--resume"))
    assert "holds no config.json" in caplog.text


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_index, tmp_path):
    cfg = tiny_cfg(
        tiny_index,
        tmp_path,
        "--optim.lr",
        "1e12",
        "--optim.clip_grad",
        "0",
        "--run.ckpt_every",
        "1",
        "--run.log_every",
        "1",
    )
    with pytest.raises(train.TrainingError, match="NaN or infinite"):
        train.train(cfg)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_tune_from_replaces_the_classifier_with_fc_lr_x5(tiny_index, straight_run, tmp_path):
    cfg = tiny_cfg(
        tiny_index,
        tmp_path,
        "--tune-from",
        str(straight_run / "best.pt"),
        "--optim.epochs",
        "1",
        "--run.max_steps",
        "1",
    )
    train.train(cfg)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    groups = {g["name"]: g for g in ckpt["optimizer"]["param_groups"]}
    assert groups["fc_weight"]["lr_mult"] == 5 and groups["fc_weight"]["initial_lr"] == pytest.approx(
        5 * 0.02
    )
    assert ckpt["config"]["run"]["tune_from"] == str(straight_run / "best.pt")


def test_evaluate_multi_view_and_ensemble(tiny_index, straight_run, tmp_path):
    one = evaluation.evaluate(
        [str(straight_run / "best.pt")],
        ["--eval.num_clips", "2", "--eval.num_crops", "3", "--eval.out", str(tmp_path / "one")],
    )
    assert one["videos"] == 16  # 8 classes x 2 val clips, each exactly once
    predictions = [json.loads(x) for x in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and all(len(p["top5"]) == 5 for p in predictions)
    assert (tmp_path / "one" / "confusion.png").stat().st_size > 1000
    # an ensemble of a checkpoint with itself scores exactly what the checkpoint scores alone
    two = evaluation.evaluate(
        [str(straight_run / "best.pt")] * 2,
        ["--eval.num_clips", "2", "--eval.num_crops", "3", "--eval.out", str(tmp_path / "two")],
    )
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])
    assert (
        json.loads((tmp_path / "two" / "results.json").read_text())["checkpoints"]
        == [str(straight_run / "best.pt")] * 2
    )


def test_predict_matches_the_val_loader(tiny_index, straight_run, tmp_path):
    index = json.loads(tiny_index.read_text())
    shard = tiny_index.parent / index["splits"]["val"]["shards"][0]["tar"]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f".{index['video_ext']}"))
        video = tmp_path / f"clip.{index['video_ext']}"
        video.write_bytes(tar.extractfile(member).read())
        key = member.name.rsplit(".", 1)[0]
    top = predict.predict(str(straight_run / "best.pt"), str(video))
    assert len(top) == 5 and all(name in index["classes"] for name, _ in top)
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    # the same clip through the val loader (1 clip, centre crop) gives the same scores
    report = evaluation.evaluate([str(straight_run / "best.pt")], ["--eval.out", str(tmp_path / "ev")])
    assert report["videos"] == 16
    pred = {
        json.loads(x)["key"]: json.loads(x)
        for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    }[key]
    assert index["classes"][pred["pred"]] == top[0][0]
    assert pred["top5_scores"][0] == pytest.approx(top[0][1], abs=1e-4)


DDP_PROBE = textwrap.dedent("""
    # Runs under torchrun: trains through train.fit with a train loader that records each rank's clips.
    import hashlib, json, os, sys
    import config, runtime, train

    rank = int(os.environ["RANK"])
    cfg = config.validate(config.apply_overrides(config.demo(), sys.argv[2:]))
    dist, device = runtime.init_distributed(cfg.run.device, cfg.run.dist_backend)
    train_loader, val_loader = train.build_loaders(cfg, dist, device)
    seen = []

    class Recorder:
        classes = train_loader.classes

        def __len__(self):
            return len(train_loader)

        def set_epoch(self, epoch, start_batch=0):
            train_loader.set_epoch(epoch, start_batch)

        def __iter__(self):
            for x, y in train_loader:
                seen.extend(hashlib.sha1(c.numpy().tobytes()).hexdigest() for c in x)
                yield x, y

    result = train.fit(cfg, Recorder(), val_loader, dist, device)
    out = {"seen": seen, "world_size": result["world_size"], "step": result["step"]}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
""")


def test_two_process_gloo_ddp_gives_each_rank_its_own_clips(tiny_index, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    run_dir = tmp_path / "run"
    args = [*tiny_args(tiny_index, run_dir, batch_size=2), "--optim.epochs", "1", "--run.max_steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(probe),
        str(tmp_path),
        *args,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    assert [len(r["seen"]) for r in ranks] == [6, 6]  # 3 steps x 2 clips on each rank
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"]), "the ranks trained on the same clips"
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["state"]["step"] == 3


def test_two_process_run_with_final_evaluation_finishes_and_scores_every_video_once(tiny_index, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny_args(tiny_index, run_dir, batch_size=2), "--optim.epochs", "1", "--run.final_eval", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    done = subprocess.run(
        [*cmd, "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    keys = [
        json.loads(line)["key"]
        for line in (run_dir / "eval-val" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(keys) == 16 and len(set(keys)) == 16  # 8 classes x 2 val clips, each scored once
    assert json.loads((run_dir / "eval-val" / "results.json").read_text())["videos"] == 16


@pytest.mark.slow
def test_compiled_training_checkpoints_plain_weights(tiny_index, tmp_path):
    result = train.train(
        tiny_cfg(
            tiny_index, tmp_path, "--model.compile", "true", "--optim.epochs", "1", "--run.max_steps", "2"
        )
    )
    assert result["step"] == 2
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    plain = checkpoints.build_model(config.from_dict(ckpt["config"]), 8).state_dict()
    assert ckpt["model"].keys() == plain.keys()  # no _orig_mod. / module. prefixes
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_training_ends_once_the_target_top1_is_reached(tiny_index, tmp_path, monkeypatch):
    scores = iter([0.5, 0.9, 0.99])  # the validations of epochs 1, 2, 3
    real = evaluation.validate
    monkeypatch.setattr(evaluation, "validate", lambda *a: {**real(*a), "top1": next(scores)})
    result = train.train(tiny_cfg(tiny_index, tmp_path, "--optim.epochs", "3", "--run.target_top1", "0.9"))
    assert result["epoch"] == 2 and not result["stopped_early"] and result["val"]["top1"] == 0.9
    assert (tmp_path / "best.pt").exists() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_training_ends_before_an_epoch_that_would_overrun_the_time_budget(tiny_index, tmp_path):
    # 0.001 minutes: the first epoch alone takes longer, so training ends after it
    result = train.train(
        tiny_cfg(tiny_index, tmp_path, "--optim.epochs", "3", "--run.time_budget_min", "0.001")
    )
    assert result["epoch"] == 1 and not result["stopped_early"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "budget_min, elapsed_s, epochs_done, late",
    [(0, 1e9, 1, False), (4, 100, 1, False), (4, 200, 2, True), (4, 119, 1, False), (4, 121, 1, True)],
)
def test_out_of_time_when_one_more_mean_epoch_would_overrun(budget_min, elapsed_s, epochs_done, late):
    cfg = config.demo()
    cfg.run.time_budget_min = budget_min
    run = SimpleNamespace(cfg=cfg, dist=runtime.Dist(), device=torch.device("cpu"))
    assert train.out_of_time(run, elapsed_s, epochs_done) is late


def _rank_pid(mark: str, rank: int) -> int | None:
    """The pid of the training process of `rank` among those started with environment variable `mark`."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if mark.encode() + b"=1" in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_two_rank_gloo_run_killed_mid_epoch_continues_with_a_new_torchrun_and_resume(tiny_index, tmp_path):
    """The restart recipe of the README: rank 1 killed -9 after the first checkpoint, torchrun ends the job,
    and a new torchrun with the same arguments and --resume trains to the end."""
    mark = f"GCVIDEO_RESTART_{os.getpid()}"
    run = tmp_path / "run"
    args = [*tiny_args(tiny_index, run, batch_size=2), "--optim.epochs", "1", "--run.ckpt_every", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", mark: "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    first = subprocess.Popen([*cmd, "train", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "last.pt").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    victim = _rank_pid(mark, 1)
    assert victim is not None and (run / "last.pt").exists(), "no checkpoint before the kill"
    os.kill(victim, signal.SIGKILL)
    assert first.wait(timeout=120) != 0
    first.stderr.close()
    again = subprocess.run(
        [*cmd, "train", *args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-3000:]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["step"] == 8  # 32 clips / (2 ranks x 2)
    assert "continue with --resume" not in again.stderr and "from step 0" not in again.stderr  # from last.pt
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
