"""`python -m benchmark <preprocess|loader|reader|dali_cpu|model|train|demo|all> [--quick] [--out DIR]
[--warmup N] [--iters N]`.

Imports benchmark/<what>.py only when asked for, lets it add its own options through an optional
`add_arguments(parser)`, and calls its `main(args)`. Every benchmark receives these shared attributes:

- `args.quick` (bool): the CPU mode, about a minute per benchmark with small inputs; the default is the full
  GPU mode, which falls back to the quick mode with a warning where no CUDA GPU is present.
- `args.device` (str): "cuda" in the full mode, "cpu" in the quick mode.
- `args.out` (str | None): results directory (also exported as GCVIDEO_BENCH_OUT, read by write_results).
- `args.warmup`, `args.iters` (int | None): overrides of the benchmark's own defaults when given.
- `args.seed` (int).

`all` runs each benchmark in its own process (so one's memory, threads and CUDA state cannot skew the next),
carries on past failures, and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import time
from types import ModuleType

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from benchmark.common import OUT_ENV

BENCHMARKS = ("preprocess", "loader", "reader", "dali_cpu", "model", "train")  # what `all` runs
LONG_BENCHMARKS = ("demo", "remote")  # minutes each: only when named
log = logging.getLogger("benchmark")


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "what",
        choices=[*BENCHMARKS, *LONG_BENCHMARKS, "all"],
        help="benchmark to run ('all': all but demo and remote)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU mode, small inputs, about a minute per benchmark (default: full GPU mode)",
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="results directory (default benchmark/results)"
    )
    parser.add_argument("--warmup", type=int, default=None, metavar="N", help="untimed calls before timing")
    parser.add_argument("--iters", type=int, default=None, metavar="N", help="timed calls")
    parser.add_argument("--seed", type=int, default=0)


def load_benchmark(what: str) -> ModuleType:
    """Import benchmark/<what>.py, turning a missing file or package into an error that says what to do."""
    try:
        return importlib.import_module(f"benchmark.{what}")
    except ModuleNotFoundError as err:
        if err.name == f"benchmark.{what}":
            raise SystemExit(
                f"benchmark/{what}.py does not exist in this checkout: cannot run the '{what}' benchmark"
            ) from err
        raise SystemExit(
            f"the '{what}' benchmark needs the Python package '{err.name}', which is not "
            f"installed: run `make setup` (or install it into .venv), then try again"
        ) from err


def choose_quick_or_gpu(args: argparse.Namespace) -> None:
    """--quick (on the CPU) when asked or when there is no GPU, else the full GPU benchmarks: sets args.quick
    and args.device."""
    import torch

    if not args.quick and not torch.cuda.is_available():
        log.warning(
            "no CUDA GPU found: running the quick CPU mode instead of the full GPU benchmarks "
            "(pass --quick to ask for it explicitly)"
        )
        args.quick = True
    args.device = "cpu" if args.quick else "cuda"


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    argv = ["--quick"] if args.quick else []
    for name in ("out", "warmup", "iters"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv + ["--seed", str(args.seed)]


def run_all(args: argparse.Namespace, console: Console) -> int:
    outcomes = []
    for what in BENCHMARKS:
        console.rule(f"benchmark {what}")
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "benchmark", what, *forwarded_arguments(args)]).returncode
        outcomes.append((what, rc, time.perf_counter() - start))
        if rc != 0:
            log.error("benchmark %s failed (exit status %d); carrying on with the next one", what, rc)
    table = Table(title="python -m benchmark all")
    for column in ("benchmark", "result", "seconds"):
        table.add_column(column)
    for what, rc, seconds in outcomes:
        table.add_row(what, "ok" if rc == 0 else f"[red]failed ({rc})[/red]", f"{seconds:.0f}")
    console.print(table)
    return 1 if any(rc != 0 for _, rc, _ in outcomes) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console(stderr=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)],
    )

    # The module's own options can only be added once we know which module: find its name first.
    what = next((a for a in argv if a in (*BENCHMARKS, *LONG_BENCHMARKS)), None)

    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="Run gcvideo's benchmarks. Results: <out>/<what>_<hardware>_<date>.json, .md and .png "
        "(default out: benchmark/results).",
    )
    add_shared_arguments(parser)
    module = load_benchmark(what) if what else None
    if module is not None and hasattr(module, "add_arguments"):
        module.add_arguments(parser.add_argument_group(f"{what} options"))
    args = parser.parse_args(argv)

    choose_quick_or_gpu(args)
    if args.out is not None:
        os.environ[OUT_ENV] = os.path.abspath(args.out)
    if module is None:
        return run_all(args, console)
    log.info("benchmark %s: %s mode on %s", what, "quick" if args.quick else "full", args.device)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
