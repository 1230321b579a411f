"""The toy regression task (tests/toy_task.py) as a config file, for command-line tests:

    PYTHONPATH=. python -m jaxtrain.main --config=tests/toy_config.py --workdir=...

Importing it registers the task. Overrides as usual: `--config.train.steps=80`.
"""

from tests import toy_task


def get_config():
    return toy_task.config()
