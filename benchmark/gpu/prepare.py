"""Prepare the GPU run kit here (with network) for a GPU host without one:

    python -m benchmark.gpu.prepare [--kit .gpukit] [--gops 1,4,16] [--short-side 256] [--repeat 400]

1. downloads the wheels the host lacks, for its Python 3.12 (DALI, PyAV, webdataset, ffmpeg-python and their
   pure-Python needs), and drops from DALI's wheel the extension modules built for other Pythons;
2. shards the five Kinetics clips of ../shared/data as H.264 at each keyframe interval (preprocess CLI), with
   an index_kit.json per interval (train: the clips listed --repeat times, val: each clip once);
3. packs both into one tar, cuts it into parts that each fit one transfer beside the working tree, writes
   manifest.json (sha256 of every part and of the whole) and prints the host commands to make, in order.

Idempotent: downloads and shards already there are kept, and the tar is deterministic, so a second run
makes the same parts. Nothing it writes is committed (.gpukit/ is git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmark.gpu.kit import (
    FORMAT,
    MANIFEST,
    MIB,
    TRANSFER_LIMIT,
    TRANSFER_MARGIN,
    part_bytes_for,
    sha256_file,
    slim_wheel,
    split_file,
)
from benchmark.gpu.suite import STEP_NAMES, STEPS

ROOT = Path(__file__).resolve().parents[2]
HOST_PYTHON = "3.12"
# What the host lacks (its image has torch, numpy, rich, pillow, matplotlib, pytest, pyyaml, six, packaging,
# typing-extensions): the pins of pyproject.toml and what they import. DALI imports optree, astunparse,
# gast, makefun, libcst and nvtx when it loads (seen under Python 3.12 + torch 2.11 without them: "No module
# named 'optree'"). Its image-codec and compression libraries (nvidia-nvimgcodec-cu13 with nvjpeg, nvjpeg2k,
# nvtiff; nvidia-libnvcomp-cu13: 61 MiB) stay behind: DALI loads them only when an image decoder or a
# compressed reader runs (no NEEDED entry in libdali*.so), and the suite decodes H.264 video only.
WHEELS = (
    "nvidia-dali-cuda130==2.4.0",
    "optree==0.20.0",
    "astunparse==1.6.3",
    "gast==0.7.0",
    "makefun==1.16.0",
    "libcst==1.9.0",
    "nvtx==0.2.17",
    "av==18.1.0",
    "webdataset==1.0.2",
    "ffmpeg-python==0.2.0",
    "braceexpand==0.1.7",
    "future==1.0.0",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
FIRST_CALL_STEPS = ("env", "model")  # need no part: torch only, while the rest of the parts travel
# Device time the plan spends besides the steps' budgets: the host's start, each call's transfer and checks,
# the gap between one call's return and the next call, the install (joining, checking, unpacking, pip).
HOST_START_S, CALL_OVERHEAD_S, GAP_S, INSTALL_S = 90, 15, 15, 30
DEVICE_BUDGET_S = 900  # a session's device time, the start included


def download_wheels(dest: Path, python: str, specs: tuple[str, ...] = WHEELS) -> list[Path]:
    """The wheels for `python` (pip skips those already in dest)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    done = subprocess.run([*cmd, *specs], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip download failed (network? a pin that does not exist?):\n{done.stderr[-2000:]}")
    return [wheel_for(spec, dest) for spec in specs]


def wheel_for(spec: str, folder: Path) -> Path:
    """The one wheel in folder for `name==version` (a cache may hold other versions too)."""
    name, version = spec.split("==")
    found = sorted(folder.glob(f"{name.replace('-', '_').lower()}-{version}-*.whl"))
    if len(found) != 1:
        raise SystemExit(f"expected one wheel for {spec} in {folder}, found {[f.name for f in found]}")
    return found[0]


def stage_wheels(downloaded: list[Path], dest: Path) -> list[dict]:
    """Copy the wheels into the bundle's wheels/ (DALI slimmed); their names, sizes, sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    for stale in set(dest.glob("*.whl")) - {dest / w.name for w in downloaded}:
        stale.unlink()
    out = []
    for wheel in downloaded:
        target = dest / wheel.name
        dropped = 0
        if not target.is_file():
            if wheel.name.startswith("nvidia_dali"):
                dropped = slim_wheel(wheel, target.with_suffix(".tmp"))
                target.with_suffix(".tmp").replace(target)
            else:
                shutil.copyfile(wheel, target)
        row = {"name": wheel.name, "bytes": target.stat().st_size, "sha256": sha256_file(target)}
        out.append({**row, "downloaded_sha256": sha256_file(wheel), **({"slimmed": True} if dropped else {})})
    return out


def build_kit_shards(dest: Path, gops: list[int], short_side: int, repeat: int) -> list[dict]:
    from benchmark.loader import build_shards

    rows = []
    for gop in gops:
        folder = dest / f"h264-g{gop}"
        index = build_shards(folder, codec="h264", gop=gop, short_side=short_side)
        (dest / f"h264-g{gop}.csv").unlink(missing_ok=True)  # the list build_shards made: not needed there
        write_kit_index(index, repeat)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows.append({"gop": gop, "short_side": short_side, "repeat": repeat, "bytes": size})
    return rows


def write_kit_index(index: Path, repeat: int) -> Path:
    """index_kit.json beside index.json: train lists the shards `repeat` times, val once."""
    meta = json.loads(index.read_text())
    split = meta["splits"]["train"]
    meta["splits"] = {
        "train": {"num_samples": split["num_samples"] * repeat, "shards": split["shards"] * repeat},
        "val": split,
    }
    path = index.with_name("index_kit.json")
    path.write_text(json.dumps(meta, indent=1))
    return path


def write_bundle(stage: Path, path: Path) -> None:
    """A tar of stage/ with fixed order, owners and times: the same inputs give the same bytes."""
    with tarfile.open(path.with_suffix(".tmp"), "w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(p for p in stage.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(f), arcname=str(f.relative_to(stage)))
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(f, "rb") as src:
                tar.addfile(info, io.BufferedReader(src))
    path.with_suffix(".tmp").replace(path)


def tree_bytes(root: Path = ROOT) -> int:
    """What travels with every call besides the carried paths: tracked and untracked-not-ignored files."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def plan_calls(kit_rel: str, parts: list[dict]) -> list[dict]:
    """The host commands in order: part 1 with the steps that need no part, the middle parts alone, the
    last part with the rest (its call installs the kit first)."""
    budget = {s.name: s.budget_s for s in STEPS}
    rest = ["env"] + [n for n in STEP_NAMES if n not in FIRST_CALL_STEPS]
    calls = []
    for k, part in enumerate(parts, start=1):
        if len(parts) == 1:
            steps = list(STEP_NAMES)
        elif k == 1:
            steps = list(FIRST_CALL_STEPS)
        elif k == len(parts):
            steps = rest
        else:
            steps = []
        # + the install (last call) and ~30 s of start-up, transfer and checks
        seconds = sum(budget[s] for s in steps) + (2 * INSTALL_S if k == len(parts) else 0) + 30
        calls.append(
            {
                "carry": [f"{kit_rel}/{MANIFEST}", f"{kit_rel}/parts/{part['name']}"],
                "command": f'bash benchmark/gpu/suite.sh "$OUT" --steps {",".join(steps) or "none"}',
                "timeout_s": min(600, max(60, seconds)),
            }
        )
    return calls


def planned_device_seconds(calls: list[dict]) -> int:
    """The plan's device time if every step used its whole budget: the start, each call's steps and
    overhead, the gaps between calls, the install."""
    budget = {s.name: s.budget_s for s in STEPS}
    steps = sum(budget[n] for c in calls for n in c["command"].split("--steps ")[1].split(",") if n in budget)
    return HOST_START_S + steps + CALL_OVERHEAD_S * len(calls) + GAP_S * (len(calls) - 1) + INSTALL_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.gpu.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kit", default=".gpukit", help="kit folder, relative to the repository root")
    parser.add_argument("--gops", default="1,4,16", help="H.264 keyframe intervals (default 1,4,16)")
    parser.add_argument("--short-side", type=int, default=256, help="shards' short side (default 256)")
    parser.add_argument("--repeat", type=int, default=400, help="times each clip is listed in train")
    parser.add_argument(
        "--python", default=HOST_PYTHON, help=f"the host's Python version (default {HOST_PYTHON})"
    )
    parser.add_argument("--download-dir", default=None, help="wheel cache (default KIT/download-pyVER)")
    args = parser.parse_args(argv)
    kit = (ROOT / args.kit).resolve()
    stage = kit / "stage"
    downloaded = download_wheels(Path(args.download_dir or kit / f"download-py{args.python}"), args.python)
    wheels = stage_wheels(downloaded, stage / "wheels")
    shards = build_kit_shards(
        stage / "shards", [int(g) for g in args.gops.split(",")], args.short_side, args.repeat
    )
    bundle = kit / "bundle.tar"
    write_bundle(stage, bundle)
    tree = tree_bytes()
    count, per_part = part_bytes_for(bundle.stat().st_size, tree + 64 * 1024)
    parts = split_file(bundle, kit / "parts", count, per_part)
    manifest = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "host_python": args.python,
        "wheels": wheels,
        "shards": shards,
        "bundle": {"bytes": bundle.stat().st_size, "sha256": sha256_file(bundle)},
        "parts": parts,
        "tree_bytes": tree,
        "transfer_limit_bytes": TRANSFER_LIMIT,
        "transfer_margin_bytes": TRANSFER_MARGIN,
    }
    manifest["calls"] = plan_calls(args.kit, parts)
    manifest["planned_device_s"] = planned_device_seconds(manifest["calls"])
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    bundle.unlink()  # the parts hold it
    print_plan(manifest, kit)
    return 0


