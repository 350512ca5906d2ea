#!/usr/bin/env bash
# The GPU suite's entry point on the host: bash benchmark/gpu/suite.sh OUT [--steps ...] [--cpu] [...]
# (benchmark/gpu/suite.py says what it does). PYTHON picks the interpreter: the host's python3 by default.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec "${PYTHON:-python3}" -m benchmark.gpu.suite "$@"
