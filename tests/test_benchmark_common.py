"""benchmark/common.py (timing, tags, result files) and the `python -m benchmark` dispatcher."""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest

from benchmark import __main__ as cli
from benchmark import common
from benchmark.common import Plot


def test_timeit_excludes_warmup_and_syncs_before_each_clock_read(monkeypatch):
    events: list[str] = []
    clock = iter(range(100))
    monkeypatch.setattr(common.time, "perf_counter", lambda: (events.append("clock"), float(next(clock)))[1])
    times = common.timeit(
        lambda: events.append("call"), warmup=2, iters=3, sync=lambda: events.append("sync")
    )
    assert events[:2] == ["call", "call"]  # warm-up, untimed
    assert events[2:] == ["sync", "clock", "call", "sync", "clock"] * 3
    assert times == [1.0, 1.0, 1.0]


def test_timeit_measures_each_call():
    calls = []
    times = common.timeit(lambda: calls.append(1), warmup=0, iters=4)
    assert len(calls) == 4 and len(times) == 4 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="iters"):
        common.timeit(lambda: None, warmup=0, iters=0)


def test_device_sync_only_for_cuda(monkeypatch):
    import torch

    assert common.device_sync("cpu") is None and common.device_sync(torch.device("cpu")) is None
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(str(device)))
    common.device_sync("cuda:1")()
    assert synced == ["cuda:1"]


def test_median_and_summary():
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError, match="no measurements"):
        common.median([])
    s = common.summary([0.5, 0.25, 1.0], items_per_call=8)
    assert s == {"median_s": 0.5, "min_s": 0.25, "max_s": 1.0, "per_s": 16.0}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz", "intel-xeon-platinum-8488c"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("AMD EPYC 9R14 96-Core Processor", "amd-epyc-9r14-96-core-processor"),
    ],
)
def test_slug(text, expected):
    assert common.slug(text) == expected


def test_hardware_tag_is_filename_safe_and_stable():
    tag = common.hardware_tag()
    assert re.fullmatch(r"(cpu-\d+c|gpu)-[a-z0-9]+(-[a-z0-9]+)*", tag), tag
    assert tag == common.hardware_tag()


def test_hardware_tag_names_cpu_cores_without_gpu(monkeypatch):
    monkeypatch.setattr(common, "_cuda_device_name", lambda: None)
    monkeypatch.setattr(common, "cpu_model", lambda: "Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz")
    monkeypatch.setattr(common, "cpu_count", lambda: 2)
    monkeypatch.setattr(common, "cpu_isa", lambda: "amx")
    assert common.hardware_tag() == "cpu-2c-intel-xeon-platinum-8488c-amx"
    monkeypatch.setattr(common, "cpu_isa", lambda: "avx2")  # same name, the slow kind: another file
    assert common.hardware_tag() == "cpu-2c-intel-xeon-platinum-8488c-avx2"
    monkeypatch.setattr(common, "_cuda_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert common.hardware_tag() == "gpu-nvidia-h100-80gb-hbm3"


def test_environment_reports_versions_and_command():
    env = common.environment()
    for key in (
        "python",
        "torch",
        "dali",
        "av",
        "ffmpeg",
        "cpu",
        "cpu_cores",
        "gpus",
        "command",
        "utc",
        "git_commit",
    ):
        assert key in env
    assert env["python"].startswith("3.")
    assert env["cpu_cores"] >= 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["utc"])
    json.dumps(env)  # must be storable as it is


