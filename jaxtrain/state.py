"""The train state: one pytree, nothing else, so the step stays a pure function."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """`step` counts updates; `rng` is the run's base key (a step's key is `fold_in(rng, step)`,
    so a resumed run draws the same randomness); `frozen` holds what is not trained (a teacher, a
    reference model, LoRA base weights)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any
