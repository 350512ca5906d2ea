"""What happens when a user gets something wrong, or the machine does: one message naming the thing and what
to do, an exit code (2 bad usage or config, 1 a failed run), no traceback, nothing lost."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_SYNTHETIC, run_preprocess, tiny_args

import checkpoints
import config as C
import train


def run_main(argv: list[str], caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level("ERROR"):
        code = train.main(argv)
    return code, caplog.text


@pytest.fixture(scope="module")
def finished_run(tiny_index, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    args = [*tiny_args(tiny_index, out, batch_size=8), "--optim.epochs", "1"]
    assert train.main(["train", *args]) == 0
    return out


def broken_copy(index: Path, tmp: Path, edit) -> Path:
    """A copy of the tiny dataset with `edit(copy_dir)` applied; returns the copy's index.json."""
    copy = tmp / "ds"
    shutil.copytree(index.parent, copy)
    edit(copy)
    return copy / "index.json"


def _edit_index(change):
    def edit(d: Path) -> None:
        meta = json.loads((d / "index.json").read_text())
        (d / "index.json").write_text(json.dumps(change(meta)))

    return edit


def _first(d: Path, pattern: str) -> Path:
    return sorted(d.glob(pattern))[0]


DATASET_CASES = {
    "index is a directory": (
        lambda d: ((d / "index.json").unlink(), (d / "index.json").mkdir()),
        "is a directory",
    ),
    "index is not JSON": (lambda d: (d / "index.json").write_text("{oops"), "cannot be read as JSON"),
    "index is not an object": (lambda d: (d / "index.json").write_text("[1, 2]"), "format 'list'"),
    "index without splits": (
        _edit_index(lambda m: {k: v for k, v in m.items() if k != "splits"}),
        "no 'splits'",
    ),
    "no val split": (
        _edit_index(lambda m: {**m, "splits": {"train": m["splits"]["train"]}}),
        "has no split 'val' (has ['train']): shard one with",
    ),
    "missing shard": (lambda d: _first(d, "*-train-*.tar").unlink(), "file(s) that are missing"),
    "missing idx": (lambda d: _first(d, "*-train-*.idx").unlink(), "Re-run the preprocess command"),
    "stale idx": (
        lambda d: _first(d, "*-train-*.tar").write_bytes(_first(d, "*-train-*.tar").read_bytes()[:2048]),
        "does not match",
    ),
    "garbage idx": (lambda d: _first(d, "*-train-*.idx").write_text("hello"), "is not a DALI index file"),
    "empty train split": (
        _edit_index(lambda m: {**m, "splits": {**m["splits"], "train": {"num_samples": 0, "shards": []}}}),
        "not one full batch of 8",
    ),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_bad_datasets_stop_with_one_message(case, tiny_index, tmp_path, caplog):
    edit, message = DATASET_CASES[case]
    index = broken_copy(tiny_index, tmp_path, edit)
    args = [*tiny_args(index, tmp_path / "run", batch_size=8), "--optim.epochs", "1"]
    code, log = run_main(["train", *args], caplog)
    assert code == 1 and message in log, log
    if case == "empty train split":
        assert "add samples to the split" not in log  # batch 8 can be lowered; batch 1 would say to add data


def test_a_label_outside_the_class_list_names_the_sample_and_shard(tiny_index, tmp_path, caplog):
    index = broken_copy(tiny_index, tmp_path, _edit_index(lambda m: {**m, "classes": m["classes"][:3]}))
    code, log = run_main(["train", *tiny_args(index, tmp_path / "run", batch_size=8)], caplog)
    assert code == 1 and "outside the 3 classes" in log and "Traceback" not in log
    assert "synthetic-" in log  # the shard is named


CONFIG_CASES = [
    (["--optim.lr", "inf"], "--optim.lr must be a finite number, got inf"),
    (["--preset"], "--preset needs a name"),
    (["--tune-from", "nowhere.pt"], "--tune-from checkpoint nowhere.pt not found"),
]


@pytest.mark.parametrize("extra, message", CONFIG_CASES)
def test_bad_options(extra, message, tiny_index, tmp_path, caplog):
    code, log = run_main(["train", *tiny_args(tiny_index, tmp_path / "run", 8), *extra], caplog)
    assert code in (1, 2) and message in log, log
    assert code == (2 if extra[0] != "--tune-from" else 1)


def test_run_out_under_a_file(tiny_index, tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    code, log = run_main(["train", *tiny_args(tiny_index, tmp_path / "file" / "run", 8)], caplog)
    assert code == 1 and "cannot create the run directory" in log


def test_a_new_run_never_overwrites_an_earlier_one(finished_run, tiny_index, caplog):
    before = (finished_run / "best.pt").read_bytes(), (finished_run / "metrics.jsonl").read_text()
    args = [*tiny_args(tiny_index, finished_run, batch_size=8), "--optim.epochs", "1"]
    code, log = run_main(["train", *args], caplog)
    assert code == 1 and "already holds a run" in log and "--resume" in log and "--run.overwrite" in log
    assert ((finished_run / "best.pt").read_bytes(), (finished_run / "metrics.jsonl").read_text()) == before


def test_overwrite_replaces_and_default_directories_get_a_fresh_name(finished_run, tiny_index, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    args = [*tiny_args(tiny_index, copy, batch_size=8), "--optim.epochs", "1", "--run.overwrite"]
    assert train.main(["train", *args]) == 0
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 1  # not appended to the old run's
    from rundir import fresh

    assert fresh(str(copy)) == f"{copy}-2"


def test_a_second_process_is_refused_by_the_lock(finished_run, tmp_path, caplog):
    import rundir

    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "command": "x"})
        )
        with pytest.raises(rundir.RunDirError, match=f"in use by pid {holder.pid}"):
            rundir.claim(out, resume=False, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    assert rundir.claim(out, resume=False, overwrite=False) == out  # its process is gone: a stale lock
    rundir.unlock(out)
    assert not (out / ".lock").exists()


def test_resume_refuses_what_would_not_continue_exactly(finished_run, tiny_index, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    base = [*tiny_args(tiny_index, run, batch_size=8), "--optim.epochs", "2", "--resume"]
    code, log = run_main(["train", *base, "--data.batch_size", "4"], caplog)
    assert code == 1 and "--data.batch_size 8 -> 4" in log
    code, log = run_main(["train", *base, "--model.name", "tsm_mini"], caplog)
    assert code == 1 and "--model.name gc_tsm_mini -> tsm_mini" in log
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    code, log = run_main(["train", *base], caplog)
    assert code == 1 and "cannot be read" in log and "best.pt" in log
    (run / "last.pt").write_bytes(b"")
    code, log = run_main(["train", *base], caplog)
    assert code == 1 and "is empty (0 bytes)" in log


def test_a_malicious_checkpoint_is_refused_by_every_entry_point(finished_run, tiny_index, tmp_path, caplog):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = torch.load(finished_run / "last.pt", weights_only=True)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    torch.save({**good, "extra": Payload()}, run / "last.pt")
    evil = run / "last.pt"
    video = sorted(Path(ROOT.parent / "shared" / "data" / "videos" / "kinetics").glob("*.mp4"))[0]
    entry_points = [
        ["train", *tiny_args(tiny_index, run, batch_size=8), "--optim.epochs", "2", "--resume"],
        ["train", *tiny_args(tiny_index, tmp_path / "ft", batch_size=8), "--tune-from", str(evil)],
        ["evaluate", str(evil), "--eval.out", str(tmp_path / "ev")],
        ["predict", str(evil), str(video)],
    ]
    for argv in entry_points:
        code, log = run_main(argv, caplog)
        assert code == 1 and "could run code" in log, (argv[0], log)
    assert not marker.exists()


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"step": 1}, path)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(checkpoints.CheckpointError, match=f"no space left on {tmp_path}"):
        checkpoints.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and not list(tmp_path.glob(".*.tmp"))


