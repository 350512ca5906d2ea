#!/usr/bin/env bash
# The image's entry point: `docker run ... gcvideo <command> [arguments]` (docs/docker.md).
#
# train and evaluate run under torchrun when the distributed variables are set, else in one process:
#   NPROC_PER_NODE  processes (GPUs) on this node           (default 1)
#   NNODES          nodes taking part                        (default 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, reachable from every node (needed when NNODES > 1)
#   RDZV_ID         job id shared by all nodes               (default gcvideo)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

usage() {
  cat <<'USAGE'
usage: <command> [arguments]
  preprocess ...   python -m preprocess ...      videos -> shards (kinetics|list|frames|synthetic|merge)
  train ...        python train.py train ...     train (torchrun when NPROC_PER_NODE/NNODES > 1)
  evaluate ...     python train.py evaluate ...  multi-clip, multi-crop evaluation of checkpoints
  predict ...      python train.py predict ...   top-5 classes of one video
  benchmark ...    python -m benchmark ...       loader|model|train|preprocess|all [--quick]
  shell [...]      bash
  help             this text
Each command's own --help lists its options. Datasets live in /data, runs and results in /runs.
USAGE
}

launch() {  # launch SCRIPT ARGS...: one process, or torchrun with the rendezvous from the environment
  local nproc="${NPROC_PER_NODE:-1}" nnodes="${NNODES:-1}"
  if [[ "$nproc" == 1 && "$nnodes" == 1 ]]; then
    exec python "$@"
  fi
  if [[ "$nnodes" == 1 ]]; then
    exec torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" "$@"
  fi
  if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (a node every node can reach; see docs/docker.md)" >&2
    exit 2
  fi
  exec torchrun --nnodes "$nnodes" --nproc-per-node "$nproc" --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-gcvideo}" "$@"
}

command="${1:-help}"
shift || true
case "$command" in
  preprocess) exec python -m preprocess "$@" ;;
  train) launch train.py train "$@" ;;
  evaluate) launch train.py evaluate "$@" ;;
  predict) exec python train.py predict "$@" ;;
  benchmark) exec python -m benchmark "$@" ;;
  shell) exec bash "$@" ;;
  help | -h | --help) usage ;;
  *)
    echo "unknown command '$command'" >&2
    usage >&2
    exit 2
    ;;
esac
