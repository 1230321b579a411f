"""The end of a run, after the engine's loop (:meth:`jaxtrain.api.Trainer.train`): the run report
(:mod:`jaxtrain.report`) and the exports of ``export.at_end`` (:mod:`jaxtrain.export.at_end`).

* The report ``<workdir>/report.png`` is drawn after every run, a preempted or failed one too
  (its curves are what one looks at first); a report that cannot be drawn (no metrics yet) is
  logged, never raised. Process 0 draws it; the environment variable ``JAXTRAIN_REPORT=0``
  skips it (~0.25 CPU-s for 5 panels, ~0.9 s for 16: a test suite of many tiny runs).
* The exports run only when training finished: the last step reached or an early stop, not a
  preemption (``stop_at_step`` included) nor an error. A failed export raises (the checkpoint
  is saved: re-running the same command in the workdir exports again without training)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from jaxtrain.trainer import TrainResult

REPORT_ENV = "JAXTRAIN_REPORT"  # '0': no run report (the test suite's many tiny runs)


def check_exports(config: Any, task: Any) -> tuple[str, ...]:
    """The run's ``export.at_end`` formats, checked before training (a ConfigError names an
    unknown one, or 'hf' for a model without a Hugging Face format); () = none."""
    export = config.get("export") if hasattr(config, "get") else None
    if not export or not export.get("at_end"):
        return ()
    from jaxtrain.export.at_end import check_at_end

    return check_at_end(config, task)


def write_report(workdir: str, title: str | None) -> str | None:
    """Draw ``<workdir>/report.png`` on process 0; its path, or None (another process, or no
    report: logged)."""
    if jax.process_index() != 0 or os.environ.get(REPORT_ENV, "1") == "0":
        return None
    from jaxtrain.report import ReportError
    from jaxtrain.report import write_report as draw

    try:
        return draw(workdir, title=title)
    except ReportError as e:  # nothing logged yet (a run that stopped before its first log)
        logging.info("No run report for %s: %s", workdir, e)
    except Exception as e:  # a report must never fail the run it describes
        logging.warning("No run report for %s: %s: %s", workdir, type(e).__name__, e)
    return None


def finished(result: TrainResult, steps: int) -> bool:
    """Training ended as planned: `steps` reached or stopped early (not preempted)."""
    return not result.preempted and (result.stopped_early or result.final_step >= steps)


def finish(trainer: Any, result: TrainResult, formats: Sequence[str]) -> TrainResult:
    """The report, then (training finished) the exports: `result` with `report_path` and
    `exports` set."""
    last = result.final_step
    title = f"{result.run_name or trainer.workdir.rstrip('/').rsplit('/', 1)[-1]} (step {last})"
    result.report_path = write_report(trainer.workdir, title)
    if result.report_path:
        logging.info("Run report: %s", result.report_path)
    if formats and finished(result, trainer.config.train.steps):
        from jaxtrain.export.at_end import export_at_end, export_checkpoint

        which = trainer.config.export.checkpoint
        checkpoint = export_checkpoint(result.best_checkpoint_path, result.checkpoint_paths,
                                       which)
        if checkpoint is None:
            logging.warning("export.at_end: the run kept no checkpoint to export.")
        else:
            result.exports = export_at_end(trainer.workdir, formats, checkpoint)
            chosen = "best" if checkpoint == result.best_checkpoint_path else "last"
            logging.info("export.at_end: the %s checkpoint (%s) as %s", chosen, checkpoint,
                         ", ".join(f"{f} -> {p}" for f, p in result.exports.items()))
    elif formats:
        logging.info("export.at_end skipped: training did not finish (step %d of %d%s).",
                     last, trainer.config.train.steps,
                     ", preempted" if result.preempted else "")
    return result
