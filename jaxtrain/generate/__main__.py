"""`python -m jaxtrain.generate ...`: see :mod:`jaxtrain.generate.cli` (its docstring is the
usage)."""

from jaxtrain.generate import cli

__doc__ = cli.__doc__  # absl's --help prints the main module's docstring

if __name__ == "__main__":
    cli.run()
