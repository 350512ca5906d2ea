"""Shared benchmark helpers: synchronised timing, medians, hardware tags and result files.

Every benchmark (benchmark/<what>.py) measures with `timeit`, reports medians, and ends with one call to
`write_results`, which writes three kinds of file into the results directory (default `benchmark/results/`,
overridden by `python -m benchmark ... --out DIR`, which sets the environment variable GCVIDEO_BENCH_OUT):

- `<what>_<hardware>_<YYYY-MM-DD>.json`: {"what", "hardware", "date", "meta", "environment", "rows", "plots"}
- `<what>_<hardware>_<YYYY-MM-DD>.md`: the metadata and a table, one line per row and one column per row key
- one PNG per `Plot` spec, e.g.

      write_results("loader", rows, meta={"batch_size": 8},
                    plots=[Plot(x="workers", y="clips_per_s", group="backend", title="Loader throughput")])

  draws `clips_per_s` against `workers`, one line per distinct `backend` value (grouped bars when the x values
  are not all numbers). Rows lacking x or y are left out of that plot. The file name defaults to
  `<what>_<hardware>_<date>_<y>_vs_<x>.png`. `references=(("frame folders, 2 workers", 150.0),)` adds dashed
  horizontal lines for targets or figures to beat (docs/benchmark.md lists them).

`<hardware>` is `hardware_tag()`: `gpu-<device name>` when CUDA is available, else `cpu-<N>c-<cpu model>`,
lower case and filename-safe, so results from different machines sit side by side and never overwrite each
other.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUT_ENV = "GCVIDEO_BENCH_OUT"


def nvidia_smi_id(cuda_index: int, visible: str | None = None) -> str:
    """The nvidia-smi --id of torch's GPU `cuda_index`: torch numbers the CUDA_VISIBLE_DEVICES entries 0..n-1,
    nvidia-smi takes the physical index (or UUID) those entries name."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return entries[cuda_index] if cuda_index < len(entries) else str(cuda_index)


def timeit(
    fn: Callable[[], Any], *, warmup: int, iters: int, sync: Callable[[], Any] | None = None
) -> list[float]:
    """Call `fn` `warmup` times untimed, then `iters` times timed; return the seconds of each timed call.

    `sync` (e.g. torch.cuda.synchronize) is called before every clock read so that queued asynchronous work is
    counted in the call that queued it and not in the next one.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"timeit needs warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


def device_sync(device: Any) -> Callable[[], None] | None:
    """The `sync` for `timeit` on `device` ("cuda", "cuda:1", a torch.device): CUDA synchronise, else None."""
    if str(device).startswith("cuda"):
        import torch

        return lambda: torch.cuda.synchronize(device)
    return None


def median(xs: Sequence[float]) -> float:
    if len(xs) == 0:
        raise ValueError("median of an empty sequence: the benchmark produced no measurements")
    return float(statistics.median(xs))


def summary(times_s: Sequence[float], *, items_per_call: float = 1.0) -> dict[str, float]:
    """Median, min and max seconds per call, and items per second at the median (e.g. clips/s)."""
    med = median(times_s)
    return {
        "median_s": med,
        "min_s": float(min(times_s)),
        "max_s": float(max(times_s)),
        "per_s": items_per_call / med if med > 0 else math.inf,
    }


def slug(text: str) -> str:
    """Lower case, runs of anything but [a-z0-9] become one '-', trademarks and clock speeds dropped."""
    text = re.sub(r"\((r|tm|c)\)|\bcpu\b|@.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, which containers and job schedulers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cuda_device_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def cpu_isa() -> str:
    """The widest matrix/vector unit the CPU has: 'amx', 'avx512' or 'avx2' (or '' elsewhere). CPUs sold
    under one generic name differ by ~3x in fp32 speed and ~10x in bf16 between these classes."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ""
    return next(
        (
            isa
            for isa, flag in (("amx", "amx_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"))
            if flag in flags
        ),
        "",
    )


def hardware_tag() -> str:
    """e.g. 'gpu-nvidia-h100-80gb-hbm3' or 'cpu-2c-intel-xeon-processor-amx': stable per machine, safe in file
    names."""
    gpu = _cuda_device_name()
    if gpu:
        return f"gpu-{slug(gpu)}"
    return "-".join(p for p in (f"cpu-{cpu_count()}c", slug(cpu_model()) or "unknown", cpu_isa()) if p)


def command_output(cmd: list[str], timeout_s: float = 20.0) -> str | None:
    """What `cmd` prints (stripped), or None where the tool is missing, fails or hangs: environment facts
    (git, ffmpeg, nvidia-smi) are recorded when they can be had and never stop a benchmark. Standard library
    only: benchmark/gpu uses it on a bare host."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return done.stdout.strip()


def rusage_cpu_s() -> float:
    """CPU seconds (user + system) of this process and of every child it has reaped so far, with theirs:
    a subprocess.run'ed ffmpeg counts once it has exited."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


