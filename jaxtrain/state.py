"""The train state: one pytree, nothing else, so the step stays a pure function."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """`step` counts updates; `rng` is the run's base key (a step's key is `fold_in(rng, step)`,
    so a resumed run draws the same randomness); `frozen` holds what is not trained (a teacher, a
    reference model, LoRA base weights); `loss_scale` is dynamic loss scaling's state
    (:mod:`jaxtrain.loss_scale`: {"scale", "good_steps"}), None when it is off, so the tree
    (and a checkpoint) is then the same as without the field."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any
    loss_scale: Any = None
