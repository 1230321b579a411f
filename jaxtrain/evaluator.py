"""What an evaluator is: one named evaluation of a run, with its own data, cadence and metric
prefix (big_vision's ``config.evals``).

    c.evals.retrieval = eval_config("retrieval")            # every eval.every steps
    c.evals.zero_shot = eval_config("zero_shot", every=0)   # only at the end
    (eval_config: jaxtrain.evaluators, where the built-in types are registered)

A run's metrics from evaluator ``<name>`` are ``eval/<name>/<metric>``; `checkpoint.best_metric`
and `eval.early_stop_metric` may name any of them. An evaluator is one of two kinds:

- batched (most): the engine runs it in three parts: host batches (:meth:`Evaluator.batches`,
  each with a boolean ``valid`` marking real rows), a pure jitted :meth:`Evaluator.step` on each
  global batch, and host-side :meth:`Evaluator.metrics` over the concatenated valid rows of every
  batch (gathered from all hosts). Outputs must be finite: any NaN/Inf makes every metric of
  the evaluator NaN (a diverged model never scores well).
- its own loop (:class:`LoopEvaluator`, e.g. decoding text with a KV cache): the engine calls
  :meth:`LoopEvaluator.run` with the model's params and an :class:`EvalContext` (the mesh, the
  step, the workdir and the metric writer, for samples).

Before anything compiles the engine calls :meth:`Evaluator.prepare`, so missing or bad data is
reported at the start of a run, not at its first evaluation.

Evaluator types are registered by name (`jaxtrain.evaluators.register_evaluator`); this module
is the engine's side and imports no task, model or data module.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.config import Rule, apply_rules, cadence, check_keys, check_types
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

    def prepare(self, *, batch_size: int, process_index: int, process_count: int) -> None:
        """Load and check this evaluator's data before anything compiles (raise a ConfigError
        naming the problem). Default: read the first host batch; none at all is an error."""
        batches = self.batches(batch_size=batch_size, process_index=process_index,
                               process_count=process_count)
        if next(iter(batches), None) is None:
            raise ConfigError(
                f"The data of evaluator {self.name!r} has no rows: give it a dataset with rows "
                f"(evals.{self.name}.source, or the task's held-out split), or delete "
                f"evals.{self.name}.")

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


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What a :class:`LoopEvaluator` sees besides the params."""

    mesh: Any  # the run's jax.sharding.Mesh
    step: int  # the train step being evaluated
    workdir: str  # the run's directory (for samples and other files it writes)
    writer: Any  # the run's jaxtrain.writers.MetricWriter (write_text for samples), or None
    batch_size: int  # the evaluator's global batch (its own, else eval.batch_size)


class LoopEvaluator(Evaluator):
    """An evaluator that runs its own loop (decoding, say) instead of batches -> step ->
    metrics: implement :meth:`run` (and :meth:`prepare`, to check its data up front)."""

    @abc.abstractmethod
    def run(self, params: Any, frozen: Any, context: EvalContext) -> dict[str, float]:
        """The metrics of `params` (the model's, `Task.eval_params`; sharded over
        `context.mesh`). Every process calls it; process 0 writes files."""

    @abc.abstractmethod
    def prepare(self, *, batch_size: int, process_index: int, process_count: int) -> None:
        """Load and check the data before anything compiles."""

    # the batched protocol is not this kind's
    batches = step = metrics = None  # type: ignore[assignment]


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
                                      "every": cadence(COMMON_KEYS["every"]),  # or 'epoch'
                                      **cls.default_config().to_dict()})


def resolved_config(name: str, given: ml_collections.ConfigDict,
                    cls: type[Evaluator]) -> ml_collections.ConfigDict:
    """`evals.<name>` checked against `cls`'s keys (unknown keys and wrong types are errors
    that name `evals.<name>.<key>`), with the type's defaults filled in."""
    schema = evaluator_schema(cls)
    prefix = f"evals.{name}."
    check_keys(given, schema, prefix=prefix)
    check_types(given, schema, prefix=prefix)
    merged = evaluator_schema(cls)  # a fresh copy (its `every` may become 'epoch')
    merged.update(given.to_dict())
    rules = [(prefix + "every", lambda v: v == "epoch" or v >= -1,
              "must be >= -1 (-1 = eval.every, 0 = only at the end) or 'epoch'"),
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
