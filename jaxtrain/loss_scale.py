"""Loss scaling for float16 compute: pure functions of a small state, used by the train step.

float16 holds magnitudes from ~6e-8 (subnormal) to 65504. Small gradients of the activations
underflow to zero in the backward pass. Scaling the loss by S scales every backward value by S
(the chain rule is linear), lifting them into range; the float32 parameter gradients are then
divided by S before the optimizer sees them:

    g = (d(S * loss) / d params) / S

`train.loss_scale` chooses the scale:

* ``'none'``: no scaling (S = 1); the default, and the right choice for float32 and bfloat16
  (bfloat16 has float32's exponent range).
* a number (``'1024'``, as a string: the config key is a string): a fixed S, no adaptation.
  An overflow (non-finite gradients at a finite loss) is then an ordinary non-finite step.
* ``'dynamic'``: S adapts (as apex / torch.amp's GradScaler, jmp's DynamicLossScale). State
  ``{"scale": S, "good_steps": n}`` lives in the TrainState (`loss_scale`), so it is saved in
  checkpoints and continues on resume. Per step, with ``finite(x)`` = no NaN/Inf:

      overflow   = finite(loss) and not finite(g) and S > S_min
      S'         = max(S * 0.5, S_min), n' = 0                    if overflow (update skipped)
      S', n'     = min(S * 2, S_max), 0                           if finite(g) and n + 1 >= N
      S', n'     = S, n + 1                                       if finite(g) otherwise
      S', n'     = S, 0                                           otherwise (a non-finite loss,
                                                                  or an overflow at S_min)

  N = `train.loss_scale_growth_interval`, S_0 = `train.loss_scale_init` (2**15), S_min = 1,
  S_max = 2**24. An overflow step is expected (the scale is probing its ceiling): it is reported
  as `overflow`, not as `nonfinite`, so it never counts toward `train.max_nonfinite_streak` nor
  stops a `train.nonfinite='error'` run. A non-finite loss is not a scaling problem (the forward
  pass itself overflowed or diverged) and stays a non-finite step, as does an overflow at S_min.

With gradient accumulation the whole step uses one S: each microbatch's loss is scaled by it,
the scaled gradients are averaged, then unscaled; an overflow in any microbatch skips the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from jaxtrain.errors import ConfigError

ScaleState = dict[str, jax.Array]  # {"scale": float32 [], "good_steps": int32 []}

MIN_SCALE = 1.0
MAX_SCALE = 2.0**24


@dataclasses.dataclass(frozen=True)
class LossScale:
    """How the step scales the loss: `dynamic` (state in the TrainState) or a fixed `init`."""

    dynamic: bool
    init: float
    growth_interval: int = 2000
    backoff: float = 0.5
    growth: float = 2.0
    min_scale: float = MIN_SCALE
    max_scale: float = MAX_SCALE


def parse(value: Any) -> str | float:
    """`train.loss_scale` -> 'none' | 'dynamic' | a positive float; else a ConfigError."""
    if isinstance(value, str) and value.strip().lower() in ("none", "dynamic"):
        return value.strip().lower()
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not (isinstance(value, str | int | float) and not isinstance(value, bool)
            and 0 < scale < float("inf")):
        raise ConfigError(
            f"Config key 'train.loss_scale' must be 'none', 'dynamic' or a positive number "
            f"(a fixed scale, e.g. '1024'); got {value!r}.")
    return scale


def is_valid(value: Any) -> bool:
    """For the config rules: whether :func:`parse` accepts `value`."""
    try:
        parse(value)
    except ConfigError:
        return False
    return True


def _uses_float16(model_cfg: Mapping | None) -> bool:
    """Any `dtype` key (at any depth) of the model config is 'float16'."""
    if not model_cfg:
        return False
    return any(v == "float16" if k == "dtype" else
               isinstance(v, Mapping) and _uses_float16(v) for k, v in model_cfg.items())


def from_config(train_cfg: Mapping, model_cfg: Mapping | None = None) -> LossScale | None:
    """The step's loss scaling from `train.loss_scale*` (None = off). float16 compute without
    loss scaling is allowed (small models, a loss whose gradients stay in range) but logs a
    warning: gradients below ~6e-8 silently become zero."""
    mode = parse(train_cfg.get("loss_scale", "none"))
    if mode == "none":
        if _uses_float16(model_cfg):
            logging.warning(
                "model.dtype='float16' without loss scaling (train.loss_scale='none'): "
                "gradients smaller than ~6e-8 underflow to zero and the update silently "
                "loses them. Set --config.train.loss_scale=dynamic (or use bfloat16).")
        return None
    interval = int(train_cfg.get("loss_scale_growth_interval", 2000))
    if mode == "dynamic":
        return LossScale(dynamic=True, init=float(train_cfg.get("loss_scale_init", 2.0**15)),
                         growth_interval=interval)
    return LossScale(dynamic=False, init=float(mode), growth_interval=interval)


def init_state(cfg: LossScale | None) -> ScaleState | None:
    """The TrainState's `loss_scale`: {"scale": S_0, "good_steps": 0} when dynamic, else None
    (nothing to carry: the state tree and checkpoints stay as without loss scaling)."""
    if cfg is None or not cfg.dynamic:
        return None
    return {"scale": jnp.asarray(cfg.init, jnp.float32),
            "good_steps": jnp.zeros((), jnp.int32)}


def current(cfg: LossScale, state: ScaleState | None) -> jax.Array:
    """S for this step (float32 scalar): the state's when dynamic, else the fixed one."""
    if cfg.dynamic:
        return state["scale"]
    return jnp.asarray(cfg.init, jnp.float32)


LossFn = Callable[..., tuple[jax.Array, Any]]


def scaled(loss_fn: LossFn, scale: jax.Array) -> LossFn:
    """`loss_fn` with its loss multiplied by `scale` (in float32; the aux metrics unchanged):
    ``(S * loss, metrics)``. Its gradients are S times the true ones."""

    def fn(*args):
        loss, metrics = loss_fn(*args)
        return loss.astype(jnp.float32) * scale, metrics

    return fn


def unscale(tree: Any, scale: jax.Array) -> Any:
    """``x / S`` for every leaf (the scaled loss and gradients back to true values)."""
    inv = 1.0 / scale
    return jax.tree.map(lambda x: (x * inv).astype(x.dtype), tree)


def adjust(cfg: LossScale, state: ScaleState | None, loss_finite: jax.Array,
           grads_finite: jax.Array) -> tuple[ScaleState | None, jax.Array]:
    """(next state, overflow) per the module's rule. `overflow` (bool) is True for a step
    skipped by dynamic scaling (expected); a fixed scale never overflows in this sense."""
    if not cfg.dynamic:
        return state, jnp.zeros((), bool)
    scale, good = state["scale"], state["good_steps"]
    overflow = loss_finite & ~grads_finite & (scale > cfg.min_scale)
    finite = loss_finite & grads_finite
    grow = finite & (good + 1 >= cfg.growth_interval)
    new_scale = jnp.where(overflow, jnp.maximum(scale * cfg.backoff, cfg.min_scale),
                          jnp.where(grow, jnp.minimum(scale * cfg.growth, cfg.max_scale), scale))
    new_good = jnp.where(finite & ~grow, good + 1, 0).astype(jnp.int32)
    return {"scale": new_scale.astype(jnp.float32), "good_steps": new_good}, overflow
