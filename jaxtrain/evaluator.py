"""What an evaluator is: one named evaluation of a run, with its own data, cadence and metric
prefix (big_vision's ``config.evals``).

    c.evals.retrieval = eval_config("retrieval")            # every eval.every steps
    c.evals.zero_shot = eval_config("zero_shot", every=0)   # only at the end
    (eval_config: jaxtrain.evaluators, where the built-in types are registered)

A run's metrics from evaluator ``<name>`` are ``eval/<name>/<metric>``; `checkpoint.best_metric`
and `eval.early_stop_metric` may name any of them. The engine runs an evaluator in three parts:
host batches (:meth:`Evaluator.batches`, each with a boolean ``valid`` marking real rows), a pure
jitted :meth:`Evaluator.step` on each global batch, and host-side :meth:`Evaluator.metrics` over
the concatenated valid rows of every batch (gathered from all hosts).

Evaluator types are registered by name (`jaxtrain.evaluators.register_evaluator`); this module
is the engine's side and imports no task, model or data module.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.config import Rule, apply_rules, check_keys, check_types
from jaxtrain.errors import ConfigError

# Keys every evaluator has, whatever its type.
COMMON_KEYS = dict(
    type="",  # the registered evaluator type, e.g. 'retrieval'
    every=-1,  # evaluate every this many steps; -1 = eval.every, 0 = only at the end
    batch_size=0,  # global eval batch; 0 = eval.batch_size
)


class Evaluator(abc.ABC):
    """One evaluation. Subclasses set `type`, may add config keys, and implement the three
    abstract methods. `task` is the run's task (an evaluator may call the task methods it
    lists in `requires`)."""

    type: str = ""
    requires: tuple[str, ...] = ()  # task attributes this evaluator uses

    def __init__(self, name: str, config: ml_collections.ConfigDict, task: Any):
        self.name = name
        self.config = config
        self.task = task

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """This type's own keys and their defaults (besides type / every / batch_size)."""
        return ml_collections.ConfigDict()

    @classmethod
    def config_rules(cls, prefix: str) -> list[Rule]:
        """(key, predicate, rule) checks of this type's keys; `prefix` is 'evals.<name>.'."""
        return []

    @abc.abstractmethod
    def batches(
        self, *, batch_size: int, process_index: int, process_count: int
    ) -> Iterable[dict[str, np.ndarray]]:
        """Host-local batches (`batch_size` per host), each with a boolean ``valid``."""

    @abc.abstractmethod
    def step(self, params: Any, batch: dict, frozen: Any) -> Any:
        """Pure, jitted: per-row outputs of one global batch (every leaf has a leading batch
        axis). `params` / `frozen` are the model's (`Task.eval_params`)."""

    @abc.abstractmethod
    def metrics(self, outputs: Any) -> dict[str, float]:
        """Host side: metrics from the valid rows of all batches, concatenated."""


class HeldoutEvaluator(Evaluator):
    """An evaluator of the task's held-out split (`Task.heldout_batches`), or of the dataset
    its `source` key names, read whole."""

    requires = ("heldout_batches",)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        # source: '' = the task's held-out split; else a local file/directory or hub dataset.
        return ml_collections.ConfigDict(dict(source=""))

    def batches(self, *, batch_size, process_index, process_count):
        return self.task.heldout_batches(batch_size=batch_size, process_index=process_index,
                                         process_count=process_count, source=self.config.source)


def evaluator_schema(cls: type[Evaluator]) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**COMMON_KEYS, "type": cls.type,
                                      **cls.default_config().to_dict()})


def resolved_config(name: str, given: ml_collections.ConfigDict,
                    cls: type[Evaluator]) -> ml_collections.ConfigDict:
    """`evals.<name>` checked against `cls`'s keys (unknown keys and wrong types are errors
    that name `evals.<name>.<key>`), with the type's defaults filled in."""
    schema = evaluator_schema(cls)
    prefix = f"evals.{name}."
    check_keys(given, schema, prefix=prefix)
    check_types(given, schema, prefix=prefix)
    merged = ml_collections.ConfigDict(schema.to_dict())
    merged.update(given.to_dict())
    rules = [(prefix + "every", lambda v: v >= -1,
              "must be >= -1 (-1 = eval.every, 0 = only at the end)"),
             (prefix + "batch_size", lambda v: v >= 0, "must be >= 0 (0 = eval.batch_size)"),
             *cls.config_rules(prefix)]
    apply_rules(ml_collections.ConfigDict({"evals": {name: merged.to_dict()}}), rules)
    return merged


def check_requirements(name: str, cls: type[Evaluator], task: Any) -> None:
    missing = [a for a in cls.requires if not hasattr(task, a)]
    if missing:
        raise ConfigError(
            f"evals.{name} (type {cls.type!r}) needs a task with {missing}; the "
            f"{getattr(task, 'name', type(task).__name__)!r} task has none. Remove evals.{name} "
            "or choose an evaluator type this task supports.")
