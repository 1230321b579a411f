#!/usr/bin/env bash
# Wheels that benchmarks/gpu_suite.py needs on the GPU image (Python 3.12, x86_64, no network
# there) and that the image lacks: ml-collections (configs) and Pillow (jaxtrain.data.images
# imports it at module level), with their dependencies. Run here, where the package index is
# reachable; carry the folder along and install from it there:
#
#   bash benchmarks/gpu_wheels.sh            # -> .gpu_wheels/ (about 6 MB, gitignored)
#   pip install --no-index --find-links .gpu_wheels ml-collections pillow && \
#       python benchmarks/gpu_suite.py --out=$OUT
#
# grain, datasets, tensorboardX (and pyarrow) are not needed: the suite never reads data or
# writes metrics, and jaxtrain imports them only when a run does.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu_wheels
mkdir -p "$dest"
pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dest" ml-collections pillow
ls -1 "$dest"
du -sh "$dest"
