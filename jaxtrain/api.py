"""The library's front door: a config and a workdir in, a trained run out.

    import jaxtrain
    result = jaxtrain.train(config, "runs/mine")        # or jaxtrain.Trainer(config, ...).train()

This is where names become objects: the task from `config.task` (the task registry), LoRA
around it when `lora.rank > 0`, and the evaluators from `config.evals` (the evaluator registry).
The engine (:class:`jaxtrain.trainer.Trainer`) then gets them built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from jaxtrain import trainer as engine
from jaxtrain.config import validate
from jaxtrain.data import in_memory
from jaxtrain.evaluators import build_evaluators
from jaxtrain.hooks import Hook
from jaxtrain.lora import LoraTask
from jaxtrain.task import Task
from jaxtrain.tasks import get_task


def build_task(config: ml_collections.ConfigDict,
               task: type[Task] | None = None) -> tuple[Task, Task]:
    """(the task the trainer runs, the model's own task) for a config: `task` or the one
    `config.task` names, validated against its defaults; wrapped in LoRA when `lora.rank > 0`
    (the two are then different: evaluators run on the model's own)."""
    task_cls = task or get_task(config.task)
    validate(config, task_cls.schema(config), task_cls.config_rules())
    inner = task_cls(config)
    return (LoraTask(inner) if config.lora.rank else inner), inner


class Trainer(engine.Trainer):
    """:class:`jaxtrain.trainer.Trainer` built from names: ``Trainer(config, workdir)``.

    `task` (a Task subclass) replaces the registry's lookup of `config.task`; `devices`,
    `schedule` and `hooks` are the engine trainer's.

    `train_data` / `eval_data`: rows in memory (a ``datasets.Dataset``, a list of dicts or a
    pandas DataFrame, in the columns of the task's files) instead of the config's data source
    and its held-out split (:mod:`jaxtrain.data.in_memory`: read and checked as a file of the
    same rows; `self.config` names the in-memory source). `init_params`: a params tree
    (nested dicts of arrays, e.g. ``result.final_state.params`` or a converted model) to start
    from instead of the random init (shapes checked as ``init_from``'s); not used when the run
    resumes from a checkpoint."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | None = None,
        *,
        task: type[Task] | None = None,
        devices: list[jax.Device] | None = None,
        schedule: optax.Schedule | None = None,
        hooks: Sequence[Hook] = (),
        train_data: Any = None,
        eval_data: Any = None,
        init_params: Any = None,
    ):
        config, self.in_memory_data = in_memory.bind(config, train_data, eval_data)
        run_task, model_task = build_task(config, task)
        if self.in_memory_data is not None:  # registered while the trainer or a task holds it
            run_task.in_memory_data = model_task.in_memory_data = self.in_memory_data
        super().__init__(config, workdir, task=run_task,
                         evaluators=build_evaluators(config, model_task), devices=devices,
                         schedule=schedule, hooks=hooks, init_params=init_params)

    def train(self, stop_at_step: int | None = None) -> engine.TrainResult:
        """The engine's `train()`, then the end of the run (:mod:`jaxtrain.run_end`): the run
        report `<workdir>/report.png` (every run, preempted or failed ones too;
        `result.report_path`) and, when training finished, the `export.at_end` formats of the
        `export.checkpoint` checkpoint in `<workdir>/export/<format>` (`result.exports`). An
        unknown export format is a ConfigError before training starts."""
        from jaxtrain import run_end

        formats = run_end.check_exports(self.config, self.task)
        try:
            result = super().train(stop_at_step)
        except BaseException:
            run_end.write_report(self.workdir, None)  # the curves of a run that failed
            raise
        return run_end.finish(self, result, formats)


def train(config: ml_collections.ConfigDict, workdir: str | None = None,
          **kwargs: Any) -> engine.TrainResult:
    """Build a Trainer and run it (resuming from the workdir's latest checkpoint). Returns a
    TrainResult. `kwargs`: :class:`Trainer`'s (``train_data=``, ``eval_data=``,
    ``init_params=``, ``task=``, ``devices=``, ``hooks=``, ...)."""
    return Trainer(config, workdir, **kwargs).train()
