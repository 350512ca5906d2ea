"""dirlock (the flock every folder lock uses) and the run directory's lock built on it: a holder that is
killed lets go, a record left behind is judged as rundir's docstring says."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

import dirlock
import rundir


def hold(code: str) -> subprocess.Popen:
    """A process of this repository that runs `code` (which takes a lock), prints 'held' and sleeps."""
    script = textwrap.dedent(code) + "\nprint('held', flush=True)\nimport time; time.sleep(120)\n"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_lock_is_refused_while_held_and_free_once_its_holder_is_killed(tmp_path):
    path = tmp_path / "lock"
    holder = hold(f"import dirlock, pathlib; fd = dirlock.try_acquire(pathlib.Path({str(path)!r}))")
    try:
        assert dirlock.try_acquire(path) is None
        assert dirlock.is_held(path)
    finally:
        kill(holder)  # SIGKILL: no cleanup runs, the kernel releases the flock
    assert not dirlock.is_held(path)
    fd = dirlock.try_acquire(path)
    assert fd is not None and dirlock.is_held(path)
    dirlock.release(fd)
    assert not dirlock.is_held(path) and path.exists()  # released, the file stays
    assert not dirlock.is_held(tmp_path / "missing")


def test_release_with_the_path_removes_the_file_and_a_waiter_locks_the_new_one(tmp_path):
    path = tmp_path / "lock"
    fd = dirlock.try_acquire(path)
    dirlock.write_record(fd, {"pid": 1})
    assert dirlock.read_record(path) == {"pid": 1}
    old = os.open(path, os.O_RDWR)  # a waiter that opened the file before its holder removed it
    dirlock.release(fd, path)
    assert not path.exists() and dirlock.read_record(path) == {}
    assert not dirlock._is_file_at(
        old, path
    )  # it would lock a file nobody else can open: try_acquire reopens
    os.close(old)
    fd = dirlock.try_acquire(path)
    assert fd is not None and dirlock._is_file_at(fd, path)
    dirlock.release(fd)


def test_holding_waits_for_the_lock(tmp_path):
    path = tmp_path / "cache.lock"
    with dirlock.holding(path):
        assert dirlock.is_held(path)
    assert not dirlock.is_held(path)


@pytest.mark.parametrize("content", ["", "[1, 2]", "{"])
def test_read_record_of_what_is_no_record(tmp_path, content):
    (tmp_path / "lock").write_text(content)
    assert dirlock.read_record(tmp_path / "lock") is None


def test_a_running_trainer_holds_its_run_directory_until_it_is_killed(tmp_path, caplog):
    out = tmp_path / "run"
    trainer = hold(f"import rundir; rundir.claim({str(out)!r}, resume=False, overwrite=False)")
    try:
        with pytest.raises(rundir.RunDirError, match=f"in use by pid {trainer.pid} on ") as refused:
            rundir.claim(out, resume=False, overwrite=False)
        assert "delete" not in str(refused.value)  # it holds the flock: deleting the file would not stop it
        assert json.loads((out / ".lock").read_text())["pid"] == trainer.pid  # its record is untouched
    finally:
        kill(trainer)
    with caplog.at_level("WARNING"):
        assert rundir.claim(out, resume=False, overwrite=False) == out
    assert f"taking over a stale lock (pid {trainer.pid} has ended)" in caplog.text
    rundir.unlock(out)
    assert list(out.iterdir()) == []


def test_a_flock_record_whose_pid_lives_on_without_the_lock_is_stale(tmp_path, caplog):
    """The pid of a run that ended was reused: its record names a live process, but nobody holds the lock."""
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": other.pid, "host": os.uname().nodename, "command": "x", "flock": True}
        (out / ".lock").write_text(json.dumps(record))
        with caplog.at_level("WARNING"):
            assert rundir.claim(out, resume=False, overwrite=False) == out
    finally:
        kill(other)
    assert f"pid {other.pid} no longer holds it" in caplog.text
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    rundir.unlock(out)


def test_a_record_of_another_host_is_never_taken_over(tmp_path):
    """flock may not reach across the hosts of a network file system: only that host can tell."""
    out = tmp_path / "run"
    out.mkdir()
    record = {"pid": 1, "host": "elsewhere", "command": "train.py", "flock": True}
    (out / ".lock").write_text(json.dumps(record))
    with pytest.raises(rundir.RunDirError, match=r"in use by pid 1 on elsewhere \(train.py\).*delete"):
        rundir.claim(out, resume=False, overwrite=False)
    assert json.loads((out / ".lock").read_text()) == record
    assert not dirlock.is_held(out / ".lock")  # the refused claim let its flock go


def test_a_file_system_without_locks_is_a_message(tmp_path, monkeypatch):
    def no_locks(path):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(dirlock, "try_acquire", no_locks)
    with pytest.raises(rundir.RunDirError, match="has no file locks"):
        rundir.claim(tmp_path / "run", resume=False, overwrite=False)
