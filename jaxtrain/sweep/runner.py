"""Running a sweep: one worker's trials, one after another, each an ordinary training run.

    result = run_sweep(config, "sweeps/clip_lr.py", "runs/sweep_clip_lr")   # SweepResult

Each trial trains ``jaxtrain.Trainer(config with the trial's values, <workdir>/trial_<NNNN>/,
hooks=[TrialReportHook])``, resuming its own latest checkpoint; its `trial.json` records params,
status, value, best step and error. Workers split grid / random trials by index (I, I+N, ...);
bayes workers ask the shared Optuna study (:mod:`jaxtrain.sweep.bayes`). A failed trial is a
result and the sweep goes on, until :data:`REPEATED_FAILURES` in a row fail with the same error
or a checkpoint cannot be written.

``timeout`` (seconds, or ``'2h'``, ``'30m'``, ``'1h30m'``, ``'45s'``) is a wall-clock budget
for this call: no trial starts after it, and the trial in flight stops at the first step that
ends after it, with a checkpoint, as a preemption would. That trial's status is ``timeout``
(not finished: re-running the sweep resumes it there); the results table and results.csv are
written as after any trial. Each trial's run name is ``<sweep>/trial_<NNNN>`` (``<sweep>`` =
the config's ``run_name`` or the sweep workdir's folder name), and the W&B group the sweep's
name (unless ``logging.wandb_group`` is set), so trackers show the trials together.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import re
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from jaxtrain.api import Trainer
from jaxtrain.checkpoint import CheckpointSaveError
from jaxtrain.sweep.bayes import BayesStudy
from jaxtrain.sweep.report import TrialReportHook
from jaxtrain.sweep.results import (
    FINISHED,
    SweepResult,
    best_value,
    load_results,
    read_json,
    trial_dir,
    write_json,
)
from jaxtrain.sweep.space import Sweep, apply_params, format_params, trial_plan
from jaxtrain.sweep.spec import SweepError, load_sweep
from jaxtrain.sweep.workdir import record_sweep
from jaxtrain.task import Task
from jaxtrain.tasks import get_task
from jaxtrain.trackers import run_name

REPEATED_FAILURES = 3  # this many trials in a row failing with one same error stop the sweep


class RepeatedFailureError(RuntimeError):
    """Several trials in a row failed with the same error: a problem of the task or the setup
    (a bug, a missing file), not of the hyperparameters. Fix it and re-run with retry_failed."""


@dataclasses.dataclass
class Outcome:
    """How one call of a trial ended: its status (`running` when preempted) and value."""

    status: str  # FINISHED's, `running` (preempted) or `timeout` (stopped at the deadline)
    value: float | None = None
    best_step: int | None = None
    preempted: bool = False


class TrialRunner:
    """Runs one worker's trials; the grid/random loop (:meth:`run_indexed`) and the bayes loop
    (:meth:`run_bayes`) share it."""

    def __init__(self, config: ml_collections.ConfigDict, sweep: Sweep, workdir: str,
                 worker: int, num_workers: int, task: type[Task] | None,
                 devices: list[jax.Device] | None, max_trials: int | None, retry_failed: bool,
                 deadline: float | None = None):
        self.config, self.sweep, self.workdir = config, sweep, workdir
        self.worker, self.num_workers = worker, num_workers
        self.task, self.devices, self.max_trials = task, devices, max_trials
        self.retry_failed = retry_failed
        self.ran: list[int] = []
        self.errors: list[str] = []  # of the trials that failed in a row, most recent last
        self.preempted = False
        self.deadline = deadline  # time.monotonic() of the --timeout, or None
        self.timed_out = False  # the deadline stopped a trial, or kept one from starting
        self.name = run_name(config, workdir)  # the sweep's; trials are <name>/trial_<NNNN>

    def budget_left(self) -> bool:
        """Not preempted, not past the deadline, and not at `max_trials` trials in this
        call."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True
        return not self.preempted and not self.timed_out and (
            self.max_trials is None or len(self.ran) < self.max_trials)

    def trial_config(self, index: int, params: dict[str, Any]) -> ml_collections.ConfigDict:
        """The base config with the trial's values, its run name and tracker group."""
        cfg = apply_params(self.config, params)
        with cfg.unlocked():
            if "run_name" in cfg:
                cfg.run_name = f"{self.name}/{os.path.basename(trial_dir('', index))}"
            if "logging" in cfg and not cfg.logging.get("wandb_group"):
                cfg.logging.wandb_group = self.name
        return cfg

    def run_trial(self, index: int, params: dict[str, Any],
                  report: Callable[[float, int], None] | None = None) -> Outcome:
        """Train one trial in its own workdir (resuming its checkpoint), record trial.json.
        `report(value, step)` gets the metric at each evaluation (:class:`TrialReportHook`)."""
        tdir = trial_dir(self.workdir, index)
        os.makedirs(tdir, exist_ok=True)
        path = os.path.join(tdir, "trial.json")
        previous = read_json(path) or {}
        record = {"index": index, "worker": self.worker, "status": "running", "params": params,
                  "metric": self.sweep.metric, "value": None, "best_step": None,
                  "final_step": None, "error": None,
                  "wall_seconds": previous.get("wall_seconds", 0.0),
                  "started_at": previous.get("started_at") or _now()}
        write_json(path, record)
        self.ran.append(index)
        logging.info("Sweep: trial %d (worker %d/%d, %s): %s", index, self.worker,
                     self.num_workers, "resuming" if previous else "starting",
                     format_params(params))
        t0 = time.perf_counter()
        outcome = Outcome("failed")
        hook = TrialReportHook(self.sweep.metric, self.sweep.mode, path, record, report,
                               deadline=self.deadline)
        try:
            cfg = self.trial_config(index, params)
            with open(os.path.join(tdir, "config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=2))
            result = Trainer(cfg, tdir, task=self.task, devices=self.devices,
                             hooks=[hook]).train()
        except CheckpointSaveError:
            raise  # the disk, not the trial: stop; a re-run resumes this trial
        except Exception as e:  # noqa: BLE001 - a trial's failure is a result of the sweep
            record["error"] = f"{type(e).__name__}: {e}"
            logging.error("Sweep: trial %d failed: %s\n%s", index, record["error"],
                          traceback.format_exc())
        else:
            if result.preempted:
                self.preempted = True
                outcome = Outcome("running", preempted=True)
            elif hook.timed_out:
                self.timed_out = True
                record["final_step"] = result.final_step
                outcome = Outcome("timeout")
                logging.info("Sweep: trial %d stopped at step %d by the sweep's timeout, with a "
                             "checkpoint; re-running the sweep resumes it.", index,
                             result.final_step)
            else:
                value, step = self.score(result.metrics, index)
                record.update(final_step=result.final_step, value=value, best_step=step)
                if value is None:
                    record["error"] = f"{self.sweep.metric} was never finite in the evaluations"
                    outcome = Outcome("failed")
                else:
                    status = "early_stopped" if result.stopped_early else "complete"
                    outcome = Outcome(status, value, step)
        finally:
            result = None  # drop the final state, then free arrays held in reference cycles
            gc.collect()
        record["status"] = outcome.status
        record["wall_seconds"] = record["wall_seconds"] + time.perf_counter() - t0
        if outcome.status in FINISHED:
            record["finished_at"] = _now()
        write_json(path, record)
        logging.info("Sweep: trial %d %s%s", index, outcome.status,
                     f": {self.sweep.metric} = {outcome.value:.4g} (step {outcome.best_step})"
                     if outcome.value is not None else "")
        self.write_results()
        self.errors = [*self.errors, record["error"]] if outcome.status == "failed" else []
        return outcome

    def check_failures(self) -> None:
        """RepeatedFailureError when the last REPEATED_FAILURES trials failed alike."""
        last = self.errors[-REPEATED_FAILURES:]
        if len(last) == REPEATED_FAILURES and len(set(last)) == 1:
            raise RepeatedFailureError(
                f"The last {REPEATED_FAILURES} trials, with different values, all failed with "
                f"the same error: {last[0]} That is a problem of the task or the setup, not of "
                "the hyperparameters (the traceback is in the log above): fix it, then re-run "
                "the same command with --retry_failed to run the failed trials again.")

    def done(self, record: dict | None) -> bool:
        """Skip this trial: it finished (and is not a failure to retry)."""
        status = (record or {}).get("status")
        return status in FINISHED and not (self.retry_failed and status == "failed")

    def score(self, records: list[dict], index: int) -> tuple[float | None, int | None]:
        """Best (value, step) of the metric over the run's eval records; a SweepError when the
        run evaluates but never records the metric (the sweep file names the wrong one)."""
        metric = self.sweep.metric
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        if evals and not any(metric in r for r in evals):
            available = sorted({k for r in evals for k in r if k.startswith("eval/")})
            raise SweepError(
                f"{self.sweep.source}: metric {metric!r} is not recorded by this task (trial "
                f"{index} evaluated {available}). Set 'metric' to one of them and re-run: "
                "the trial resumes without training again.")
        return best_value(evals, metric, self.sweep.mode)

    def write_results(self) -> None:
        """Rebuild results.csv from every trial.json (all workers')."""
        try:
            load_results(self.workdir)
        except OSError as e:  # a results file is a convenience: never stop the sweep for it
            logging.warning("Sweep: could not write results.csv: %s", e)

    # ---------------------------------------------------------------- grid / random

    def run_indexed(self) -> None:
        """Grid / random: this worker's trials by index, skipping the finished ones."""
        for index, params in trial_plan(self.sweep, self.worker, self.num_workers):
            record = read_json(os.path.join(trial_dir(self.workdir, index), "trial.json"))
            if self.done(record):
                continue
            if not self.budget_left():
                return
            self.run_trial(index, params)
            self.check_failures()

    # ---------------------------------------------------------------- bayes

    def run_bayes(self) -> None:
        """Bayes: resume this worker's trials an interruption left running, then ask the study
        for new ones until `num_trials` are taken."""
        study = BayesStudy(self.sweep, self.workdir, self.worker)
        # this worker's trials left running by an interrupted run: resume (or just tell)
        for frozen in study.left_running():
            record = read_json(os.path.join(trial_dir(self.workdir, frozen.number),
                                            "trial.json"))
            owner = record["worker"] if record else frozen.user_attrs.get("worker", 0)
            if owner % self.num_workers != self.worker:
                continue
            if record and record.get("status") in FINISHED:  # crashed before telling
                study.tell(frozen.number, record["status"], record.get("value"))
                continue
            if not self.budget_left():
                return
            self._run_study_trial(study, study.resume(frozen, self.worker))
        while self.budget_left():
            trial = study.ask(self.worker, self.retry_failed)
            if trial is None:
                break
            self._run_study_trial(study, trial)

    def _run_study_trial(self, study: BayesStudy, trial: Any) -> None:
        outcome = self.run_trial(trial.number, study.suggest(trial), report=trial.report)
        study.tell(trial.number, outcome.status, outcome.value)
        self.check_failures()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def run_sweep(
    config: ml_collections.ConfigDict,
    sweep: str | os.PathLike | Mapping | Sweep,
    workdir: str | os.PathLike,
    *,
    worker: int = 0,
    num_workers: int = 1,
    task: type[Task] | None = None,
    devices: list[jax.Device] | None = None,
    max_trials: int | None = None,
    retry_failed: bool = False,
    timeout: float | str | None = None,
) -> SweepResult:
    """Run (or continue) this worker's share of a sweep; return every trial's result so far.

    `sweep` is a sweep file path, a dict in the sweep-file format, or a :class:`Sweep`. Trials
    run one after another in this process, each a normal Trainer run in
    `<workdir>/trial_<NNNN>/` (`task` and `devices` go to the Trainer). `max_trials` stops after
    that many trials (started or resumed) in this call; re-running continues the sweep.
    `retry_failed` runs failed trials again (grid / random: in their directories, resuming any
    checkpoint; bayes: new trials are asked in place of the failed ones). `timeout` (seconds,
    or '2h' / '30m' / '1h30m' / '45s') bounds this call's wall-clock time: no trial starts after
    it and the one in flight stops with a checkpoint (status `timeout`, resumed by a re-run);
    the result's `timed_out` says so. Raises RepeatedFailureError when 3 trials in a row fail
    with the same error.
    """
    seconds = parse_timeout(timeout)
    deadline = None if seconds is None else time.monotonic() + seconds
    if not (0 <= worker < num_workers):
        raise SweepError(f"--worker must be in [0, --num_workers={num_workers}); got {worker}.")
    task or get_task(config.task)  # an unknown task fails here, not once per trial
    spec = load_sweep(sweep, config, task=task)
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    record_sweep(workdir, spec, config)
    runner = TrialRunner(config, spec, workdir, worker, num_workers, task, devices, max_trials,
                         retry_failed, deadline)
    logging.info("Sweep %s (%s, %d trials, %s %s) in %s: worker %d of %d.", spec.source,
                 spec.method, spec.size, spec.mode, spec.metric, workdir, worker, num_workers)
    if spec.method == "bayes":
        runner.run_bayes()
    else:
        runner.run_indexed()
    result = load_results(workdir)
    result.ran, result.preempted, result.timed_out = runner.ran, runner.preempted, \
        runner.timed_out
    return result


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_timeout(value: float | str | None) -> float | None:
    """Seconds from `value`: a number (seconds), or a duration such as '2h', '30m', '1h30m',
    '90s', '1.5h'; None or '' = no timeout. Anything else, or <= 0, is a SweepError."""
    if value is None or value == "":
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d*)?", text):
            seconds = float(text)
        elif re.fullmatch(r"(\d+(\.\d*)?[hms])+", text):
            seconds = sum(float(n) * _UNITS[u] for n, _, u in
                          re.findall(r"(\d+(\.\d*)?)([hms])", text))
    if seconds is None or not seconds > 0:
        raise SweepError(
            f"--timeout must be a positive number of seconds or a duration like '2h', '30m', "
            f"'1h30m' or '90s'; got {value!r}.")
    return seconds


def workers_from_env() -> tuple[int, int]:
    """(worker, num_workers) from SLURM_PROCID / SLURM_NTASKS, else (0, 1)."""
    env = os.environ
    return int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))
