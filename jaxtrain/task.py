"""What a task is: everything specific to one kind of training, and nothing else.

The trainer only ever talks to a task through this interface (and to its evaluators through
:class:`jaxtrain.evaluator.Evaluator`). Tasks are registered by name in `jaxtrain.tasks`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxtrain.config import Rule


def params_key(seed: int) -> jax.Array:
    """The key the trainer initialises params with (`Trainer._keys()["params"]`), for tasks
    whose frozen part must start equal to the params (a DPO reference, a LoRA base)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0)


class Task(abc.ABC):
    """A kind of training. Subclasses set `name` and implement the abstract methods."""

    name: str = ""
    # True: the trainer activates the mesh's logical-axis rules while tracing the step, so the
    # model's activation sharding constraints apply (its parameters must keep their full shapes;
    # flax's DenseGeneral flattens kernels and breaks under active rules).
    activation_sharding: bool = False

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @classmethod
    @abc.abstractmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The full default config (engine defaults + this task's `model`, `data` and its
        default `evals`)."""

    @classmethod
    def schema(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The keys, types and defaults `config` is checked against: :meth:`default_config`,
        which a task may fit to the config (the `model` keys of the model family it names)."""
        return cls.default_config()

    @classmethod
    def config_rules(cls) -> list[Rule]:
        """Extra (key, predicate, rule text) checks on the task's own config keys."""
        return []

    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> Any:
        """Parameters, boxed with logical axis names (`nn.with_logical_partitioning`)."""

    def init_frozen(self, rng: jax.Array) -> Any:
        """What is not trained but the loss needs (boxed like params). Default: nothing."""
        return {}

    def num_train_examples(self) -> int | None:
        """Training rows in one epoch, over all hosts (after packing / filtering: what the
        train iterator yields per pass), for `train.epochs`; None = unknown (streaming data).
        An epoch is then `num_train_examples / train.batch_size` steps."""
        return None

    def pretrained(self) -> dict[str, Any]:
        """Weights to start from instead of the random init, as host arrays: {"params": ...,
        "frozen": ...} (either may be absent), nested like the init; leaves left out keep their
        init, a leaf the init lacks or of another shape is an error. Loaded outside jit (never
        baked into the compiled program), only on a fresh start, never on resume."""
        return {}

    @abc.abstractmethod
    def loss_fn(
        self, params: Any, batch: dict, rng: jax.Array, frozen: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure: (scalar loss, scalar metrics). Jitted by the trainer over the global batch."""

    @abc.abstractmethod
    def train_iterator(
        self, *, seed: int, batch_size: int, process_index: int, process_count: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless iterator of host-local batches (`batch_size` is per host). It must have
        `get_state()` / `set_state()` (a grain iterator) so a resumed run sees the same data."""

    def heldout_batches(
        self, *, batch_size: int, process_index: int, process_count: int, source: str = ""
    ) -> Iterable[dict[str, np.ndarray]]:
        """Host-local batches of the task's held-out split (every one full: the last is padded
        and a boolean ``valid`` marks real rows), for the evaluators that read it. `source` = ""
        is the split the task's `data` config holds out; else a dataset to read whole."""
        raise TypeError(f"The {self.name!r} task has no held-out split to evaluate on.")

    def eval_params(self, params: Any, frozen: Any) -> tuple[Any, Any]:
        """Pure: the (params, frozen) evaluators see: the model's own (the LoRA wrapper merges
        its adapters here). Default: as trained."""
        return params, frozen

    def step_tokens(self, batch: dict[str, jax.ShapeDtypeStruct]) -> int:
        """Tokens in one global batch (for tokens/s); 0 = not a token model. Shapes only."""
        return 0

    def model_flops_per_step(self, batch: dict[str, jax.ShapeDtypeStruct]) -> float:
        """Model FLOPs (forward + backward) of one global batch by the task's documented
        formula, for MFU; 0 = use XLA's count of the compiled step. Shapes only."""
        return 0.0

    def grad_fn(self, mesh, full_params=None):
        """A task's own (params, batch, rng, frozen) -> (loss, metrics, grads), or None for the
        trainer's default `jax.value_and_grad(loss_fn)` (the contrastive task's gradient cache
        overrides it). `full_params(params, frozen, rng)` maps the trained params to the model's
        (the LoRA wrapper passes its merge); None = they are the model's."""
        return None

    def inference_inputs(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of the inputs of :meth:`inference` for `batch_size` rows (for `jax.export`)."""
        raise TypeError(f"The {self.name!r} task has no inference function to export.")

    def inference(self, params: Any, frozen: Any, inputs: dict[str, jax.Array]) -> dict:
        """Pure: the trained model's outputs for `inputs` (what an exported model computes)."""
        raise TypeError(f"The {self.name!r} task has no inference function to export.")
