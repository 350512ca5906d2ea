"""--engine ray on a real two-node Ray cluster on loopback (`ray start --head --num-cpus 1` plus a second `ray
start --address ... --num-cpus 1`): the second node is killed, with its worker, while it writes a shard; the
job finishes, the lost attempt is counted, and the output is byte-identical to a local run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_preprocess

RAY = str(Path(sys.executable).with_name("ray"))
# Loopback only: no token to hand around (a head generates one by default and a joining node does not read
# it), no usage reports.
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
# 48 clips in 6 shards of 8: about a second per shard per node here
DATASET = ["--train-per-class", "4", "--val-per-class", "2", "--frames", "48", "--frame-size", "96"]
DATASET += ["--shard-size", "8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Ray's workers run in their own process groups)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


class RayNode:
    """`ray start ... --block` in the foreground; kill() ends it and everything it started, by pid."""

    def __init__(self, *args: str) -> None:
        self.started = threading.Event()
        self.lines: list[str] = []
        cmd = [RAY, "start", *args, "--block", "--disable-usage-stats"]
        self.proc = subprocess.Popen(
            cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            if "Ray runtime started" in line:
                self.started.set()

    def wait_started(self) -> None:
        assert self.started.wait(120) and self.proc.poll() is None, "".join(self.lines[-20:])

    def kill(self) -> None:
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


@pytest.fixture
def cluster():
    """(address, the second node); both nodes are killed in teardown, also when the test fails."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    nodes = []
    try:
        nodes.append(
            RayNode(
                "--head",
                *("--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1"),
                *("--include-dashboard", "false", "--temp-dir", temp),
                *("--ray-client-server-port", str(free_port())),
            )
        )
        nodes[0].wait_started()
        address = f"127.0.0.1:{port}"
        nodes.append(RayNode("--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1"))
        nodes[1].wait_started()
        yield address, nodes[1]
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def output_files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith("lock.")
    }


def test_a_killed_node_loses_nothing(cluster, tmp_path):
    address, second = cluster
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "preprocess", "synthetic", "--out", str(out), *DATASET]
    cmd += ["--engine", "ray", "--ray-address", address, "--no-progress"]
    driver = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Both nodes write a shard (one CPU each, so two attempt folders mean one on each): kill the second.
        attempts = out / ".records" / "work"
        deadline = time.monotonic() + 180
        while driver.poll() is None and time.monotonic() < deadline:
            if attempts.is_dir() and len(list(attempts.iterdir())) >= 2:
                break
            time.sleep(0.02)
        assert driver.poll() is None, "the job ended before both nodes were busy"
        shards_done = len(list(out.glob("*.tar")))
        second.kill()
        log, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, log[-3000:]
    assert shards_done < 6
    lost = re.search(r"(\d+) attempt\(s\) lost", " ".join(log.split()))
    assert lost and int(lost.group(1)) >= 1, log[-2000:]  # the killed node's attempt, run again elsewhere
    run_preprocess("synthetic", "--out", str(tmp_path / "local"), *DATASET, "--workers", "2")
    assert output_files(out) == output_files(tmp_path / "local")
