"""What happens when a user gets something wrong, or the machine does: one message naming the thing and what
to do, an exit code (2 bad usage or config, 1 a failed run), no traceback, nothing lost."""

from __future__ import annotations

import dataclasses
import errno
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
import config
import evaluation
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


def _shard_outside(absolute: bool):
    """The first train shard moved next to the dataset folder, index.json pointing there."""

    def edit(d: Path) -> None:
        meta = json.loads((d / "index.json").read_text())
        shard = meta["splits"]["train"]["shards"][0]
        for part in ("tar", "index"):
            moved = d.parent / f"outside-{shard[part]}"
            (d / shard[part]).rename(moved)
            shard[part] = str(moved) if absolute else f"../{moved.name}"
        (d / "index.json").write_text(json.dumps(meta))

    return edit


def _swap_idx_offsets(d: Path) -> None:
    """The first two samples of a train .idx trade offsets and sizes; names, count and extent stay valid."""
    idx = _first(d, "*-train-*.idx")
    head, first, second, *rest = idx.read_text().splitlines()
    a, b = first.split(), second.split()
    for i in range(0, len(a), 4):
        a[i + 1 : i + 3], b[i + 1 : i + 3] = b[i + 1 : i + 3], a[i + 1 : i + 3]
    idx.write_text("\n".join([head, " ".join(a), " ".join(b), *rest]) + "\n")


def _drop_first_train_shard(m: dict) -> dict:
    train = m["splits"]["train"]
    return {**m, "splits": {**m["splits"], "train": {**train, "shards": train["shards"][1:]}}}


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
    "absolute shard path": (_shard_outside(absolute=True), "points outside the dataset folder"),
    "shard path climbing out": (_shard_outside(absolute=False), "'../outside-synthetic-train-"),
    "a shard dropped from the list": (
        _edit_index(_drop_first_train_shard),
        "split 'train' claims 32 samples but its",
    ),
    "a split claiming more samples": (
        _edit_index(
            lambda m: {**m, "splits": {**m["splits"], "val": {**m["splits"]["val"], "num_samples": 1000}}}
        ),
        "split 'val' claims 1000 samples but its",
    ),
    "swapped idx offsets": (_swap_idx_offsets, "the index does not match the tar"),
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


def test_the_dali_loader_stops_on_swapped_idx_offsets_instead_of_skipping(tiny_index, tmp_path):
    """Read in its reader threads, a mismatched header is a broken dataset, not a broken sample."""
    from pipeline import DatasetError, LoaderConfig, build_loader

    index = broken_copy(tiny_index, tmp_path, _swap_idx_offsets)
    cfg = LoaderConfig(index=str(index), crop_size=28, scale_size=32, num_segments=4, batch_size=4, workers=2)
    loader = build_loader(dataclasses.replace(cfg, backend="dali-cpu"), "train", "train")
    with pytest.raises(DatasetError, match="the index does not match the tar"):
        list(loader)
    assert loader.skipped == 0


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


@pytest.mark.parametrize("content", ["", '{"pid": 12', '{"host": "elsewhere"}'])
def test_a_lock_whose_owner_cannot_be_read_is_stale_and_taken_over(content, tmp_path, caplog):
    """A zero-byte or garbled .lock (disk full, or a kill between create and write) used to read as 'in use
    by pid None on None' forever."""
    import rundir

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(content)
    with caplog.at_level("WARNING"):
        assert rundir.claim(out, resume=False, overwrite=False) == out
    assert "taking over a stale lock (its owner cannot be read" in caplog.text
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    rundir.unlock(out)
    assert list(out.iterdir()) == []  # neither the lock nor its temporary stays


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
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(checkpoints.CheckpointError, match=f"no space left on {tmp_path}"):
        checkpoints.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and not list(tmp_path.glob(".*.tmp"))


def test_disk_full_inside_torch_save_is_one_line_and_leaves_no_temporary(tmp_path):
    """A real ENOSPC through torch's own writer (the temporary is /dev/full): torch.save(obj, filename)
    reports it as RuntimeError 'unexpected pos', without an errno."""
    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"step": 1}, path)
    tmp = tmp_path / ".last.pt.tmp"
    tmp.symlink_to("/dev/full")
    with pytest.raises(checkpoints.CheckpointError, match=f"no space left on {tmp_path}: last.pt was not"):
        checkpoints.save_atomic({"step": 2, "weights": torch.zeros(4096)}, path)
    assert not tmp.is_symlink() and torch.load(path)["step"] == 1


