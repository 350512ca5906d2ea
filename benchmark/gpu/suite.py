"""The GPU suite's driver: receive the kit's parts, install them, run the steps, each in its own process
under its own time budget, and leave at most 8 result files in OUT.

    bash benchmark/gpu/suite.sh OUT [--steps env,model | none | all] [--cpu] [--kit .gpukit]
                                    [--state /tmp/gcvideo-kit]

Every call first stores the parts it was sent (checked against the manifest's sha256) in --state, outside
the working tree, where they outlive the next transfer while the host stays up; once every part is there it
joins them, checks the whole, unpacks the shards and installs the wheels into --state/site (--no-index).
Then it runs the asked steps in the order of STEPS. Each step writes OUT/<step>.json as soon as it has rows
(so a step cut short still returns what finished); OUT/suite.json records every step's status, seconds and
budget, and is rewritten after each one; OUT/suite.log is the whole log.

Statuses: ok, failed (exit status, the log's tail), timeout (killed at its budget), skipped (why: no CUDA
in --cpu rehearsals for the GPU-only parts, DALI not installed yet, ...). A skipped step is never a pass.

Standard library only, like kit.py: this process runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmark.gpu.kit import KitError, assemble, install_wheels, missing_parts, read_manifest, receive

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_KIT = ".gpukit"
DEFAULT_STATE = "/tmp/gcvideo-kit"
RESULT_FILES = 8  # what comes back from one call


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # on the H200; the --cpu rehearsal gets cpu_budget_s
    needs_kit: bool  # DALI, PyAV or the shards: only once every part is installed
    what: str
    cpu_budget_s: int = 240
    # its result goes into suite.json rather than a file of its own: 8 files come back from one call
    into_suite: bool = False


# The order of a full run: the figures that matter most first (after the cheap check that NVDEC decodes the
# right frames, without which the throughput figures mean nothing). prepare's plan runs `model` (torch only)
# in the first call, while the other parts travel; what runs after the install sums to <= 480 s.
STEPS = (
    Step("env", 15, False, "GPU, driver, versions, nvidia-smi -q summary", 60, into_suite=True),
    Step("decode", 30, True, "DALI mixed (NVDEC) frames against PyAV frames at the same indices"),
    Step("e2e", 130, True, "benchmark train: gc_tsm_r50 8x224 bf16 compiled, DALI GPU loader, H.264"),
    Step("model", 170, False, "tsm_r50 / gc_tsm_r50 fwd+bwd by mode, batch 32 and 64, peak memory"),
    Step("loader", 80, True, "loader clips/s at 8x224: NVDEC by GOP and pipelines, fallback, DALI CPU"),
    Step("nccl", 80, True, "torchrun train.py with NCCL: straight run against stop + exact resume", 300),
    Step("pytest", 60, True, "pytest -m gpu on the GPU test files"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def parse_steps(text: str) -> list[Step]:
    if text == "all":
        return list(STEPS)
    if text == "none":
        return []
    names = text.split(",")
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise SystemExit(f"unknown --steps {unknown}: choose from {', '.join(STEP_NAMES)}, all or none")
    return [s for s in STEPS if s.name in names]


class Log:
    """Lines to stdout (the call's output tail) and to OUT/suite.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        self.file.write(stamped + "\n")


def prepare_host(args: argparse.Namespace, log: Log) -> tuple[dict | None, str]:
    """Receive and, once complete, install the kit. Returns (the installed kit's record or None, why not)."""
    kit, state = Path(args.kit), Path(args.state)
    try:
        manifest = read_manifest(kit)
    except KitError as err:
        return None, str(err)
    for note in receive(manifest, [kit / "parts"], state / "parts"):
        log(note)
    installed = state / "installed.json"
    if (
        installed.is_file()
        and json.loads(installed.read_text()).get("bundle") == manifest["bundle"]["sha256"]
    ):
        return json.loads(installed.read_text()), ""
    missing = missing_parts(manifest, state / "parts")
    if missing:
        return None, f"parts not received yet: {', '.join(missing)}"
    t0 = time.monotonic()
    unpacked = assemble(manifest, state / "parts", state / "kit")
    how = install_wheels(sorted((unpacked / "wheels").glob("*.whl")), state / "site")
    record = {
        "bundle": manifest["bundle"]["sha256"],
        "site": str(state / "site"),
        "shards": str(unpacked / "shards"),
        "installed_with": how,
        "install_s": round(time.monotonic() - t0, 1),
        "manifest": {k: manifest[k] for k in ("created", "git_commit", "wheels") if k in manifest},
    }
    installed.write_text(json.dumps(record, indent=2))
    log(f"kit installed in {record['install_s']} s ({how}): {record['site']}")
    return record, ""


def run_step(step: Step, args: argparse.Namespace, kit: dict | None, out: Path, log: Log) -> dict:
    budget = step.cpu_budget_s if args.cpu else step.budget_s
    entry = {"step": step.name, "what": step.what, "budget_s": budget}
    if step.needs_kit and kit is None:
        return {**entry, "status": "skipped", "why": f"the kit is not installed ({args.kit_missing})"}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = ([kit["site"]] if kit else []) + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    result_path = (Path(args.state) if step.into_suite else out) / f"{step.name}.json"
    cmd = [sys.executable, "-m", "benchmark.gpu.steps", step.name, "--out", str(result_path)]
    cmd += ["--shards", kit["shards"] if kit else "", "--scratch", str(Path(args.state) / "scratch")]
    cmd += ["--cpu"] if args.cpu else []
    log(f"step {step.name} (budget {budget} s): {step.what}")
    t0 = time.monotonic()
    with open(out / "suite.log", "a") as sink:
        code = run_with_budget(cmd, budget, sink, env)
    entry["seconds"] = round(time.monotonic() - t0, 1)
    result = _read_json(result_path)
    if step.into_suite:
        entry["result"] = result
    if code is None:
        entry["status"] = "timeout"
    elif code != 0:
        entry["status"], entry["why"] = "failed", f"exit status {code}: see suite.log"
    else:
        entry["status"] = result.get("status", "failed")
        if "why" in result:
            entry["why"] = result["why"]
    log(f"step {step.name}: {entry['status']} in {entry['seconds']} s" + _why(entry))
    return entry


def run_with_budget(cmd: list[str], budget_s: float, sink, env: dict | None = None) -> int | None:
    """Run cmd in its own process group, so that a step cut at its budget takes its children (torchrun,
    train.py, loader workers) with it; its exit status, or None when it was stopped at the budget."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        return proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return None


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group, SIGKILL 10 s later if anything is left."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def _why(entry: dict) -> str:
    return f" ({entry['why']})" if entry.get("why") else ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark/gpu/suite.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the result files (at most 8)")
    parser.add_argument("--steps", default="all", help=f"all, none, or some of {','.join(STEP_NAMES)}")
    parser.add_argument("--cpu", action="store_true", help="rehearsal on this CPU at tiny sizes")
    parser.add_argument("--kit", default=DEFAULT_KIT, help=f"the kit folder (default {DEFAULT_KIT})")
    parser.add_argument("--state", default=DEFAULT_STATE, help=f"host-side store (default {DEFAULT_STATE})")
    args = parser.parse_args(argv)
    steps = parse_steps(args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.state).mkdir(parents=True, exist_ok=True)
    log = Log(out / "suite.log")
    try:
        kit, args.kit_missing = prepare_host(args, log)
    except KitError as err:
        kit, args.kit_missing = None, str(err)
    if kit is None:
        log(f"kit not installed: {args.kit_missing}")
    record = {"cpu_rehearsal": args.cpu, "kit": kit, "kit_missing": args.kit_missing or None, "steps": []}
    for step in steps:
        record["steps"].append(run_step(step, args, kit, out, log))
        (out / "suite.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "suite.json").write_text(json.dumps(record, indent=2) + "\n")
    files = sorted(p.name for p in out.iterdir())
    if len(files) > RESULT_FILES:
        log(f"warning: {len(files)} files in {out}, only {RESULT_FILES} come back: {files}")
    failed = [s["step"] for s in record["steps"] if s["status"] in ("failed", "timeout")]
    log(f"done: {len(steps)} steps, failed or timed out: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
