"""The data-cost benchmark's parts: the preprocess cost routes and variants, the loader's rows and options,
the shared CPU counters (what `python -m benchmark preprocess` and `loader` are built from)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from benchmark import loader
from benchmark import preprocess as bench_pre
from benchmark.common import process_tree_cpu_s, rusage_cpu_s
from preprocess.ffmpeg_args import EncodeSettings


def _args(**kw) -> argparse.Namespace:
    defaults = {"short_side": 256, "presets": "veryfast,superfast", "gops": "1,4", "crfs": "19,23"}
    return argparse.Namespace(**{**defaults, **kw})


def test_cost_routes_put_the_default_preset_first_and_the_frame_folders_last():
    routes = bench_pre.cost_routes(_args(presets=f"ultrafast,{EncodeSettings().preset}"))
    names = [name for name, _ in routes]
    assert names[0] == f"gcvideo h264 {EncodeSettings().preset}"
    assert names[-1] == "frame folders" and routes[-1][1] is None
    assert len(names) == len(set(names)) == 3  # the default preset named again is not a second row
    assert all(s.gop == EncodeSettings().gop and s.crf == EncodeSettings().crf for _, s in routes[:-1])


def test_encode_variants_sweep_gops_at_the_default_crf_and_crfs_at_the_default_gop():
    variants = bench_pre.encode_variants(_args(gops="1,8", crfs=f"19,{EncodeSettings().crf}"))
    assert [(m, s.gop, s.crf) for m, s in variants] == [
        ("gop random access", 1, EncodeSettings().crf),
        ("gop random access", 8, EncodeSettings().crf),
        ("crf", EncodeSettings().gop, 19),  # the default CRF is already the GOP sweep's
    ]


def test_startup_args_run_ffmpeg_for_nothing():
    args = bench_pre.startup_args()
    assert args[0] == "ffmpeg" and "-nostdin" in args
    subprocess.run(args, check=True, capture_output=True)


def test_loader_plan_adds_crf_rows_at_the_default_gop_with_their_own_folders():
    default = EncodeSettings()
    rows = loader.plan((1, default.gop), gpu=False, crfs=(19, default.crf))
    crf_rows = [v for v in rows if v.crf is not None]
    assert [(v.path, v.gop, v.crf) for v in crf_rows] == [("torch", default.gop, 19)]
    assert crf_rows[0].series == f"torch h264 gop {default.gop} crf 19"
    assert len({v.folder for v in rows if v.codec == "h264"}) == 3  # gop 1, default gop, default gop crf 19
    assert rows[0].path == "frame folders"


@pytest.mark.parametrize(
    "text, crfs", [("19,21", (19, 21)), ("23", (23,)), ("x", None), ("52", None), ("", None)]
)
def test_crf_list(text, crfs):
    if crfs is None:
        with pytest.raises(argparse.ArgumentTypeError, match="0..51"):
            loader.crf_list(text)
    else:
        assert loader.crf_list(text) == crfs


def test_cpu_counters_see_a_busy_child_live_and_reaped():
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(5)"
    before = rusage_cpu_s()
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        deadline = time.monotonic() + 20
        while process_tree_cpu_s(child.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        live = process_tree_cpu_s(os.getpid(), include_root=False)
        assert live >= 0.25  # the child, found below this process
        assert process_tree_cpu_s(os.getpid()) >= live  # and this process with it
    finally:
        child.kill()
        child.wait()
    assert rusage_cpu_s() - before >= 0.25  # reaped: in this process's rusage