def test_write_results_writes_json_markdown_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "hardware_tag", lambda: "cpu-2c-test")
    rows = [
        {"variant": "tsm", "batch": 2, "clips_per_s": 10.5},
        {"variant": "tsm", "batch": 4, "clips_per_s": 18.25},
        {"variant": "gc_tsm", "batch": 2, "clips_per_s": 10.0},
        {"variant": "gc_tsm", "batch": 4, "clips_per_s": 17.0, "note": "a|b"},
    ]
    plots = [
        Plot(x="batch", y="clips_per_s", group="variant", title="speed"),
        Plot(x="variant", y="clips_per_s", filename="bars.png", references=(("target", 20.0),)),
    ]
    path = common.write_results(
        "model", rows, meta={"precision": "bf16", "frames": 8}, plots=plots, out_dir=tmp_path
    )

    date = json.loads(path.read_text())["date"]
    assert path == tmp_path / f"model_cpu-2c-test_{date}.json"
    record = json.loads(path.read_text())
    assert record["what"] == "model" and record["hardware"] == "cpu-2c-test"
    assert record["meta"] == {"precision": "bf16", "frames": 8}
    assert record["rows"] == rows
    assert record["environment"]["torch"]
    png = f"model_cpu-2c-test_{date}_clips-per-s_vs_batch.png"
    assert record["plots"] == [png, "bars.png"]
    for name in record["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = path.with_suffix(".md").read_text().splitlines()
    header = "| variant | batch | clips_per_s | note |"
    table = md[md.index(header) : md.index(header) + 6]
    assert table[2] == "| tsm | 2 | 10.5 |  |"
    assert table[5] == "| gc_tsm | 4 | 17 | a\\|b |"
    assert "- precision: bf16" in md
    assert f"![{png}]({png})" in md


def test_write_results_follows_the_out_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(common.OUT_ENV, str(tmp_path / "elsewhere"))
    path = common.write_results("loader", [{"a": 1}], meta={})
    assert path.parent == tmp_path / "elsewhere" and path.with_suffix(".md").exists()


def test_plot_with_missing_keys_names_them(tmp_path):
    with pytest.raises(ValueError, match="no row has both keys"):
        common.draw_plot(Plot(x="batch", y="nope"), [{"batch": 1}], tmp_path / "x.png")


@pytest.fixture
def fake_loader(monkeypatch):
    """Stands in for benchmark/loader.py so that the dispatcher is tested on its own."""
    module = types.ModuleType("benchmark.loader")
    module.calls = []
    module.add_arguments = lambda parser: parser.add_argument("--backend", default="auto")
    module.main = lambda args: module.calls.append(args) or 0
    monkeypatch.setitem(sys.modules, "benchmark.loader", module)
    monkeypatch.delenv(common.OUT_ENV, raising=False)
    return module


def test_cli_dispatches_with_shared_and_module_options(fake_loader, tmp_path, monkeypatch):
    import os

    assert cli.main(["loader", "--quick", "--iters", "3", "--backend", "torch", "--out", str(tmp_path)]) == 0
    (args,) = fake_loader.calls
    assert (args.quick, args.device, args.iters, args.warmup, args.backend) == (True, "cpu", 3, None, "torch")
    assert os.environ[common.OUT_ENV] == str(tmp_path)


def test_cli_falls_back_to_quick_without_gpu(fake_loader, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="benchmark"):
        cli.main(["loader"])
    assert fake_loader.calls[0].quick is True and fake_loader.calls[0].device == "cpu"
    assert "no CUDA GPU" in caplog.text


def test_cli_explains_missing_module_or_package(monkeypatch):
    with pytest.raises(SystemExit, match=r"benchmark/nothing\.py does not exist"):
        cli.load_benchmark("nothing")

    def missing_dependency(name):
        raise ModuleNotFoundError("No module named 'nvidia'", name="nvidia")

    monkeypatch.setattr(cli.importlib, "import_module", missing_dependency)
    with pytest.raises(SystemExit, match="needs the Python package 'nvidia'.*make setup"):
        cli.load_benchmark("loader")


def test_cli_all_runs_every_benchmark_and_reports_failures(monkeypatch, tmp_path):
    monkeypatch.delenv(common.OUT_ENV, raising=False)
    commands = []

    def fake_run(cmd):
        commands.append(cmd)
        return types.SimpleNamespace(returncode=3 if cmd[3] == "loader" else 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli.main(["all", "--quick", "--out", str(tmp_path)]) == 1
    assert [c[3] for c in commands] == list(cli.BENCHMARKS)  # carried on past the failing loader
    assert commands[0][4:] == ["--quick", "--out", str(tmp_path.resolve()), "--seed", "0"]
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd: types.SimpleNamespace(returncode=0))
    assert cli.main(["all", "--quick"]) == 0


def test_cli_help_runs_as_a_module():
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "benchmark", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "{preprocess,loader,reader,dali_cpu,model,train,demo,remote,all}" in done.stdout
        and "--quick" in done.stdout
    )


@pytest.mark.parametrize(
    "index, visible, expected",
    [(0, "", "0"), (1, "", "1"), (0, "3", "3"), (1, "2,5", "5"), (0, "GPU-1a2b,GPU-3c4d", "GPU-1a2b")],
)
def test_nvidia_smi_id_follows_cuda_visible_devices(index, visible, expected):
    assert common.nvidia_smi_id(index, visible) == expected
