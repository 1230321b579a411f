"""A sweep trial's reporting, as a hook on its training loop.

    hook = TrialReportHook(sweep.metric, sweep.mode, path, record, report=optuna_trial.report)
    jaxtrain.Trainer(config, trial_dir, hooks=[hook]).train()

At each evaluation that gives the sweep's metric, the hook records the trial's progress in its
`trial.json` (``progress``: the step, the best value so far and its step) and reports the value
at that step to `report` (a bayes trial's :meth:`optuna.trial.Trial.report`: the study's
intermediate values, what Optuna's pruners and dashboards read). The trial's final value and
status are the runner's, from the finished run's records.

With a `deadline` (a :func:`time.monotonic` time: the sweep's ``--timeout``), the first step
that ends after it stops the run as a preemption would: the loop's last step, checkpointed, so a
re-run of the sweep resumes the trial there (`timed_out` tells the runner).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from jaxtrain.hooks import Hook, Loop
from jaxtrain.sweep.results import best_value, write_json


class TrialReportHook(Hook):
    """Records a trial's progress in `record` (written to `path`, its trial.json) and reports
    each evaluation's value of `metric` to `report(value, step)` (optional)."""

    def __init__(self, metric: str, mode: str, path: str, record: dict[str, Any],
                 report: Callable[[float, int], None] | None = None,
                 deadline: float | None = None):
        self.metric, self.mode = metric, mode
        self.path, self.record = path, record
        self.report = report
        self.deadline = deadline
        self.timed_out = False

    def on_start(self, loop: Loop) -> None:
        # a resumed trial: the evaluations before its checkpoint count too
        self.evals = [{"step": r["step"], self.metric: r[self.metric]} for r in loop.records
                      if self.metric in r]
        if self.evals:
            self._record_progress(loop.step)

    def after_step(self, loop: Loop) -> None:
        if self.deadline is not None and not loop.last and time.monotonic() >= self.deadline:
            self.timed_out = True
            loop.request_stop("sweep_timeout")  # the checkpoint hook saves this step
        value = (loop.eval_metrics or {}).get(self.metric)
        if value is None:
            return
        if self.report is not None and math.isfinite(value):
            self.report(float(value), loop.step)
        self.evals.append({"step": loop.step, self.metric: value})
        self._record_progress(loop.step)
        write_json(self.path, self.record)

    def _record_progress(self, step: int) -> None:
        value, best_step = best_value(self.evals, self.metric, self.mode)
        self.record["progress"] = {"step": step, "value": value, "best_step": best_step}
