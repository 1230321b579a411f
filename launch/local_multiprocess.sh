#!/usr/bin/env bash
# N jaxtrain processes on this machine, each with its own CPU devices, joined by
# jax.distributed over gloo on localhost. What the multi-process tests use; also a way to try a
# multi-host setup on a laptop.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- --config=configs/clip.py:runlocal --workdir=runs/mp
#
# Every process runs the same command; process 0 logs and writes metrics, every process writes its
# shard of each checkpoint. The script exits with the first non-zero exit code (42 = preempted).
set -euo pipefail
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- <jaxtrain.main flags>" >&2
  exit 2
fi
nproc="$1"; ndev="$2"; shift 3
port="${JAXTRAIN_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"
pids=()
for ((i = 0; i < nproc; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${ndev} ${JAXTRAIN_XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    python -m jaxtrain.main --coordinator_address="localhost:${port}" --num_processes="$nproc" \
    --process_id="$i" "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' TERM INT
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [[ $rc -eq 0 ]] && rc=$code; }
done
exit "$rc"
