"""`python -m jaxtrain.export ...`: see :mod:`jaxtrain.export` (its docstring is the usage)."""

import jaxtrain.export
from jaxtrain.export.cli import run

__doc__ = jaxtrain.export.__doc__  # absl's --help prints the main module's docstring

if __name__ == "__main__":
    run()
