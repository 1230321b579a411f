"""Epoch arithmetic: `train.epochs` -> steps, and the steps where an epoch ends.

With N training rows per epoch (``Task.num_train_examples()``, over all hosts) and a global
batch of B rows (``train.batch_size``; gradient accumulation splits a batch, it does not change
it), one epoch is N / B steps, not necessarily whole:

    steps(E)          = ceil(E * N / B)                      (train.epochs = E replaces train.steps)
    epoch(step)       = step * B / N                          (epochs done after `step` steps)
    epoch k ends at   ceil(k * N / B),  k = 1, 2, ...         (`every='epoch'` evaluates/saves)

Exact integer arithmetic (no float rounding): step s ends epoch k = floor(s * B / N) iff
k >= 1 and k * N > (s - 1) * B.
"""

from __future__ import annotations

import math
from fractions import Fraction

from jaxtrain.errors import ConfigError

EPOCH = "epoch"  # the `every` value meaning "at the step where each epoch ends"


def steps_for_epochs(epochs: float, examples: int, batch_size: int) -> int:
    """ceil(epochs * examples / batch_size), computed exactly (epochs as its decimal value)."""
    if examples <= 0:
        raise ConfigError(
            f"train.epochs={epochs} needs training data, but the task has {examples} training "
            "examples: check the data config.")
    exact = Fraction(str(epochs)) * examples / batch_size
    return max(1, math.ceil(exact))


def is_epoch_end(step: int, examples: int, batch_size: int) -> bool:
    """Whether `step` (steps done) is ceil(k * examples / batch_size) for some epoch k >= 1."""
    k = step * batch_size // examples
    return k >= 1 and k * examples > (step - 1) * batch_size


def due(every: int | str, step: int, examples: int | None, batch_size: int) -> bool:
    """Whether a cadence `every` (steps, 0 = never, or 'epoch') falls on `step`."""
    if every == EPOCH:
        return examples is not None and is_epoch_end(step, examples, batch_size)
    return bool(every) and step % every == 0


def check_epoch_cadence(key: str, every: int | str, examples: int | None) -> None:
    """`every='epoch'` needs a known dataset size; a ConfigError naming `key` otherwise."""
    if every == EPOCH and examples is None:
        raise ConfigError(
            f"{key}='epoch' needs the number of training examples, which this task's data does "
            f"not know (streaming data); set {key} to a number of steps instead.")
