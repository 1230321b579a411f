"""Command line: `python -m jaxtrain.main --config=configs/clip.py[:variant] [--workdir=...]`.

Overrides: `--config.optim.lr=3e-4 --config.train.steps=500`. Running the same command in the same
workdir resumes from its latest checkpoint. Flags, exit codes and logging are
:mod:`jaxtrain.cli`'s (shared with `jaxtrain.lr_find` and `jaxtrain.sweep`).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from jaxtrain.cli import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_RUN_FAILED,
    default_workdir,
    define_run_flags,
    init_distributed,
    setup_logging,
)

RUN_FLAGS = define_run_flags()


def main(argv: list[str]) -> int:
    """Train (or resume) the --config run in --workdir; the exit code says how it ended."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    init_distributed(RUN_FLAGS)
    # after flag parsing: keeps --help fast
    from jaxtrain import CheckpointSaveError, ConfigError, NonFiniteError, Trainer
    from jaxtrain.checkpoint import CheckpointMismatchError

    config = RUN_FLAGS.config.value
    workdir = RUN_FLAGS.workdir.value or default_workdir(RUN_FLAGS.config_file())
    logging.info("jaxtrain: task=%s workdir=%s", config.task, workdir)
    try:
        result = Trainer(config, workdir).train()
    except (ConfigError, CheckpointMismatchError) as e:  # the message says what to fix
        logging.error("%s: %s", type(e).__name__, e)
        return EXIT_BAD_INPUT
    except (NonFiniteError, CheckpointSaveError) as e:  # the run stopped; checkpoints intact
        logging.error("%s: %s", type(e).__name__, e)
        return EXIT_RUN_FAILED
    logging.info("Finished at step %d. Eval metrics:\n%s", result.final_step, result.table())
    if result.best_step is not None:
        logging.info("Best: step %d, %.4f", result.best_step, result.best_metric)
    return EXIT_PREEMPTED if result.preempted else EXIT_OK


def run() -> None:
    """The `jaxtrain` console script and `python -m jaxtrain.main`."""
    flags.mark_flags_as_required([RUN_FLAGS.config.name])
    setup_logging()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
