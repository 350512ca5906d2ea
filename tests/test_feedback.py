"""What a user sees in the first hour: progress in a log file (Docker, Slurm, `> log`) as on a terminal, one
epoch numbering, Ctrl-C ending in a checkpoint and one line, help that describes every option, a one-epoch
smoke run, and what --resume says about a finished run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_SYNTHETIC, tiny_args

import checkpoints
import config
import evaluation
import progress
import runtime
import train

STEP_LINE = re.compile(
    r"step (\d+)/(\d+)  epoch (\d+)/(\d+)  loss [\d.]+  top-1 [\d.]+%  lr [\d.e+-]+  [\d.]+ clips/s  "
    r"data wait \d+%  ETA (\d+:\d\d:\d\d|\?)$"
)


def train_command(index: Path, out: Path, *extra: str) -> list[str]:
    """train.py on the tiny set (8 steps an epoch at batch 4) with the live view on, as a user runs it."""
    args = [*tiny_args(index, out, batch_size=4), "--run.live", "true", *extra]
    return [sys.executable, "train.py", "train", *args]


def redirected(cmd: list[str], log_file: Path) -> str:
    """Run `cmd` with stdout and stderr to a file (no terminal, as under Docker or Slurm); the file's text."""
    with open(log_file, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log_file.read_text()
    assert done.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def redirected_run(tiny_index, tmp_path_factory) -> tuple[Path, str]:
    """A 2-epoch run logged to a file: (its run directory, the log)."""
    tmp = tmp_path_factory.mktemp("redirected")
    cmd = train_command(tiny_index, tmp / "run", "--optim.epochs", "2", "--run.log_every", "3")
    return tmp / "run", redirected(cmd, tmp / "log")


def test_redirected_training_writes_a_complete_line_every_log_every_steps(redirected_run):
    out, text = redirected_run
    steps = [STEP_LINE.search(line) for line in text.splitlines() if " step " in line]
    assert all(steps), [line for line in text.splitlines() if " step " in line]
    # every 3rd step and the last step of each epoch, each line whole (no 80-column cut, no bar)
    assert [int(m[1]) for m in steps] == [3, 6, 8, 9, 12, 15, 16]
    assert {(int(m[2]), int(m[4])) for m in steps} == {(16, 2)}
    assert [int(m[3]) for m in steps] == [1, 1, 1, 2, 2, 2, 2]  # the epoch in progress, from 1
    assert steps[-1][5] == "0:00:00"
    assert "━" not in text
    # the validation lines and metrics.jsonl count the same epochs
    assert re.findall(r"epoch (\d)/2: val top-1", text) == ["1", "2"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_evaluate_shows_progress_in_a_log_and_uses_the_training_threads_policy(redirected_run, tmp_path):
    out, _ = redirected_run
    cmd = [sys.executable, "train.py", "evaluate", str(out / "best.pt"), "--eval.out", str(tmp_path / "ev")]
    text = redirected([*cmd, "--eval.batch_size", "4", "--run.device", "cpu"], tmp_path / "log")
    lines = re.findall(r"evaluate \S+best.pt: (\d+)/4 batches \(\d+%\), \S+, ETA \S+$", text, re.M)
    assert lines == ["1", "2", "3", "4"], text[-2000:]
    threads = torch.get_num_threads()
    try:  # in this process: the threads the checkpoint's loader leaves (or --run.threads) as training takes
        ev = ["--eval.out", str(tmp_path / "ev2"), "--eval.batch_size", "8", "--run.device", "cpu"]
        evaluation.evaluate([str(out / "best.pt")], [*ev, "--run.threads", "1"])
        assert torch.get_num_threads() == 1
        evaluation.evaluate([str(out / "best.pt")], ev)  # the run's loader had 0 workers: every core
        assert torch.get_num_threads() == runtime.cpu_threads(0, 0) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(threads)


def test_progress_lines_and_clock():
    assert progress.clock(3725.4) == "1:02:05" and progress.clock(float("inf")) == "?"
    assert progress.eta_s(done=30, total=120, elapsed_s=12.0) == pytest.approx(36.0)
    line = progress.progress_line("evaluate a.pt", 30, 120, 12.0)
    assert line == "evaluate a.pt: 30/120 batches (25%), 0:00:12, ETA 0:00:36"
    assert progress.line_steps(120) == 12 and progress.line_steps(3) == 1


def test_ctrl_c_checkpoints_the_step_and_ends_in_one_line(tiny_index, tmp_path):
    """Ctrl-C signals the whole process group (training and its DataLoader workers): the run writes last.pt
    at the step it reached and says so in one line, exit 130, no traceback; --resume goes on from there."""
    out = tmp_path / "run"
    cmd = train_command(
        tiny_index, out, "--optim.epochs", "50", "--run.log_every", "2", "--data.workers", "2"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group, as a terminal's foreground job
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        lines.append(proc.stderr.readline())
        if " step 4/" in lines[-1]:
            break
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=60)
    stderr = "".join(lines) + proc.stderr.read()
    assert code == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "stopped by SIGINT at step" in errors[0] and "--resume" in errors[0]
    stopped_at = int(re.search(r"at step (\d+)", errors[0])[1])
    state = checkpoints.load(out / "last.pt")["state"]
    assert stopped_at >= 4 and state["step"] == stopped_at
    assert state["start_batch"] == stopped_at % 8 and state["epoch"] == stopped_at // 8


def test_help_describes_every_option_with_the_chosen_presets_values():
    cmd = [sys.executable, "train.py", "--preset", "gc_tsm_r50_k400_8f", "--help"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for option in config.all_options(config.Config()):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {option} "))
        description = lines[at + 1]
        assert description.startswith("      ") and len(description.split()) >= 2, (option, description)
    assert "  --data.index data/k400/index.json" in lines and "  --data.crop_size 224" in lines
    assert "  --model.pretrained imagenet" in lines and "preset gc_tsm_r50_k400_8f" in done.stdout
    assert max(map(len, lines)) <= 110
    for section in dataclasses.fields(config.Config()):
        if section.name != "preset":
            for f in dataclasses.fields(getattr(config.Config(), section.name)):
                assert f.metadata.get("help"), f"--{section.name}.{f.name} has no help"


def test_a_short_run_fits_the_presets_schedule_with_a_note(caplog):
    with caplog.at_level("WARNING"):
        cfg = config.parse_train_args(["--optim.epochs", "1"])
    assert cfg.optim.epochs == 1 and cfg.optim.warmup_epochs == 0.5 and "warming up for 0.5" in caplog.text
    k400 = config.parse_train_args(["--preset", "gc_tsm_r50_k400_8f", "--epochs", "30"])
    assert k400.optim.lr_steps == (20,) and k400.optim.warmup_epochs == 0
    with pytest.raises(
        config.ConfigError, match="warmup_epochs must be in"
    ):  # the user's own warm-up: refused
        config.parse_train_args(["--optim.epochs", "1", "--optim.warmup_epochs", "2"])
    with pytest.raises(config.ConfigError, match="lr_steps must be increasing"):
        config.parse_train_args(["--preset", "gc_tsm_r50_k400_8f", "--epochs", "1", "--optim.lr_steps", "5"])


def test_a_one_epoch_smoke_run_trains_and_resuming_it_says_it_is_finished(
    tiny_index, tmp_path, caplog, monkeypatch
):
    args = tiny_args(tiny_index, tmp_path / "run", batch_size=8)
    at = args.index("--optim.warmup_epochs")
    args = args[:at] + args[at + 2 :]  # the demo's own warm-up of 1 epoch
    calls = []  # the distributed state and the device are resolved once and passed down, evaluation too
    resolve = runtime.init_distributed
    monkeypatch.setattr(runtime, "init_distributed", lambda *a: calls.append(a) or resolve(*a))
    with caplog.at_level("INFO"):
        final_eval = ["--run.final_eval", "true", "--eval.batch_size", "8"]
        assert train.main(["train", *args, "--optim.epochs", "1", *final_eval]) == 0
    assert "warming up for 0.5" in caplog.text
    assert calls == [("cpu", "auto")] and (tmp_path / "run" / "eval-val" / "results.json").exists()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    caplog.clear()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with caplog.at_level("ERROR"):
        assert train.main(["train", *args, "--optim.epochs", "1", "--resume"]) == 1
    assert "holds a finished run (all 1 epochs of --optim.epochs are done)" in caplog.text
    assert "--tune-from" in caplog.text and (tmp_path / "run" / "last.pt").read_bytes() == before
    state = checkpoints.load(tmp_path / "run" / "last.pt")["state"]
    reached = config.parse_train_args(["--run.target_top1", "0.01", "--epochs", "5"])
    assert train.finished(reached, train.TrainState(**{**state, "best_top1": 0.5})).startswith("its best val")
    assert train.finished(reached, train.TrainState(**{**state, "best_top1": 0.0})) == ""


def test_most_confused_pairs_and_class_accuracy():
    cm = np.array([[5, 3, 0], [1, 2, 4], [0, 0, 0]])
    assert evaluation.most_confused(cm, 2) == [(1, 2, 4), (0, 1, 3)]
    assert evaluation.most_confused(cm, 10) == [(1, 2, 4), (0, 1, 3), (1, 0, 1)]  # no empty cells
    acc = evaluation.class_accuracy(cm)
    assert acc[:2].tolist() == [5 / 8, 2 / 7] and np.isnan(acc[2])


def test_confusion_png_of_many_classes_shows_pairs_and_sorted_accuracy_not_the_matrix(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(400), 3)
    pred = np.where(rng.random(labels.size) < 0.7, labels, rng.integers(0, 400, labels.size))
    scores = {f"v{i}": np.eye(400)[p] for i, p in enumerate(pred)}
    truth = {f"v{i}": int(y) for i, y in enumerate(labels)}
    evaluation.write_report(tmp_path / "many", scores, truth, [f"class {c}" for c in range(400)])
    width, height = Image.open(tmp_path / "many" / "confusion.png").size
    assert width <= 2000 and height <= 1000  # was 3000 x 2700 of bare cells
    few = {k: v[:8] / max(v[:8].sum(), 1) + 1e-3 for k, v in list(scores.items())[:24]}
    evaluation.write_report(
        tmp_path / "few", few, {k: truth[k] % 8 for k in few}, [f"c{c}" for c in range(8)]
    )
    assert Image.open(tmp_path / "few" / "confusion.png").size[0] < 1000


def test_online_benchmark_takes_one_thread_unless_told(capsys):
    from models.online import main as online_main

    threads = torch.get_num_threads()
    try:
        assert online_main(["--model", "tsm_mini", "--size", "32", "--warmup", "1", "--iters", "2"]) == 0
        assert ", 1 thread(s)," in capsys.readouterr().out and torch.get_num_threads() == 1
        assert online_main(["--model", "tsm_mini", "--size", "32", "--iters", "2", "--threads", "2"]) == 0
        assert ", 2 thread(s)," in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def test_redirected_preprocessing_logs_complete_progress_lines(tmp_path):
    cmd = [sys.executable, "-m", "preprocess", "synthetic", "--out", str(tmp_path / "ds"), *TINY_SYNTHETIC]
    text = redirected([*cmd, "--workers", "1"], tmp_path / "log")
    lines = re.findall(
        r"transcoding (\d+)/48 videos \(\d+%\): [\d.]+ videos/s, [\d.]+x realtime, 0 failed, ETA \S+$",
        text,
        re.M,
    )
    assert [int(n) for n in lines] == list(range(3, 49, 3)), text[-2000:]
    assert not re.search(r"transcoding\s+━", text)  # no bar (the summary table stays)
    assert max(map(len, text.splitlines())) > 80  # log lines whole, not wrapped at 80 columns