def process_tree_cpu_s(root: int, *, include_root: bool = True, with_reaped: bool = False) -> float:
    """CPU seconds used so far by the live processes below `root` (and `root` itself unless include_root is
    False), from /proc. with_reaped adds what each of them counts for its own exited children (cutime,
    cstime): a Ray raylet's finished workers, a DataLoader worker's ffmpeg. Processes that exit meanwhile
    are skipped; what they used shows in their parent's reaped time once waited for."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    last_field = 15 if with_reaped else 13  # after the ')': utime stime [cutime cstime] are fields 11..14
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = sum(int(x) for x in fields[11:last_field])
    total, todo = 0, [root] if include_root else list(children.get(root, []))
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def load_note() -> str:
    """The 1/5/15-minute load averages now: other jobs on a shared CPU show here, next to the figures."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_facts() -> dict[str, str]:
    """lscpu's model name and flags (which SIMD the encoders and decoders can use), for the results' meta."""
    text = command_output(["lscpu"]) or ""
    facts = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {
        k.strip().lower().replace(" ", "_"): v.strip()
        for k, v in facts.items()
        if k in ("Model name", "Flags")
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_version() -> str | None:
    """DALI ships as nvidia-dali-cuda<ver>; report whichever is installed as 'name==version'."""
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"] or ""
        if name.startswith("nvidia-dali"):
            return f"{name}=={d.version}"
    return None


def _gpus() -> list[dict[str, str]]:
    out = command_output(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    gpus = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus


def _command() -> list[str]:
    """The command line as typed: `python -m benchmark ...` rather than the path of benchmark/__main__.py."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name.removesuffix(".__main__")] if spec is not None else sys.argv[:1]
    return ["python", *head, *sys.argv[1:]]


def environment() -> dict[str, Any]:
    """What a reader needs to reproduce or compare a result: versions, hardware, command, time, commit."""
    try:
        import torch

        torch_info = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
        }
    except ImportError:
        torch_info = {"torch": None}
    repo = Path(__file__).resolve().parent.parent
    commit = command_output(["git", "-C", str(repo), "rev-parse", "HEAD"])
    dirty = command_output(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    ffmpeg = command_output(["ffmpeg", "-hide_banner", "-version"])
    return {
        "python": platform.python_version(),
        **torch_info,
        "dali": _dali_version(),
        "av": _version("av"),
        "ffmpeg": ffmpeg.splitlines()[0].split(" Copyright")[0] if ffmpeg else None,
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": cpu_count(),
        "gpus": _gpus(),
        "hardware": hardware_tag(),
        "command": _command(),
        "utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


@dataclass(frozen=True)
class Plot:
    """One PNG: `y` against `x`, one series per value of `group` (or a single series when group is None)."""

    x: str
    y: str
    group: str | None = None
    title: str = ""
    filename: str | None = None
    logx: bool = False
    logy: bool = False
    references: tuple[tuple[str, float], ...] = ()  # (label, y) dashed lines: targets, figures to beat


def results_dir(out_dir: str | Path | None = None) -> Path:
    return Path(out_dir or os.environ.get(OUT_ENV) or DEFAULT_RESULTS_DIR)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub table; columns are the row keys in order of first appearance, missing cells left empty."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    if not columns:
        return "(no rows)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def wide_range(values: Sequence[float], ratio: float = 30.0) -> bool:
    """Whether positive values span more than `ratio` (~1 and ~80 videos/s): on a linear axis the small
    ones would be invisible, so the plot takes a log axis."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(positive) and max(positive) > ratio * min(positive)


def _value_text(v: float) -> str:
    """A bar's value: 4980, 463, 4.17, 0.602 (never 4.98e+03)."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _plain_log_axis(axis) -> None:
    """Log axis ticks as plain numbers at 1, 2, 5 x 10^k, without the overlapping minor-tick labels
    matplotlib writes when the values span less than a decade or two."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _value_text(v)))
    axis.set_minor_formatter(NullFormatter())


def _horizontal(categories: Sequence[str]) -> bool:
    """Short, few labels stand under vertical bars; long or many (loader series, reader variants) read along
    horizontal bars, where they never overlap."""
    return len(categories) > 6 or max(map(len, categories)) > 14


def _bars(ax, plot: Plot, categories: list[str], series: dict[str, list[dict[str, Any]]]) -> None:
    """Grouped bars per category of x, each labelled with its value."""
    horizontal = _horizontal(categories)
    width = 0.8 / len(series)
    for i, (label, rs) in enumerate(series.items()):
        heights = {str(r[plot.x]): r[plot.y] for r in rs}
        at = [j + (i - (len(series) - 1) / 2) * width for j, c in enumerate(categories) if c in heights]
        values = [heights[c] for c in categories if c in heights]
        bars = (ax.barh if horizontal else ax.bar)(at, values, width, label=label)
        ax.bar_label(bars, fmt=_value_text, fontsize="x-small", padding=2)
    if horizontal:
        ax.set_yticks(range(len(categories)), categories, fontsize="small")
        ax.invert_yaxis()  # the first row on top, as in the table
        ax.margins(x=0.08)  # room for the value labels
    else:
        ax.set_xticks(range(len(categories)), categories)
        ax.margins(y=0.2)  # room for the value labels and the legend above the bars


def draw_plot(plot: Plot, rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get(plot.x) is not None and _is_number(r.get(plot.y))]
    if not points:
        raise ValueError(f"plot {plot.y!r} vs {plot.x!r}: no row has both keys (row keys: {sorted(rows[0])})")
    series: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        series.setdefault(str(r.get(plot.group)) if plot.group else plot.y, []).append(r)
    numeric_x = all(_is_number(r[plot.x]) for r in points)
    categories = list(dict.fromkeys(str(r[plot.x]) for r in points))
    horizontal = not numeric_x and _horizontal(categories)
    height = max(4.0, 1.5 + 0.3 * len(categories) * max(1, len(series) * 0.6)) if horizontal else 4.0
    width = max(7.2, 4.5 + 0.075 * max(map(len, categories))) if horizontal else 7.2
    fig, ax = plt.subplots(figsize=(width, height), dpi=120, layout="constrained")
    if numeric_x:
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: r[plot.x])
            ax.plot([r[plot.x] for r in rs], [r[plot.y] for r in rs], marker="o", label=label)
    else:
        _bars(ax, plot, categories, series)
    log_y = plot.logy or wide_range([r[plot.y] for r in points])
    for label, y in plot.references:
        (ax.axvline if horizontal else ax.axhline)(y, linestyle="--", linewidth=1, color="grey")
        where = (
            ((y, 0.01), ("data", "axes fraction")) if horizontal else ((0.01, y), ("axes fraction", "data"))
        )
        ax.annotate(label, where[0], xycoords=where[1], fontsize="x-small", va="bottom")
    if plot.logx:
        ax.set_xscale("log")
        xs = sorted({r[plot.x] for r in points})
        if numeric_x and len(xs) <= 12:  # the measured values themselves (1, 2, 4, ... 250), not 10^k
            ax.set_xticks(xs, [_value_text(x) for x in xs])
            ax.minorticks_off()
    if log_y:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
        _plain_log_axis(ax.xaxis if horizontal else ax.yaxis)
    value_label = plot.y + (" (log scale)" if log_y else "")
    ax.set_xlabel(value_label if horizontal else plot.x)
    ax.set_ylabel(plot.x if horizontal else value_label)
    ax.set_title("\n".join(textwrap.wrap(plot.title or f"{plot.y} vs {plot.x}", 64)))
    ax.grid(True, alpha=0.3)
    if plot.group and horizontal:  # below the bars, where it covers none
        fig.legend(title=plot.group, fontsize="small", loc="outside lower center", ncols=min(len(series), 4))
    elif plot.group:
        ax.legend(title=plot.group, fontsize="small")
    fig.savefig(path)
    plt.close(fig)


def write_results(
    what: str,
    rows: Sequence[dict[str, Any]],
    *,
    meta: dict[str, Any],
    plots: Sequence[Plot] = (),
    out_dir: str | Path | None = None,
) -> Path:
    """Write <what>_<hardware>_<date>.json, .md and the plots; return the path of the JSON file.

    A second run on the same machine and day replaces the first: one file per (benchmark, hardware, date).
    """
    env = environment()
    date = env["utc"][:10]
    directory = results_dir(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{what}_{env['hardware']}_{date}"
    rows = [dict(r) for r in rows]

    plot_files = []
    for plot in plots:
        name = plot.filename or f"{stem}_{slug(plot.y)}_vs_{slug(plot.x)}.png"
        draw_plot(plot, rows, directory / name)
        plot_files.append(name)

    record = {
        "what": what,
        "hardware": env["hardware"],
        "date": date,
        "meta": meta,
        "environment": env,
        "rows": rows,
        "plots": plot_files,
    }
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")

    md = [f"# {what} benchmark: {env['hardware']}, {date}", ""]
    md += [
        f"- {k}: {_cell(v) if not isinstance(v, (list, dict)) else json.dumps(v, default=str)}"
        for k, v in meta.items()
    ]
    md += [
        f"- versions: python {env['python']}, torch {env.get('torch')}, {env['dali'] or 'no DALI'}, "
        f"av {env['av']}, {env['ffmpeg'] or 'no ffmpeg'}",
        f"- hardware: {env['cpu']} ({env['cpu_cores']} cores)"
        + "".join(f"; {g['name']} (driver {g['driver']}, {g['memory']})" for g in env["gpus"]),
        f"- command: `{' '.join(env['command'])}` at {env['utc']}, commit {env['git_commit'] or 'none'}",
        "",
        markdown_table(rows),
    ]
    md += [f"![{name}]({name})\n" for name in plot_files]
    (directory / f"{stem}.md").write_text("\n".join(md))
    log.info("results written to %s (+ .md, %d plots)", json_path, len(plot_files))
    return json_path
