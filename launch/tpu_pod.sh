#!/usr/bin/env bash
# Run jaxtrain on every worker of a Cloud TPU VM (a single host or a pod slice).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR -- <jaxtrain.main flags>
#   launch/tpu_pod.sh my-v5p us-east5-a v5p-32 -- --config=configs/clip.py --workdir=gs://bucket/clip
#
# Creates the TPU VM if it does not exist (TPU_VERSION, default tpu-ubuntu2204-base), copies this
# checkout to every worker, installs it with the `tpu` extra, and runs the same command on all
# workers. jax.distributed.initialize() finds the pod's coordinator itself (--distributed=on).
# Re-running the same line resumes from the workdir's latest checkpoint; on a preemption every
# worker saves and exits 42. Needs the gcloud CLI, authenticated, with a default project.
set -euo pipefail
if [[ $# -lt 4 || "$4" != "--" ]]; then
  echo "usage: $0 NAME ZONE ACCELERATOR -- <jaxtrain.main flags>" >&2
  exit 2
fi
name="$1"; zone="$2"; accelerator="$3"; shift 4
version="${TPU_VERSION:-tpu-ubuntu2204-base}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
tpu=(gcloud compute tpus tpu-vm)

if ! "${tpu[@]}" describe "$name" --zone="$zone" >/dev/null 2>&1; then
  echo "creating TPU VM $name ($accelerator, $version) in $zone"
  "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$version"
fi

echo "copying $repo to every worker"
tar -C "$repo" --exclude=.git --exclude=.venv --exclude=runs -czf /tmp/jaxtrain-src.tgz .
"${tpu[@]}" scp /tmp/jaxtrain-src.tgz "$name":/tmp/jaxtrain-src.tgz --zone="$zone" --worker=all
"${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command \
  "mkdir -p ~/jaxtrain && tar -xzf /tmp/jaxtrain-src.tgz -C ~/jaxtrain && cd ~/jaxtrain && \
   python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"

printf -v flags ' %q' "$@"
echo "running on all workers: python -m jaxtrain.main --distributed=on$flags"
"${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command \
  "cd ~/jaxtrain && . .venv/bin/activate && python -m jaxtrain.main --distributed=on$flags"
