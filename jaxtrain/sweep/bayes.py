"""A bayes sweep's Optuna study: TPE over a study that worker processes share.

The study lives in ``<workdir>/optuna_journal.log`` (``JournalStorage`` over a
``JournalFileBackend``, so workers on a shared filesystem share it). Trials are numbered in the
order they are asked; a trial is told its value when it finishes, or told failed. Seeded, but not
bit-reproducible across interruptions or worker counts. Only bayes sweeps import Optuna.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxtrain.sweep.space import Sweep
from jaxtrain.sweep.spec import import_optuna

STUDY_NAME = "jaxtrain"
JOURNAL = "optuna_journal.log"


class BayesStudy:
    """The sweep's study, as one worker sees it: ask, tell, and resume its unfinished trials."""

    def __init__(self, sweep: Sweep, workdir: str, worker: int):
        optuna = import_optuna(sweep.source)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState

        self.sweep, self.optuna, self.states = sweep, optuna, TrialState
        self.storage = JournalStorage(JournalFileBackend(os.path.join(workdir, JOURNAL)))
        direction = "maximize" if sweep.mode == "max" else "minimize"
        self.study = optuna.create_study(
            storage=self.storage, study_name=STUDY_NAME, direction=direction, load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=sweep.seed))
        # a fresh seed per (worker, restart): two workers, or a resumed worker, must not draw
        # the same startup trials again
        seed = np.random.SeedSequence([sweep.seed, worker, len(self.study.trials)])
        self.study.sampler = optuna.samplers.TPESampler(
            seed=int(seed.generate_state(1)[0]), n_startup_trials=sweep.startup_trials)

    def left_running(self) -> list[Any]:
        """The trials an interrupted run left running (Optuna FrozenTrials), any worker's."""
        return [t for t in self.study.get_trials(deepcopy=False, states=(self.states.RUNNING,))
                if not t.user_attrs.get("surplus")]

    def resume(self, frozen: Any, worker: int) -> Any:
        """A running trial (from :meth:`left_running`) to run again, by `worker`."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(
            self.storage.get_study_id_from_name(STUDY_NAME), frozen.number)
        trial = self.optuna.trial.Trial(self.study, trial_id)
        trial.set_user_attr("worker", worker)
        return trial

    def ask(self, worker: int, retry_failed: bool) -> Any | None:
        """A new trial for `worker`, or None when the sweep's `num_trials` are taken (failed
        ones not counted with `retry_failed`: new trials replace them)."""
        num_trials = self.sweep.num_trials
        if self._taken(retry_failed) >= num_trials:
            return None
        trial = self.study.ask()
        if self._taken(retry_failed, upto=trial.number) > num_trials:  # another worker was first
            trial.set_user_attr("surplus", True)
            self.study.tell(trial, state=self.states.FAIL)
            return None
        trial.set_user_attr("worker", worker)
        return trial

    def _taken(self, retry_failed: bool, upto: int | None = None) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if not t.user_attrs.get("surplus") and (upto is None or t.number <= upto)
                   and not (retry_failed and t.state == self.states.FAIL))

    def tell(self, number: int, status: str, value: float | None) -> None:
        """Tell the study trial `number`'s outcome (nothing while it is still `running`, or
        stopped by the sweep's `timeout`: a re-run resumes it)."""
        if status in ("running", "timeout"):
            return
        if status == "failed":
            self.study.tell(number, state=self.states.FAIL)
        else:
            self.study.tell(number, value)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's values of every parameter, asked from TPE."""
        out = {}
        for name, spec in self.sweep.parameters.items():
            if spec.values is not None:
                if all(v is None or isinstance(v, bool | int | float | str) for v in spec.values):
                    out[name] = trial.suggest_categorical(name, list(spec.values))
                else:  # Optuna takes primitives only: choose by the value's JSON text
                    choices = {json.dumps(v): v for v in spec.values}
                    out[name] = choices[trial.suggest_categorical(name, list(choices))]
            elif spec.int:
                out[name] = trial.suggest_int(name, spec.min, spec.max, log=spec.log)
            else:
                out[name] = trial.suggest_float(name, spec.min, spec.max, log=spec.log)
        return out
