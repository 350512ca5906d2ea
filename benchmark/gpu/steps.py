"""The GPU suite's steps, one per process: `python -m benchmark.gpu.steps STEP --out FILE --shards DIR
--scratch DIR [--cpu]` (benchmark/gpu/suite.py starts them, each under its own time budget).

Each step reuses the project's own benchmark code (benchmark.model, benchmark.train, benchmark.loader) and
rewrites its result file after every row, so a step killed at its budget still leaves what it measured.
`--cpu` is the rehearsal: the same code at tiny sizes on a CPU; what only a GPU can do is recorded as
skipped ("no CUDA"), never as a pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("benchmark.gpu")


@dataclass(frozen=True)
class Sizes:
    """What each step measures: the real sizes on the GPU, tiny ones in the CPU rehearsal."""

    models: tuple[str, ...]
    model_batches: tuple[int, ...]
    model_size: int
    model_modes: tuple[tuple[int, tuple[str, ...]], ...]  # (batch, modes) in the order they run
    model_warmup: int | None  # None: the model benchmark's own counts
    model_iters: int | None
    crop: int
    scale: int
    loader_batch: int
    loader_iters: int
    loader_rounds: int
    e2e_model: str
    e2e_batch: int
    e2e_warmup: int
    e2e_iters: int
    train_model: str
    train_batch: int
    train_crop: int


GPU = Sizes(
    models=("tsm_r50", "gc_tsm_r50"),
    model_batches=(32, 64),
    model_size=224,
    # compiled rows last: compiling two ResNet-50s (forward, then forward+backward) takes most of the
    # step, and a budget cut then loses only them
    model_modes=(
        (32, ("eager_fp32_nchw", "channels_last", "bf16_autocast")),
        (64, ("bf16_autocast", "compiled")),
    ),
    model_warmup=5,
    model_iters=15,
    crop=224,
    scale=256,
    loader_batch=32,
    loader_iters=10,
    loader_rounds=3,
    e2e_model="gc_tsm_r50",
    e2e_batch=64,
    e2e_warmup=10,
    e2e_iters=40,
    train_model="gc_tsm_r50",
    train_batch=32,
    train_crop=112,
)
CPU = Sizes(
    models=("tsm_mini", "gc_tsm_mini"),
    model_batches=(2,),
    model_size=56,
    model_modes=((2, ("eager_fp32_nchw", "channels_last")),),
    model_warmup=None,
    model_iters=None,
    crop=56,
    scale=64,
    loader_batch=4,
    loader_iters=2,
    loader_rounds=1,
    e2e_model="gc_tsm_mini",
    e2e_batch=4,
    e2e_warmup=1,
    e2e_iters=3,
    train_model="gc_tsm_mini",
    train_batch=4,
    train_crop=28,
)


class Result:
    """The step's result file, rewritten after every change."""

    def __init__(self, path: Path, step: str, cpu: bool):
        self.path = path
        self.data: dict = {"step": step, "cpu_rehearsal": cpu, "status": "running", "rows": []}
        self.write()

    def row(self, row: dict) -> None:
        self.data["rows"].append(row)
        log.info("%s: %s", self.data["step"], json.dumps(row, default=str))
        self.write()

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def kit_indexes(shards: Path) -> dict[int, Path]:
    """GOP -> the kit's index (train: the clips repeated, val: each clip once), as prepare lays them out."""
    found = {}
    for d in sorted(shards.glob("h264-g*")):
        if (d / "index_kit.json").is_file():
            found[int(d.name.removeprefix("h264-g"))] = d / "index_kit.json"
    if not found:
        raise SystemExit(f"no h264-g*/index_kit.json under {shards!r}: the kit's shards are missing")
    return found


def default_gop(indexes: dict[int, Path]) -> int:
    """preprocess's default keyframe interval where the kit has it, else the nearest."""
    from preprocess.ffmpeg_args import EncodeSettings

    want = EncodeSettings().gop
    return min(indexes, key=lambda g: (abs(g - want), g))


