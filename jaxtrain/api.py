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
    `schedule` and `hooks` are the engine trainer's."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | None = None,
        *,
        task: type[Task] | None = None,
        devices: list[jax.Device] | None = None,
        schedule: optax.Schedule | None = None,
        hooks: Sequence[Hook] = (),
    ):
        run_task, model_task = build_task(config, task)
        super().__init__(config, workdir, task=run_task,
                         evaluators=build_evaluators(config, model_task), devices=devices,
                         schedule=schedule, hooks=hooks)


def train(config: ml_collections.ConfigDict, workdir: str | None = None,
          **kwargs: Any) -> engine.TrainResult:
    """Build a Trainer and run it (resuming from the workdir's latest checkpoint). Returns a
    TrainResult."""
    return Trainer(config, workdir, **kwargs).train()
