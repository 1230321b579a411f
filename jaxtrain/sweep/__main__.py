"""`python -m jaxtrain.sweep ...` (see :mod:`jaxtrain.sweep.cli`)."""

import sys

from jaxtrain.sweep.cli import run

if __name__ == "__main__":
    sys.exit(run())