# ------------------------------------------------------------------------------------------------- steps


def step_env(args, res: Result) -> None:
    from benchmark.common import command_output, environment

    env = environment()
    smi = command_output(["nvidia-smi", "-q"], timeout_s=30)
    wanted = ("Product Name", "Driver Version", "CUDA Version", "Total", "Persistence Mode", "Performance")
    summary = [ln.strip() for ln in (smi or "").splitlines() if ln.strip().startswith(wanted)][:40]
    info = {"environment": env, "nvidia_smi_q": summary or None, "cuda": _cuda_facts()}
    info["imports"] = {name: _import_path(name) for name in ("torch", "nvidia.dali", "av", "webdataset")}
    res.set(**info, status="ok")


def _cuda_facts() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    p = torch.cuda.get_device_properties(0)
    return {
        "available": True,
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "bf16": torch.cuda.is_bf16_supported(),
    }


def _import_path(name: str) -> str | None:
    import importlib

    try:
        return getattr(importlib.import_module(name), "__file__", None)
    except Exception as err:  # noqa: BLE001 (the point is to record why it does not import)
        return f"not importable: {type(err).__name__}: {err}"


def step_decode(args, res: Result) -> None:
    from benchmark.gpu.decode import compare_shards

    gpu = cuda_available() and not args.cpu
    for gop, index in kit_indexes(Path(args.shards)).items():
        for row in compare_shards(index, gpu=gpu):
            res.row({"gop": gop, **row})
    rows = res.data["rows"]
    if not gpu:
        res.set(status="skipped", why="no CUDA: PyAV side only, NVDEC not compared")
    else:
        exact = all(r["frame_exact"] for r in rows)
        res.set(status="ok" if exact else "failed", frame_exact=exact)
        if not exact:
            res.set(why="NVDEC returned other frames than PyAV at the same indices: see rows")


def step_model(args, res: Result) -> None:
    from benchmark import model as bench_model

    sizes = CPU if args.cpu else GPU
    device = "cpu" if args.cpu or not cuda_available() else "cuda"
    for batch, modes in sizes.model_modes:
        ns = _bench_args(args, device, f"model-b{batch}-{modes[0]}")
        ns.batch, ns.frames, ns.size, ns.threads = batch, 8, sizes.model_size, None
        ns.modes, ns.models = ",".join(modes), ",".join(sizes.models)
        ns.warmup, ns.iters = sizes.model_warmup, sizes.model_iters
        for row in _rows_of(bench_model.main, ns):
            res.row(row)
    res.set(status="ok", device=device)


def step_e2e(args, res: Result) -> None:
    from benchmark import train as bench_train

    sizes = CPU if args.cpu else GPU
    device = "cpu" if args.cpu or not cuda_available() else "cuda"
    indexes = kit_indexes(Path(args.shards))
    gop = default_gop(indexes)
    ns = _bench_args(args, device, "e2e")
    ns.index, ns.num_segments, ns.batch_size = str(indexes[gop]), 8, sizes.e2e_batch
    ns.precision, ns.no_compile, ns.kinetics = None, bool(args.cpu), False
    ns.workers, ns.backend = (2, "torch") if device == "cpu" else (8, "dali-gpu")
    cfg = bench_train.bench_config(ns, sizes.e2e_model)
    cfg.data.crop_size, cfg.data.scale_size = sizes.crop, sizes.scale  # Kinetics' on the GPU, tiny on a CPU
    for data in ("shards", "synthetic"):  # the target first, then its ceiling
        row = bench_train.run_one(cfg, data, ns, sizes.e2e_warmup, sizes.e2e_iters)
        res.row({"gop": gop, **row})
    shards = res.data["rows"][0]
    res.set(
        status="ok",
        device=device,
        target={"clips_per_s": 650, "data_wait": 0.05},
        meets_target=device == "cuda" and shards["clips_per_s"] >= 650 and shards["data_wait"] < 0.05,
    )


