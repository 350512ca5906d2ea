"""docker/: the image's pins equal pyproject.toml's, the Dockerfile lints clean, the entry point dispatches.

The image itself cannot be built here (no Docker daemon, no GPU); these tests check what can go wrong without
building it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
REQUIREMENTS = ROOT / "docker" / "requirements.py"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pyproject_pins() -> dict[str, str]:
    reqs = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["imagenet"]
    return dict(re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", r).groups() for r in reqs)


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in "\n".join(lines).replace("\\\n", " ").split("\n") if i.strip()]


def run_requirements(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REQUIREMENTS), str(ROOT / "pyproject.toml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_pyproject_dependency_is_an_exact_pin():
    extras = PROJECT["optional-dependencies"]["imagenet"]
    assert len(pyproject_pins()) == len(PROJECT["dependencies"]) + len(extras)


def test_dockerfile_torch_dali_torchvision_pins_equal_pyproject():
    args, pins = dockerfile_args(), pyproject_pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert pins[args["DALI_PACKAGE"]] == args["DALI_VERSION"]
    # The CUDA flavours must agree: cu130 torch index, cuda130 DALI wheel, CUDA 13.0 base image.
    assert args["TORCH_INDEX"].endswith("/cu130") and args["DALI_PACKAGE"].endswith("cuda130")
    assert re.search(r"^FROM nvidia/cuda:13\.0\.\d+-\w+-ubuntu\d\d\.04$", DOCKERFILE.read_text(), flags=re.M)


def test_torchvision_pin_is_the_release_built_for_the_torch_pin():
    # torchvision 0.(N+15).x is built for torch 2.N (0.28 <-> 2.13); a mismatched pair cannot be installed.
    pins = pyproject_pins()
    torch_minor = int(pins["torch"].split(".")[1])
    vision_minor = int(pins["torchvision"].split(".")[1])
    assert vision_minor == torch_minor + 15, (
        f"torchvision=={pins['torchvision']} is not built for torch=={pins['torch']}: "
        f"pin torchvision==0.{torch_minor + 15}.x in pyproject.toml"
    )


def test_dockerfile_installs_the_rest_from_pyproject_and_checks_the_result():
    steps = instructions()
    torch_step = next(i for i, step in enumerate(steps) if '"torch==${TORCH_VERSION}"' in step)
    assert '--index-url "${TORCH_INDEX}"' in steps[torch_step] and "extra-index-url" not in steps[torch_step]
    rest_step = next(i for i, step in enumerate(steps) if "uv pip install -r /tmp/requirements.txt" in step)
    assert (
        "docker/requirements.py pyproject.toml --extra imagenet --exclude torch,torchvision "
        "> /tmp/requirements.txt" in steps[rest_step]
    )
    assert steps[rest_step].endswith("docker/requirements.py pyproject.toml --extra imagenet --check")
    # Dependencies before the source (layer cache): pyproject is copied and installed before `COPY . .`.
    assert torch_step < steps.index("COPY pyproject.toml ./") < rest_step < steps.index("COPY . .")


def test_generated_requirements_are_the_pyproject_pins_without_torch():
    done = run_requirements("--extra", "imagenet", "--exclude", "torch,torchvision")
    assert done.returncode == 0, done.stderr
    expected = [
        r
        for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["imagenet"]
        if not r.startswith(("torch==", "torchvision=="))
    ]
    assert done.stdout.split() == expected
    assert "nvidia-dali-cuda130==2.4.0" in expected


def test_requirements_check_compares_installed_versions():
    done = run_requirements("--check")  # .venv was installed from pyproject.toml by `make setup`
    assert done.returncode == 0, done.stderr


def test_requirements_check_reports_a_mismatch(tmp_path):
    fake = tmp_path / "pyproject.toml"
    fake.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy==0.0.1", "surely-not-installed-pkg==1.0"]\n'
    )
    done = subprocess.run(
        [sys.executable, str(REQUIREMENTS), str(fake), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "numpy: pinned 0.0.1, installed" in done.stderr
    assert "surely-not-installed-pkg: pinned 1.0, not installed" in done.stderr


def test_requirements_refuse_unpinned_dependencies(tmp_path):
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\nname = "x"\ndependencies = ["numpy>=2"]\n')
    done = subprocess.run(
        [sys.executable, str(REQUIREMENTS), str(fake)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "not an exact pin" in done.stderr


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint_binary() is None, reason="hadolint is not installed (`make setup` installs it)")
def test_hadolint_finds_nothing():
    done = subprocess.run(
        [hadolint_binary(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_data_and_run_volumes():
    text = DOCKERFILE.read_text()
    user = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert user and user[-1] != "root" and not user[-1].startswith("0")
    assert 'VOLUME ["/data", "/runs"]' in text
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility,video" in text  # NVDEC needs the "video" capability
    assert re.search(r'^ENTRYPOINT \[.*"/opt/gcvideo/docker/entrypoint\.sh"\]$', text, flags=re.M)


def test_dockerignore_keeps_data_and_venv_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "data", "runs"):
        assert path in ignored


def test_entrypoint_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def dispatch(tmp_path):
    """Runs the entry point with `python` and `torchrun` replaced by scripts that print their arguments."""
    for tool in ("python", "torchrun"):
        fake = tmp_path / tool
        fake.write_text(f'#!/usr/bin/env bash\necho "{tool} $*"\n')
        fake.chmod(0o755)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        distributed = ("NPROC_PER_NODE", "NNODES", "RDZV_ENDPOINT", "RDZV_ID")
        clean = {k: v for k, v in os.environ.items() if k not in distributed}
        return subprocess.run(
            ["bash", str(ENTRYPOINT), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**clean, "PATH": f"{tmp_path}:{os.environ['PATH']}", **env},
        )

    return run


@pytest.mark.parametrize(
    "args, expected",
    [
        (["preprocess", "merge", "/data/k400"], "python -m preprocess merge /data/k400"),
        (["train", "--preset", "demo"], "python train.py train --preset demo"),
        (["evaluate", "/runs/a/best.pt"], "python train.py evaluate /runs/a/best.pt"),
        (["predict", "/runs/a/best.pt", "v.mp4"], "python train.py predict /runs/a/best.pt v.mp4"),
        (["benchmark", "all", "--quick"], "python -m benchmark all --quick"),
    ],
)
def test_entrypoint_dispatches_each_command(dispatch, args, expected):
    done = dispatch(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_entrypoint_runs_torchrun_for_one_node_and_for_several(dispatch):
    one_node = dispatch("train", "--preset", "gc_tsm_r50_k400_8f", NPROC_PER_NODE="8")
    assert one_node.stdout.strip() == (
        "torchrun --standalone --nnodes 1 --nproc-per-node 8 train.py train --preset gc_tsm_r50_k400_8f"
    )
    two_nodes = dispatch("train", NPROC_PER_NODE="8", NNODES="2", RDZV_ENDPOINT="node0:29400", RDZV_ID="k400")
    assert two_nodes.stdout.strip() == (
        "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d "
        "--rdzv-endpoint node0:29400 --rdzv-id k400 train.py train"
    )
    no_endpoint = dispatch("train", NNODES="2")
    assert no_endpoint.returncode == 2 and "RDZV_ENDPOINT" in no_endpoint.stderr


def test_entrypoint_rejects_unknown_commands_and_lists_the_known_ones(dispatch):
    done = dispatch("trian")
    assert done.returncode == 2
    assert "unknown command 'trian'" in done.stderr
    for command in ("preprocess", "train", "evaluate", "predict", "benchmark", "shell"):
        assert re.search(rf"^  {command} ", done.stderr, flags=re.M)
    assert dispatch().returncode == 0  # no command: the help text
