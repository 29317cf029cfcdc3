#!/usr/bin/env bash
# Runs N processes of `python -m jaxft.train` on this machine, joined with jax.distributed as N hosts
# would be: the multi-host path (coordinator, per-process batch slices, collectives over gloo,
# process-0-only metrics, Orbax checkpoints written by every process) without a cluster.
#
#   launch/local.sh [-n PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [--] TRAIN_ARGS...
#
# e.g. launch/local.sh -n 2 -d 4 -- --config=configs/quickstart.py --workdir=/tmp/run \
#        --config.mesh.data=2 --config.mesh.fsdp=4
#
# Each process's output is prefixed with [pN]. When one process fails the others are stopped.
# Exits 0 when every process exits 0, else with the first failing status.
set -uo pipefail

procs=2
devices=4
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) procs="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if ! [[ "$procs" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: -n and -d take positive integers (got -n $procs -d $devices)" >&2
  exit 2
fi

python="${PYTHON:-python}"
cd "$(dirname "$0")/.."
port="${JAXFT_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < procs; i++)); do
  JAXFT_COORDINATOR="localhost:$port" JAXFT_NUM_PROCESSES="$procs" JAXFT_PROCESS_ID="$i" \
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    "$python" -m jaxft.train "$@" \
    > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
done

# Poll rather than `wait` in order: a process that dies early must stop the others at once (they
# would otherwise wait for it in a collective until the coordinator's timeout).
status=0
left=$procs
declare -A done_
while ((left > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -n "${done_[$i]:-}" ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      rc=$?
      done_[$i]=1
      left=$((left - 1))
      echo "local.sh: process $i exited with status $rc" >&2
      if ((rc != 0 && status == 0)); then
        status=$rc
        stop_all
      fi
    fi
  done
  ((left > 0)) && sleep 0.5
done
wait  # the output filters
exit "$status"
