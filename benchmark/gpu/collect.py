"""Gather what the GPU suite's calls brought back into one results folder, with a summary against the
targets:

    python -m benchmark.gpu.collect CALL_DIR [CALL_DIR ...] [--into benchmark/results]

Each CALL_DIR is one call's returned files (suite.json, suite.log, <step>.json). The folder made is
`<into>/gpu-suite_<hardware>_<date>/` (hardware and date from the env step, e.g. gpu-nvidia-h200): every
call's files, prefixed `callK-`, and summary.md / summary.json: each target's measured value, the steps'
statuses and seconds, the device, driver and versions, and the commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmark.common import markdown_table

TARGETS = {  # what issue "GPU truth" measures against
    "e2e_clips_per_s": (">=", 650.0),
    "e2e_data_wait": ("<", 0.05),
    "gc_overhead_train_pct_compiled": ("<", 5.0),
}


def load_calls(dirs: list[Path]) -> list[dict]:
    calls = []
    for d in dirs:
        suite = d / "suite.json"
        if not suite.is_file():
            raise SystemExit(f"{suite} not found: {d} is not a folder of the GPU suite's results")
        steps = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json") if p.stem != "suite"}
        calls.append({"dir": d, "suite": json.loads(suite.read_text()), "steps": steps})
    return calls


def environment_of(calls: list[dict]) -> dict:
    """The last env step's record (the one after the install names DALI and PyAV too)."""
    for call in reversed(calls):
        for step in call["suite"]["steps"]:
            if step["step"] == "env" and step.get("result", {}).get("environment"):
                return step["result"]
    raise SystemExit("no env step among these calls: nothing says which machine they ran on")


def measured(calls: list[dict]) -> dict:
    steps = {name: data for call in calls for name, data in call["steps"].items()}
    out: dict = {}
    e2e = [r for r in steps.get("e2e", {}).get("rows", []) if r.get("data") == "shards"]
    if e2e:
        out["e2e_clips_per_s"], out["e2e_data_wait"] = e2e[0]["clips_per_s"], e2e[0]["data_wait"]
    compiled = [
        r
        for r in steps.get("model", {}).get("rows", [])
        if r.get("mode") == "compiled" and "gc_overhead_train_pct" in r and r["model"] == "gc_tsm_r50"
    ]
    if compiled:
        out["gc_overhead_train_pct_compiled"] = compiled[-1]["gc_overhead_train_pct"]
    if "decode" in steps:
        out["nvdec_frame_exact"] = steps["decode"].get("frame_exact")
    if "nccl" in steps:
        out["nccl_resume_matches"] = steps["nccl"].get("resume_matches")
    return out


def summary_rows(values: dict, *, gpu: bool) -> list[dict]:
    """One row per target; `met` only for a GPU run (a CPU rehearsal's figures are no GPU figures)."""
    rows = []
    for key, (op, target) in TARGETS.items():
        value = values.get(key)
        met = None if value is None else (value >= target if op == ">=" else value < target)
        met = met if gpu else "not a GPU run"
        rows.append({"figure": key, "target": f"{op} {target:g}", "measured": value, "met": met})
    for key in ("nvdec_frame_exact", "nccl_resume_matches"):
        rows.append({"figure": key, "target": "true", "measured": values.get(key), "met": values.get(key)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.gpu.collect", description=__doc__.split("\n")[0]
    )
    parser.add_argument("calls", nargs="+", help="one folder per call, in the order they ran")
    parser.add_argument(
        "--into", default="benchmark/results", help="results folder (default benchmark/results)"
    )
    args = parser.parse_args(argv)
    calls = load_calls([Path(c) for c in args.calls])
    env = environment_of(calls)["environment"]
    folder = Path(args.into) / f"gpu-suite_{env['hardware']}_{env['utc'][:10]}"
    folder.mkdir(parents=True, exist_ok=True)
    for k, call in enumerate(calls, start=1):
        for f in sorted(call["dir"].iterdir()):
            shutil.copyfile(f, folder / f"call{k}-{f.name}")
    values = measured(calls)
    statuses = [
        {"call": k, **{x: s.get(x) for x in ("step", "status", "seconds", "budget_s", "why")}}
        for k, call in enumerate(calls, start=1)
        for s in call["suite"]["steps"]
    ]
    record = {
        "environment": env,
        "targets": summary_rows(values, gpu=bool(env.get("gpus"))),
        "steps": statuses,
    }
    (folder / "summary.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    kit = next((c["suite"]["kit"] for c in reversed(calls) if c["suite"].get("kit")), None) or {}
    commit = env.get("git_commit") or kit.get("manifest", {}).get("git_commit")
    gpus = "; ".join(f"{g['name']} (driver {g['driver']}, {g['memory']})" for g in env.get("gpus", []))
    md = [
        f"# GPU suite: {env['hardware']}, {env['utc'][:10]}",
        "",
        f"- device: {gpus or 'no GPU (a CPU rehearsal)'}",
        f"- versions: python {env['python']}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"{env.get('dali') or 'no DALI'}, av {env.get('av')}",
        f"- commit {commit or 'unknown'} (the kit's, where the host has no .git)",
        "",
        "## Targets",
        "",
        markdown_table(record["targets"]),
        "",
        "## Steps",
        "",
        markdown_table(statuses),
        "",
    ]
    (folder / "summary.md").write_text("\n".join(md))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