@pytest.mark.parametrize("free, full", [(4096, True), (10 << 30, False)])
def test_a_write_failure_without_errno_is_a_full_disk_only_when_the_disk_is_full(
    free, full, tmp_path, monkeypatch
):
    def unexpected_pos(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", unexpected_pos)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, free))
    error = checkpoints.CheckpointError if full else RuntimeError
    with pytest.raises(error) as raised:
        checkpoints.save_atomic({"step": 2}, tmp_path / "last.pt")
    assert ("no space left on" in str(raised.value)) == full
    assert not list(tmp_path.iterdir())  # the half-written temporary is gone either way


def test_a_full_disk_at_a_new_best_never_leaves_last_pt_ahead_of_best_pt(
    tiny_index, tmp_path, monkeypatch, caplog
):
    """The second epoch's new best meets a full disk: last.pt must not record a best that best.pt lacks, and
    --resume (space freed) redoes that epoch once, best.pt and metrics.jsonl included."""
    real_save, real_copy = torch.save, shutil.copyfile
    best_writes = []

    def refuse_the_second_best(target) -> None:
        if ".best.pt" in str(getattr(target, "name", target)):
            best_writes.append(target)
            if len(best_writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(obj, f, *a, **k):
        refuse_the_second_best(f)
        return real_save(obj, f, *a, **k)

    def copy(src, dst, *a, **k):
        refuse_the_second_best(dst)
        return real_copy(src, dst, *a, **k)

    scores = iter([0.5, 0.9, 0.9])  # epoch 1, epoch 2, epoch 2 again after --resume
    real_validate = evaluation.validate
    monkeypatch.setattr(evaluation, "validate", lambda *a: {**real_validate(*a), "top1": next(scores)})
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "copyfile", copy)
    out = tmp_path / "run"
    args = [*tiny_args(tiny_index, out, batch_size=8), "--optim.epochs", "2"]
    code, log = run_main(["train", *args], caplog)
    assert code == 1 and f"no space left on {out}" in log and "Traceback" not in log
    last, best = torch.load(out / "last.pt"), torch.load(out / "best.pt")
    assert last["state"]["best_top1"] == best["state"]["best_top1"] == 0.5
    assert not list(out.glob(".*.tmp"))
    assert train.main(["train", *args, "--resume"]) == 0
    assert torch.load(out / "best.pt")["state"]["best_top1"] == 0.9
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # the failed epoch's line is not repeated


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


def test_training_on_the_dali_cpu_loader_under_a_low_open_file_limit(tmp_path):
    """136 one-sample shards under `ulimit -n 96` (soft and hard: raising cannot help): 4 reader threads kept
    up to 64 shards open each, ran out of descriptors, skipped samples as broken and crashed at validation."""
    data = tmp_path / "many"
    sizes = ["--train-per-class", "16", "--val-per-class", "1", *TINY_SYNTHETIC[4:]]
    run_preprocess("synthetic", "--out", str(data), *sizes, "--shard-size", "1", "--workers", "1")
    args = tiny_args(data / "index.json", tmp_path / "run", batch_size=8)
    args[args.index("--data.backend") + 1], args[args.index("--data.workers") + 1] = "dali-cpu", "2"
    done = subprocess.run(
        [sys.executable, "train.py", "train", *args, "--optim.epochs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping broken" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "run" / "best.pt").exists()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 200))\n"
        "from pipeline.shards import open_shard_budget\n"
        "assert open_shard_budget() == 25, open_shard_budget()\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE) == (200, 200)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("backend, workers", [("torch", 0), ("dali-cpu", 2)])
@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENOMEM])
def test_running_out_of_descriptors_or_memory_is_a_resource_error_not_a_broken_sample(
    backend, workers, err, tiny_index, monkeypatch
):
    from pipeline import LoaderConfig, ResourceError, build_loader
    from pipeline.shards import ShardDataset

    def exhausted(self, tar, size, offset, pooled=False):
        raise OSError(err, os.strerror(err))

    cfg = LoaderConfig(index=str(tiny_index), crop_size=28, scale_size=32, num_segments=4, batch_size=4)
    loader = build_loader(dataclasses.replace(cfg, backend=backend, workers=workers), "train", "train")
    monkeypatch.setattr(ShardDataset, "_pread", exhausted)
    with pytest.raises(ResourceError, match=f"lack of a system resource \\({os.strerror(err)}\\)"):
        next(iter(loader))
    assert loader.skipped == 0 and not loader.bad


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
        assert config.from_dict(ckpt["config"]).optim.epochs == 50


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


def test_sigterm_ends_a_rank_waiting_in_the_gloo_handshake(tiny_index, tmp_path):
    """Rank 1 of 2 connects to a store that never answers (a peer that never comes): SIGTERM ends it now,
    instead of after torchrun's SIGKILL 30 s later."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env |= {"MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    args = [*tiny_args(tiny_index, tmp_path / "run", batch_size=8), "--run.dist_backend", "gloo"]
    proc = subprocess.Popen(
        [sys.executable, "train.py", "train", *args], cwd=ROOT, env=env, stderr=subprocess.DEVNULL
    )
    try:
        server.settimeout(120)
        peer, _ = server.accept()  # the rank is in the handshake now
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        assert code != 0
        peer.close()
    finally:
        proc.kill()
        proc.wait()
        server.close()
