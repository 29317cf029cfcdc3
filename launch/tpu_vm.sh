#!/usr/bin/env bash
# A Cloud TPU VM or pod slice: copy this checkout (its last commit) to every worker, install it
# there, then run the same train command on all workers at once (--worker=all). jax.distributed
# finds the other workers through the TPU metadata.
#
#   launch/tpu_vm.sh TPU_NAME ZONE [GCLOUD_FLAGS...] -- TRAIN_ARGS...
#
# e.g. launch/tpu_vm.sh my-v4-16 us-central2-b --project=my-proj -- \
#        --config=configs/quickstart.py --workdir=/mnt/shared/runs/q --config.mesh.data=1 --config.mesh.fsdp=-1
#
# The workdir must be storage every worker sees (a Filestore NFS mount, or a bucket mounted with
# gcsfuse). JAXFT_STEPS=run skips the copy and install (re-runs, resumption); JAXFT_DRY_RUN=1 prints
# the gcloud commands instead of running them.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
name="$1"; zone="$2"; shift 2
gflags=()
while [[ $# -gt 0 && "$1" != "--" ]]; do gflags+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
train_args="$(printf '%q ' "$@")"
steps="${JAXFT_STEPS:-copy,install,run}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

run() {
  if [[ -n "${JAXFT_DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
tpu=(gcloud compute tpus tpu-vm)
where=("$name" "--zone=$zone" "--worker=all" "${gflags[@]}")

if [[ "$steps" == *copy* ]]; then
  archive="$(mktemp -d)/jaxft.tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run "${tpu[@]}" scp "$archive" "$name:jaxft.tar.gz" "--zone=$zone" --worker=all "${gflags[@]}"
fi
if [[ "$steps" == *install* ]]; then
  run "${tpu[@]}" ssh "${where[@]}" --command \
    "rm -rf ~/jaxft && mkdir -p ~/jaxft && tar xzf ~/jaxft.tar.gz -C ~/jaxft && cd ~/jaxft && python3 -m pip install -q -U 'jax[tpu]' -e ."
fi
if [[ "$steps" == *run* ]]; then
  run "${tpu[@]}" ssh "${where[@]}" --command \
    "cd ~/jaxft && python3 -m jaxft.train --distributed=on $train_args"
fi
