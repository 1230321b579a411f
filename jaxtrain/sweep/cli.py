"""`python -m jaxtrain.sweep`: its flags, and what it does with their values.

    python -m jaxtrain.sweep --config=configs/clip.py:runlocal --sweep=sweeps/clip_lr.py
        [--workdir=runs/sweep_clip_lr] [--worker=I --num_workers=N] [--max_trials=K]
        [--retry_failed] [--timeout=2h] [--config.KEY=VALUE ...]
    python -m jaxtrain.sweep --workdir=runs/sweep_clip_lr --results     # the table, no training

Besides its own flags it takes :mod:`jaxtrain.cli`'s run flags. Default workdir:
`runs/sweep_<sweep file name>`. `--timeout` bounds the call's wall-clock time (no trial starts
after it; the one in flight stops with a checkpoint, status `timeout`; exit 0, re-run to
continue). Exit codes (:mod:`jaxtrain.cli`'s): 0 done (or trials left to
other workers / a later call); 2 a bad config or sweep file; 3 every trial failed, the same error
three times in a row, or a checkpoint could not be written; 42 preempted (re-run to continue).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import app, flags, logging

from jaxtrain import cli
from jaxtrain.sweep.results import FINISHED, load_results
from jaxtrain.sweep.runner import RepeatedFailureError, run_sweep, workers_from_env
from jaxtrain.sweep.space import format_params

# The flags defined here belong to `python -m jaxtrain.sweep`'s module (its `--help` lists them).
flags.disclaim_key_flags()


def _define_flags() -> dict[str, Any]:
    """The sweep's own flags (defined by :func:`run` only, so importing this module defines
    none)."""
    return {
        "sweep": flags.DEFINE_string("sweep", None, "Sweep file with get_sweep(), e.g. "
                                     "sweeps/clip_lr.py."),
        "worker": flags.DEFINE_integer("worker", None, "This worker's index in [0, "
                                       "--num_workers); default $SLURM_PROCID or 0."),
        "num_workers": flags.DEFINE_integer("num_workers", None, "Workers sharing the sweep; "
                                            "default $SLURM_NTASKS or 1."),
        "max_trials": flags.DEFINE_integer("max_trials", None, "Run at most this many trials "
                                           "in this call."),
        "retry_failed": flags.DEFINE_bool("retry_failed", False, "Run failed trials again "
                                          "(after fixing a cause that was not the "
                                          "hyperparameters)."),
        "results": flags.DEFINE_bool("results", False, "Print the results table of --workdir "
                                     "and exit."),
        "timeout": flags.DEFINE_string("timeout", None, "Wall-clock budget of this call: "
                                       "seconds, or '2h', '30m', '1h30m'. No trial starts "
                                       "after it; the one in flight stops with a checkpoint "
                                       "(re-run to continue)."),
    }


def default_workdir(sweep_file: str) -> str:
    """`runs/sweep_<sweep file name>`."""
    return os.path.join("runs", "sweep_" + os.path.splitext(os.path.basename(sweep_file))[0])


def main(argv: list[str], run_flags: cli.RunFlags, own: dict[str, Any]) -> int:
    """The sweep command, from parsed flags; returns the exit code."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = {name: holder.value for name, holder in own.items()}
    workdir = run_flags.workdir.value
    if workdir is None and f["sweep"]:
        workdir = default_workdir(f["sweep"])
    try:
        if f["results"]:
            if workdir is None:
                raise app.UsageError("--results needs --workdir (or --sweep) to find the sweep.")
            sys.stdout.write(load_results(workdir).table() + "\n")
            return cli.EXIT_OK
        if run_flags.config.value is None or not f["sweep"]:
            raise app.UsageError("A sweep needs --config=CONFIG_FILE and --sweep=SWEEP_FILE.")
        env_worker, env_workers = workers_from_env()
        worker = env_worker if f["worker"] is None else f["worker"]
        num_workers = env_workers if f["num_workers"] is None else f["num_workers"]
        result = run_sweep(run_flags.config.value, f["sweep"], workdir, worker=worker,
                           num_workers=num_workers, max_trials=f["max_trials"],
                           retry_failed=f["retry_failed"], timeout=f["timeout"])
    except RepeatedFailureError as e:
        logging.error("%s: %s", type(e).__name__, e)
        return cli.EXIT_RUN_FAILED
    except (Exception, KeyboardInterrupt) as e:  # ConfigError (SweepError too): exit 2, ...
        code = cli.failure_exit_code(e)
        if code is None:
            raise
        return code
    logging.info("Sweep results (%s, %s; %s):\n%s", result.metric, result.mode,
                 os.path.join(result.workdir, "results.csv"), result.table())
    if result.preempted:
        return cli.EXIT_PREEMPTED
    if result.trials and all(t.status == "failed" for t in result.trials):
        logging.error("Every trial failed; the first: %s. Fix the cause, then re-run with "
                      "--retry_failed.", result.trials[0].error)
        return cli.EXIT_RUN_FAILED
    if result.timed_out:
        stopped = [t.index for t in result.trials if t.status == "timeout"]
        left = result.size - len([t for t in result.trials if t.status in FINISHED])
        logging.info("Sweep stopped at its --timeout=%s: %s; %d trial(s) not finished. Re-run "
                     "the same command to continue.", f["timeout"],
                     f"trial(s) {stopped} stopped with a checkpoint" if stopped else
                     "no trial was stopped mid-run", left)
    elif not result.finished:
        logging.info("Trials still to run or running (other workers, or --max_trials): re-run "
                     "the same command to continue.")
    if result.best is not None:
        logging.info("Best: trial %d, %s = %.4g (step %s): %s", result.best.index,
                     result.metric, result.best.value, result.best.best_step,
                     format_params(result.best.params))
    return cli.EXIT_OK


def run() -> None:
    """`python -m jaxtrain.sweep`."""
    run_flags, own = cli.define_run_flags(), _define_flags()
    cli.setup_logging()
    app.run(lambda argv: main(argv, run_flags, own), flags_parser=cli.parse_flags)
