"""The GPU run kit (benchmark/gpu): its transport (parts, checksums, reassembly), its plan of host calls, the
decode check's arithmetic, and a CPU rehearsal of the whole sequence of host calls from real parts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from benchmark.gpu import kit
from benchmark.gpu.decode import closest_offsets, indices_to_check
from benchmark.gpu.prepare import DEVICE_BUDGET_S, plan_calls, planned_device_seconds, write_bundle
from benchmark.gpu.suite import STEP_NAMES, STEPS, parse_steps

MIB = kit.MIB


def test_parts_fit_a_transfer_beside_the_tree():
    for bundle, tree in [(230 * MIB, int(1.4 * MIB)), (10 * MIB, 0), (62 * MIB, MIB)]:
        count, size = kit.part_bytes_for(bundle, tree)
        assert count * size >= bundle and size * (count - 1) < bundle  # no empty part
        assert tree + size <= kit.TRANSFER_LIMIT - kit.TRANSFER_MARGIN
    assert kit.part_bytes_for(230 * MIB, int(1.4 * MIB))[0] == 4
    with pytest.raises(kit.KitError, match="no room"):
        kit.part_bytes_for(MIB, kit.TRANSFER_LIMIT)


def _manifest(tmp_path: Path, payload: bytes, count: int) -> dict:
    stage = tmp_path / "stage"
    (stage / "wheels").mkdir(parents=True)
    (stage / "wheels" / "w-1-py3-none-any.whl").write_bytes(payload)
    write_bundle(stage, tmp_path / "bundle.tar")
    size = (tmp_path / "bundle.tar").stat().st_size
    parts = kit.split_file(tmp_path / "bundle.tar", tmp_path / "kit" / "parts", count, -(-size // count))
    return {
        "format": kit.FORMAT,
        "parts": parts,
        "bundle": {"bytes": size, "sha256": kit.sha256_file(tmp_path / "bundle.tar")},
        "wheels": [
            {
                "name": "w-1-py3-none-any.whl",
                "sha256": kit.sha256_file(stage / "wheels" / "w-1-py3-none-any.whl"),
            }
        ],
    }


def test_parts_are_received_one_transfer_at_a_time_and_rejoin(tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)
    manifest = _manifest(tmp_path, payload, count=3)
    parts = tmp_path / "kit" / "parts"
    store = tmp_path / "store"
    for k, part in enumerate(manifest["parts"]):  # each transfer carries one part
        one = tmp_path / f"transfer{k}"
        one.mkdir()
        shutil.copy(parts / part["name"], one / part["name"])
        notes = kit.receive(manifest, [one], store)
        assert notes == [f"{part['name']}: received ({part['bytes'] / MIB:.1f} MiB, sha256 ok)"]
        left = [p["name"] for p in manifest["parts"][k + 1 :]]
        assert kit.missing_parts(manifest, store) == left
        if left:
            with pytest.raises(kit.KitError, match=f"parts missing on this host: {left[0]}"):
                kit.assemble(manifest, store, tmp_path / "out")
    out = kit.assemble(manifest, store, tmp_path / "out")
    assert (out / "wheels" / "w-1-py3-none-any.whl").read_bytes() == payload
    assert kit.receive(manifest, [parts], store) == []  # already there: nothing copied again


def test_a_corrupt_part_is_refused_and_named(tmp_path):
    manifest = _manifest(tmp_path, b"x" * 100_000, count=2)
    bad = tmp_path / "kit" / "parts" / manifest["parts"][1]["name"]
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF
    bad.write_bytes(bytes(data))
    notes = kit.receive(manifest, [bad.parent], tmp_path / "store")
    assert any("part-2-of-2: checksum mismatch" in n and "send it again" in n for n in notes)
    assert kit.missing_parts(manifest, tmp_path / "store") == ["part-2-of-2"]


def test_a_bundle_whose_whole_checksum_differs_is_refused(tmp_path):
    manifest = _manifest(tmp_path, b"y" * 50_000, count=2)
    kit.receive(manifest, [tmp_path / "kit" / "parts"], tmp_path / "store")
    manifest["bundle"]["sha256"] = "0" * 64
    with pytest.raises(kit.KitError, match="do not match the bundle's sha256"):
        kit.assemble(manifest, tmp_path / "store", tmp_path / "out")


def test_a_missing_or_foreign_manifest_says_what_to_do(tmp_path):
    with pytest.raises(kit.KitError, match="benchmark.gpu.prepare"):
        kit.read_manifest(tmp_path)
    (tmp_path / kit.MANIFEST).write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(kit.KitError, match="not a gcvideo-gpu-kit/1 manifest"):
        kit.read_manifest(tmp_path)


def test_slim_wheel_drops_other_pythons_extensions_and_their_record_lines(tmp_path):
    wheel = tmp_path / "pkg-1-py3-none-any.whl"
    names = ["pkg/__init__.py", "pkg/_a.cpython-311-x86_64-linux-gnu.so"]
    names += ["pkg/_a.cpython-313-x86_64-linux-gnu.so", "pkg/_a.cpython-314t-x86_64-linux-gnu.so"]
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for n in names:
            z.writestr(n, b"\0" * 1000)
        z.writestr(
            "pkg-1.dist-info/RECORD",
            "".join(f"{n},sha256=x,1000\n" for n in names) + "pkg-1.dist-info/RECORD,,\n",
        )
    dropped = kit.slim_wheel(wheel, tmp_path / "slim.whl", keep_tags=("311", "312"))
    with zipfile.ZipFile(tmp_path / "slim.whl") as z:
        kept = set(z.namelist())
        record = z.read("pkg-1.dist-info/RECORD").decode()
    assert kept == {names[0], names[1], "pkg-1.dist-info/RECORD"} and dropped > 0
    assert "cpython-313" not in record and "cpython-314t" not in record and names[1] in record


def test_the_plan_sends_every_part_once_and_runs_every_step():
    parts = [{"name": kit.part_name(k, 4), "bytes": 57 * MIB} for k in range(1, 5)]
    calls = plan_calls(".gpukit", parts)
    assert [c["carry"][1] for c in calls] == [f".gpukit/parts/{p['name']}" for p in parts]
    assert all(c["carry"][0] == ".gpukit/manifest.json" and c["timeout_s"] <= 600 for c in calls)
    ran = [s for c in calls for s in c["command"].split("--steps ")[1].split(",") if s != "none"]
    assert set(ran) == set(STEP_NAMES) and sorted(ran) == sorted([*STEP_NAMES, "env"])  # env twice
    needs_kit = {s.name for s in STEPS if s.needs_kit}
    assert not needs_kit & set(calls[0]["command"].split("--steps ")[1].split(","))  # before the install
    after_install = calls[-1]["command"].split("--steps ")[1].split(",")
    assert sum(s.budget_s for s in STEPS if s.name in after_install) <= 480  # 8 minutes after the install
    assert planned_device_seconds(calls) <= DEVICE_BUDGET_S - 60  # a minute left to rerun a short step
    single = plan_calls(".gpukit", parts[:1])
    assert single[0]["command"].endswith("--steps " + ",".join(STEP_NAMES))


def test_a_step_cut_at_its_budget_takes_its_children_with_it(tmp_path):
    from benchmark.gpu.suite import run_with_budget

    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    with open(tmp_path / "log", "w") as sink:
        assert run_with_budget(["bash", "-c", script], 1.0, sink) is None
        assert run_with_budget(["bash", "-c", "exit 3"], 10, sink) == 3
    child = Path(f"/proc/{int(pid_file.read_text())}/stat")
    deadline = time.monotonic() + 10  # killed: gone, or a zombie until whoever adopted it reaps it
    while _running(child):
        assert time.monotonic() < deadline, "the step's child outlived its budget"
        time.sleep(0.1)


def _running(stat: Path) -> bool:
    try:
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_parse_steps():
    assert [s.name for s in parse_steps("all")] == list(STEP_NAMES) and parse_steps("none") == []
    assert [s.name for s in parse_steps("model,env")] == ["env", "model"]  # the suite's own order
    with pytest.raises(SystemExit, match="unknown --steps"):
        parse_steps("env,speed")


@pytest.mark.parametrize(
    "shift, expected",
    [(0, [0, 0, 0]), (1, [1, 1, 1]), (-1, [-1, -1, -1])],
)
def test_closest_offsets_find_an_off_by_one_decoder(shift, expected):
    rng = np.random.default_rng(1)
    frames = {k: rng.integers(0, 255, (4, 4, 3), dtype=np.uint8) for k in range(10)}
    indices = [3, 5, 7]
    decoded = np.stack([frames[k + shift] for k in indices])
    assert closest_offsets(decoded, frames, indices) == expected


def test_closest_offsets_prefer_the_asked_frame_in_a_static_scene():
    still = {k: np.full((2, 2, 3), 7, np.uint8) for k in range(5)}
    assert closest_offsets(np.stack([still[2]]), still, [2]) == [0]


def test_indices_to_check_cover_both_ends_and_a_run():
    idx = indices_to_check(100, seed=0)
    assert idx[0] == 0 and idx[-1] == 99 and np.all(np.diff(idx) > 0)
    assert {50, 51, 52, 53} <= set(idx.tolist())


# --------------------------------------------------------------------------------------- the rehearsal


def manifest_command(kit_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "benchmark.gpu.prepare", "--kit", str(kit_dir)]
    cmd += ["--gops", "1,4", "--short-side", "64", "--repeat", "4"]
    # for this Python (the compiled wheels must import here); kept in the git-ignored .gpukit/ between runs
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cmd + ["--python", python, "--download-dir", str(ROOT / ".gpukit" / f"download-py{python}")]


@pytest.fixture(scope="module")
def rehearsal_kit(tmp_path_factory) -> Path:
    """A real kit (the real wheels, tiny shards) made by prepare, as on the day of a GPU run."""
    kit_dir = tmp_path_factory.mktemp("kit")
    done = subprocess.run(manifest_command(kit_dir), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return kit_dir


@pytest.mark.slow
def test_cpu_rehearsal_of_the_planned_host_calls(rehearsal_kit, tmp_path):
    manifest = kit.read_manifest(rehearsal_kit)
    assert {w["name"].split("-")[0] for w in manifest["wheels"]} >= {
        "nvidia_dali_cuda130",
        "av",
        "webdataset",
    }
    state, results = tmp_path / "host-state", []
    env = dict(os.environ, PYTHON=sys.executable)
    for k, call in enumerate(manifest["calls"]):
        transfer = tmp_path / f"transfer{k}"  # what one call carries: the manifest and one part
        (transfer / "parts").mkdir(parents=True)
        shutil.copy(rehearsal_kit / kit.MANIFEST, transfer / kit.MANIFEST)
        part = manifest["parts"][k]
        shutil.copy(rehearsal_kit / "parts" / part["name"], transfer / "parts" / part["name"])
        assert manifest["tree_bytes"] + part["bytes"] <= kit.TRANSFER_LIMIT
        out = tmp_path / f"out{k}"
        steps = call["command"].split("--steps ")[1]
        cmd = ["bash", "benchmark/gpu/suite.sh", str(out), "--steps", steps, "--cpu"]
        cmd += ["--kit", str(transfer), "--state", str(state)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:]
        files = list(out.iterdir())
        assert len(files) <= 8 and all(f.stat().st_size <= 16 * MIB for f in files)
        results.append(json.loads((out / "suite.json").read_text()))
    first, last = results[0], results[-1]
    assert first["kit"] is None and "parts not received yet" in first["kit_missing"]
    assert {s["step"]: s["status"] for s in first["steps"]} == {"env": "ok", "model": "ok"}
    assert last["kit"] is not None and last["kit"]["installed_with"].startswith("pip --no-index")
    status = {s["step"]: s["status"] for s in last["steps"]}
    # what needs a GPU is skipped, never passed; what a CPU can run ran
    assert status == {
        "env": "ok",
        "decode": "skipped",
        "e2e": "ok",
        "loader": "skipped",
        "nccl": "skipped",
        "pytest": "skipped",
    }
    env_result = last["steps"][0]["result"]
    # the kit's own packages load (this venv's DALI may shadow the kit's through its nvidia/__init__.py, a
    # pkgutil namespace: on the host, which has no DALI, only the kit's exists)
    assert env_result["imports"]["av"].startswith(str(state / "site"))
    assert env_result["imports"]["webdataset"].startswith(str(state / "site"))
    assert (state / "site" / "nvidia" / "dali" / "__init__.py").is_file()
    assert env_result["environment"]["dali"] == "nvidia-dali-cuda130==2.4.0"
    out = tmp_path / f"out{len(results) - 1}"
    nccl = json.loads((out / "nccl.json").read_text())
    assert (
        nccl["resume_matches"] and nccl["resumed_steps"] == nccl["straight_steps"] > nccl["stopped_at_step"]
    )
    loader = json.loads((out / "loader.json").read_text())["rows"]
    assert any(r["backend"] == "torch" and r["clips_per_s"] > 0 for r in loader)
    assert any(r["backend"] == "dali-cpu" and "cannot decode 'h264'" in r["not_possible"] for r in loader)
    pytest_result = json.loads((out / "pytest.json").read_text())
    assert pytest_result["tests"] >= 4 and pytest_result["skipped"] == pytest_result["tests"]
    decode = json.loads((out / "decode.json").read_text())["rows"]
    assert len(decode) == 2 * 5 and all(r["dali"] == "skipped: no CUDA" for r in decode)
    # prepare is idempotent: a second run makes the same parts
    again = subprocess.run(manifest_command(rehearsal_kit), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and kit.read_manifest(rehearsal_kit)["parts"] == manifest["parts"]
