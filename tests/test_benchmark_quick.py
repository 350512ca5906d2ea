"""`python -m benchmark ... --quick` on any CPU: the model benchmark skips what would be emulated (and says
why in its rows), and the benchmarks that read real video say in one line what they need."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import benchmark.__main__ as bench_cli
import benchmark.loader
import benchmark.model
import runtime


def test_quick_model_benchmark_skips_emulated_bf16_rows_and_records_why(tmp_path, monkeypatch):
    monkeypatch.setenv("GCVIDEO_BENCH_OUT", str(tmp_path))
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU
    args = argparse.Namespace(
        device="cpu", quick=True, models="tsn_mini", size=32, batch=1, frames=2, warmup=0, iters=1, threads=1
    )
    threads = torch.get_num_threads()
    try:
        assert benchmark.model.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(next(tmp_path.glob("model_*.json")).read_text())
    rows = {r["mode"]: r for r in record["rows"]}
    assert set(rows) == {"eager_fp32_nchw", "channels_last", "bf16_autocast"}  # quick: no compiled mode
    assert "emulated on this CPU" in rows["bf16_autocast"]["skipped"]
    assert "fwd_clips_per_s" not in rows["bf16_autocast"] and rows["channels_last"]["fwd_clips_per_s"] > 0
    assert record["meta"]["skipped"] == {"bf16_autocast": rows["bf16_autocast"]["skipped"]}
    assert "skipped" in next(tmp_path.glob("model_*.md")).read_text()


def test_bf16_modes_run_where_the_cpu_has_native_bf16_or_when_named(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert benchmark.model.skipped_modes(list(benchmark.model.MODES), cpu) == {}
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert set(benchmark.model.skipped_modes(list(benchmark.model.MODES), cpu)) == {
        "bf16_autocast",
        "compiled",
    }
    assert benchmark.model.skipped_modes(["compiled"], torch.device("cuda")) == {}


def test_loader_benchmark_without_the_shared_data_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark.loader, "VIDEOS", tmp_path / "no-such-dir")
    with pytest.raises(SystemExit) as exit_:
        bench_cli.main(["loader", "--quick", "--out", str(tmp_path / "out")])
    message = str(exit_.value)
    assert "\n" not in message and "../shared/data/videos/kinetics" in message
    assert str(tmp_path / "no-such-dir") in message and not (tmp_path / "out").exists()


def test_plots_put_long_labels_on_horizontal_bars_and_wide_ranges_on_a_log_axis(tmp_path):
    from PIL import Image

    from benchmark.common import Plot, _horizontal, draw_plot, wide_range

    assert wide_range([0.6, 1.05, 79.8]) and not wide_range([34.1, 108.0]) and not wide_range([0.0, 5.0])
    series = [f"torch h264 gop {g}" for g in range(1, 13)]
    assert _horizontal(series) and _horizontal(["a"] * 7) and not _horizontal(["h264", "mjpeg"])
    rows = [{"series": s, "clips_per_s": 10.0 + i} for i, s in enumerate(series)]
    title = "H.264 keyframe interval vs TSN-8 random-access decode (clips per CPU second), long"
    draw_plot(Plot(x="series", y="clips_per_s", title=title), rows, tmp_path / "bars.png")
    width, height = Image.open(tmp_path / "bars.png").size
    assert height > 480 and width >= 864  # grown for 12 rows of labels, not squeezed under the axis