def step_loader(args, res: Result) -> None:
    from benchmark.gpu.loader_sweep import sweep

    gpu = cuda_available() and not args.cpu
    for row in sweep(kit_indexes(Path(args.shards)), CPU if args.cpu else GPU, gpu=gpu):
        res.row(row)
    res.set(status="ok" if gpu else "skipped", **({} if gpu else {"why": "no CUDA: NVDEC rows not run"}))


def step_nccl(args, res: Result) -> None:
    from benchmark.gpu.resume import straight_and_resumed

    gpu = cuda_available() and not args.cpu
    indexes = kit_indexes(Path(args.shards))
    summary = straight_and_resumed(
        indexes[default_gop(indexes)], Path(args.scratch) / "nccl", CPU if args.cpu else GPU, gpu=gpu
    )
    res.set(**summary)
    if not gpu:
        res.set(status="skipped", why="no CUDA: NCCL not run (the same runs rehearsed with gloo on the CPU)")
    else:
        res.set(status="ok" if summary["resume_matches"] else "failed")


def step_pytest(args, res: Result) -> None:
    junit = Path(args.scratch) / "pytest-gpu.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    files = ["tests/test_gpu.py", "tests/test_runtime.py"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    cmd += [f"--junitxml={junit}"]
    env = dict(os.environ, GCVIDEO_GPU_SHARDS=args.shards)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    counts = _junit_counts(junit)
    res.set(command=" ".join(cmd[1:]), exit_status=done.returncode, **counts)
    res.set(tail=done.stdout[-3000:] + done.stderr[-1000:])
    if done.returncode not in (0, 5) or counts.get("failures", 0) or counts.get("errors", 0):
        res.set(status="failed", why=f"pytest exit status {done.returncode}")
    elif counts.get("tests", 0) == counts.get("skipped", 0):
        res.set(status="skipped", why=f"all {counts.get('tests', 0)} GPU tests skipped (no CUDA)")
    else:
        res.set(status="ok")


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _bench_args(args, device: str, name: str) -> argparse.Namespace:
    """The shared attributes every benchmark.main reads (benchmark/__main__.py), results into scratch."""
    out = Path(args.scratch) / name
    return argparse.Namespace(
        quick=device == "cpu", device=device, out=str(out), warmup=None, iters=None, seed=0
    )


def _rows_of(main, ns: argparse.Namespace) -> list[dict]:
    """Run a benchmark's main into its own scratch folder and return the rows of the JSON it wrote."""
    os.environ["GCVIDEO_BENCH_OUT"] = ns.out
    main(ns)
    written = sorted(Path(ns.out).glob("*.json"))
    return json.loads(written[-1].read_text())["rows"] if written else []


STEP_FUNCTIONS = {
    "env": step_env,
    "decode": step_decode,
    "e2e": step_e2e,
    "model": step_model,
    "loader": step_loader,
    "nccl": step_nccl,
    "pytest": step_pytest,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.gpu.steps")
    parser.add_argument("step", choices=list(STEP_FUNCTIONS))
    parser.add_argument("--out", required=True, help="the step's result file (JSON)")
    parser.add_argument("--shards", default="", help="the installed kit's shards folder")
    parser.add_argument("--scratch", required=True, help="working folder (benchmarks' own files, runs)")
    parser.add_argument("--cpu", action="store_true", help="the rehearsal's tiny sizes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    res = Result(Path(args.out), args.step, args.cpu)
    t0 = time.monotonic()
    try:
        STEP_FUNCTIONS[args.step](args, res)
    except BaseException as err:
        res.set(status="failed", why=f"{type(err).__name__}: {err}"[:2000])
        raise
    finally:
        res.set(seconds=round(time.monotonic() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
