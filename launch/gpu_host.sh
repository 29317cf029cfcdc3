#!/usr/bin/env bash
# One host with several GPUs: a single process drives all of them (no jax.distributed needed).
#
#   launch/gpu_host.sh [--] TRAIN_ARGS...
#
# e.g. launch/gpu_host.sh --config=configs/quickstart.py --workdir=runs/q \
#        --config.mesh.data=1 --config.mesh.fsdp=-1
#
# CUDA_VISIBLE_DEVICES picks the GPUs; the config.mesh sizes must multiply to their number (one
# axis may be -1). JAXFT_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
[[ "${1:-}" == "--" ]] && shift
cd "$(dirname "$0")/.."

# Give JAX most of each GPU's memory up front (the default 75% strands a quarter of every GPU).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
cmd=("${PYTHON:-python}" -m jaxft.train --distributed=off "$@")
if [[ -n "${JAXFT_DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_host.sh: $(nvidia-smi -L | wc -l) GPUs on this host (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})" >&2
fi
exec "${cmd[@]}"