def print_plan(manifest: dict, kit: Path) -> None:
    parts = manifest["parts"]
    total = sum(p["bytes"] for p in parts)
    tree = manifest["tree_bytes"]
    print(f"kit: {kit}  ({len(parts)} parts, {total / MIB:.1f} MiB, tree {tree / MIB:.2f} MiB per call)")
    for w in manifest["wheels"]:
        print(f"  wheel {w['name']}: {w['bytes'] / MIB:.1f} MiB{' (slimmed)' if w.get('slimmed') else ''}")
    for s in manifest["shards"]:
        print(f"  shards h264 gop {s['gop']}, short side {s['short_side']}: {s['bytes'] / MIB:.1f} MiB")
    print("\nOn the GPU host, back to back (it is given back 30 s after a command returns):")
    for k, call in enumerate(manifest["calls"], start=1):
        sent = (tree + parts[k - 1]["bytes"]) / MIB
        print(f"  {k}. carry {call['carry']}  timeout_s {call['timeout_s']}  (~{sent:.1f} MiB)")
        print(f"     {call['command']}")
    print(
        f"Device time if every step runs to its budget: {manifest['planned_device_s']} s of "
        f"{DEVICE_BUDGET_S} (start {HOST_START_S} s, gaps {GAP_S} s between calls)."
    )
    print("A call whose log says 'parts not received yet: ...' lost the host: send those parts again.")


if __name__ == "__main__":
    sys.exit(main())