def test_more_shards_than_open_files(tmp_path):
    """The shard reader keeps a bounded number of files open: 48 one-sample shards under `ulimit -n 40`."""
    out = tmp_path / "many"
    run_preprocess("synthetic", "--out", str(out), *TINY_SYNTHETIC, "--shard-size", "1", "--workers", "1")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))\n"
        "from pipeline.shards import ShardDataset\n"
        f"ds = ShardDataset({str(out / 'index.json')!r}, 'train')\n"
        "keys = [ds[i].key for _ in range(2) for i in range(len(ds))]  # every shard twice\n"
        "assert len(set(keys)) == len(ds) == 32\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 40  # the limit applied to the child only


def _marked_processes(mark: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_runs_leave_no_workers_and_sigterm_keeps_last_pt(sig, tiny_index, tmp_path):
    mark = f"GCVIDEO_TEST_{sig.name}_{os.getpid()}"
    args = [
        *tiny_args(tiny_index, tmp_path / "run", batch_size=2),
        "--data.workers",
        "2",
        "--optim.epochs",
        "50",
    ]
    args += ["--run.ckpt_every", "4"]
    env = {**os.environ, mark: "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", "train", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (tmp_path / "run" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert len(_marked_processes(mark)) >= 3, "no DataLoader workers were started"
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    deadline = time.time() + 20
    while _marked_processes(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert not _marked_processes(mark), "workers outlived the training process"
    assert code != 0
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in stderr and "--resume" in stderr
        assert "Traceback" not in stderr
        ckpt = checkpoints.load(tmp_path / "run" / "last.pt")
        assert C.from_dict(ckpt["config"]).optim.epochs == 50


def test_evaluate_takes_plain_weights_with_a_model_name_and_refuses_other_classes(
    finished_run, tiny_index, tmp_path, caplog
):
    plain = tmp_path / "converted.pth"
    torch.save(torch.load(finished_run / "best.pt", weights_only=True)["model"], plain)
    where = ["--data.index", str(tiny_index), "--run.device", "cpu", "--eval.out", str(tmp_path / "ev")]
    code, log = run_main(["evaluate", str(plain), *where], caplog)
    assert code == 1 and "name the model it holds, e.g. --model.name" in log
    shape = ["--data.num_segments", "4", "--data.crop_size", "28", "--data.scale_size", "32"]
    assert train.main(["evaluate", str(plain), *where, "--model.name", "gc_tsm_mini", *shape]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["videos"] == 16
    code, log = run_main(["evaluate", str(plain), *where, "--model.name", "tsm_mini", *shape], caplog)
    assert code == 1 and "does not fit model tsm_mini" in log
    other = broken_copy(tiny_index, tmp_path, _edit_index(lambda m: {**m, "classes": m["classes"][::-1]}))
    code, log = run_main(["evaluate", str(finished_run / "best.pt"), "--data.index", str(other)], caplog)
    assert code == 2 and "trained on 8 classes" in log and "differing from class 0" in log
