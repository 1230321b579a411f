"""Command line: `python -m jaxtrain.main --config=configs/clip.py[:variant] [--workdir=...]`.

Overrides: `--config.optim.lr=3e-4 --config.train.steps=500`. Running the same command in the same
workdir resumes from its latest checkpoint. Flags, exit codes and logging are
:mod:`jaxtrain.cli`'s (shared with `jaxtrain.lr_find` and `jaxtrain.sweep`).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from jaxtrain.cli import (
    EXIT_OK,
    EXIT_PREEMPTED,
    default_workdir,
    define_run_flags,
    failure_exit_code,
    init_distributed,
    parse_flags,
    setup_logging,
)

RUN_FLAGS = define_run_flags()


def main(argv: list[str]) -> int:
    """Train (or resume) the --config run in --workdir; the exit code says how it ended."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    init_distributed(RUN_FLAGS)
    # after flag parsing: keeps --help fast
    import jax

    from jaxtrain import Trainer, console
    from jaxtrain.trackers import run_name

    config = RUN_FLAGS.config.value
    workdir = RUN_FLAGS.workdir.value or default_workdir(RUN_FLAGS.config_file())
    logging.info("jaxtrain: task=%s run=%s workdir=%s", config.task, run_name(config, workdir),
                 workdir)
    try:
        with console.status("building the task, its data and the model",
                            enabled=jax.process_index() == 0):
            trainer = Trainer(config, workdir)
        result = trainer.train()
    except (Exception, KeyboardInterrupt) as e:
        code = failure_exit_code(e)
        if code is None:
            raise
        return code
    if jax.process_index() == 0:
        # the wide table of every evaluation goes to a file; the console gets a short summary
        table = console.write_eval_table(result, result.workdir)
        report_to = config.get("logging", {}).get("report_to", ["tensorboard"])
        lines = console.final_summary(result, console.tracked_metrics(config), table,
                                      tensorboard="tensorboard" in report_to)
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
    if result.preempted:
        logging.warning("Stopped at step %d with a checkpoint: re-run the same command to "
                        "resume.", result.final_step)
        return EXIT_PREEMPTED
    return EXIT_OK


def run() -> None:
    """The `jaxtrain` console script and `python -m jaxtrain.main`."""
    flags.mark_flags_as_required([RUN_FLAGS.config.name])
    setup_logging()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run())
