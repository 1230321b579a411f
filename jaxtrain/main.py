"""Command line: `python -m jaxtrain.main --config=configs/clip.py[:variant] [--workdir=...]`.

Overrides: `--config.optim.lr=3e-4 --config.train.steps=500`. Running the same command in the same
workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/clip.py or configs/clip.py:runlocal.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, tensorboard). "
    "Default: runs/<config file name>."
)

EXIT_PREEMPTED = 42  # a checkpoint was saved after SIGTERM; re-run the same command to resume


def _default_workdir() -> str:
    path = flags.FLAGS["config"].config_filename
    return os.path.join("runs", os.path.splitext(os.path.basename(path))[0])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from jaxtrain.trainer import Trainer  # after flag parsing: keeps --help fast

    config = _CONFIG.value
    workdir = _WORKDIR.value or _default_workdir()
    logging.info("jaxtrain: task=%s workdir=%s", config.task, workdir)
    result = Trainer(config, workdir).train()
    logging.info("Finished at step %d. Eval metrics:\n%s", result.final_step, result.table())
    if result.best_step is not None:
        logging.info("Best: step %d, %.4f", result.best_step, result.best_metric)
    return EXIT_PREEMPTED if result.preempted else 0


class _QuietLibraries:
    """Keep INFO lines from jaxtrain; libraries (Orbax logs every save) only from WARNING up."""

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or "/jaxtrain/" in record.pathname


def run() -> None:
    flags.mark_flags_as_required(["config"])
    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(_QuietLibraries())
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
