"""Optimizers, learning-rate schedules, weight-decay masks and parameter groups.

Everything here is driven by the ``optim`` section of the config (an ``ml_collections.ConfigDict``
or any object with the same attributes):

* :func:`build_schedule` turns ``optim.schedule`` + warmup into an ``optax.Schedule``.
* :func:`build_optimizer` builds the full update rule::

      chain(zero frozen grads, clip_by_global_norm(clip_norm), multi_transform(groups))

  where every non-frozen parameter group runs the chosen optimizer with its own scaled learning
  rate, and the frozen group runs ``optax.set_to_zero()`` (so it holds no optimizer state).
* :func:`param_paths`, :func:`trainable_mask` and :func:`weight_decay_mask` expose the per-parameter
  decisions so callers (logging, checkpointing, tests) can inspect them.

Parameter paths are the ``'/'``-joined pytree keys, e.g. ``'img/encoder/block_0/attn/query/kernel'``
(the Flax ``'params'`` collection key is not part of it when you pass ``variables['params']``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain.config import OPTIMIZERS, SCHEDULES, base_config
from jaxtrain.tree import path_str

PyTree = Any



_DEFAULTS = base_config().optim
FROZEN_LABEL = "frozen"
DEFAULT_LABEL = "default"


# --------------------------------------------------------------------------------------------------
# Config access and validation
# --------------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str) -> Any:
    """``cfg.<key>``, falling back to the engine default (``base_config().optim``)."""
    return getattr(cfg, key, _DEFAULTS[key])


def _invalid(key: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"optim.{key}={value!r} is invalid: {fix}")


def _choice(cfg: Any, key: str, valid: Sequence[str]) -> str:
    """Return ``cfg.<key>`` if it is one of ``valid``; else raise with a did-you-mean hint."""
    value = _get(cfg, key)
    if value in valid:
        return value
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise _invalid(key, value, f"set it to one of {', '.join(map(repr, valid))}.{hint}")


def _number(cfg: Any, key: str, lo: float, hi: float = math.inf, hi_open: bool = False) -> float:
    """Return ``cfg.<key>`` as a float after checking ``lo <= value <= hi`` (or ``< hi``)."""
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(key, value, "it must be a finite number.")
    too_high = value >= hi if hi_open else value > hi
    if value < lo or too_high:
        bounds = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}{')' if hi_open else ']'}"
        raise _invalid(key, value, f"it must be {bounds}; set a value in that range.")
    return float(value)


def _integer(cfg: Any, key: str, lo: int) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _invalid(key, value, f"it must be an integer >= {lo}.")
    return int(value)


def _total_steps(total_steps: int) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"total_steps={total_steps!r} is invalid: pass the number of training steps as an "
            "integer >= 1."
        )
    return total_steps


def resolve_warmup(cfg: Any, total_steps: int) -> int:
    """Number of warmup steps ``W``.

    ``W = optim.warmup_steps`` or ``W = round(optim.warmup_ratio * total_steps)``; setting both
    above zero is an error, and so is ``W >= total_steps`` (no steps would be left to train).
    """
    total_steps = _total_steps(total_steps)
    steps = _integer(cfg, "warmup_steps", 0)
    ratio = _number(cfg, "warmup_ratio", 0.0, 1.0)
    if steps > 0 and ratio > 0:
        raise ValueError(
            f"optim.warmup_steps={steps} and optim.warmup_ratio={ratio} are both set: use only one "
            "of them (set the other to 0)."
        )
    warmup = steps if steps > 0 else round(ratio * total_steps)
    if warmup >= total_steps:
        key, value = ("warmup_steps", steps) if steps > 0 else ("warmup_ratio", ratio)
        raise _invalid(
            key,
            value,
            f"warmup of {warmup} steps must be shorter than total_steps={total_steps}; "
            "lower it or train longer.",
        )
    return warmup


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def _cosine_restarts(peak: float, floor: float, steps: int, cycles: int) -> optax.Schedule:
    """``cycles`` equal cosine cycles over ``steps`` steps, each restarting at ``peak``.

    With cycle length ``L = steps / cycles``, cycle index ``c = min(floor(t / L), cycles - 1)`` and
    phase ``f = clip((t - c L) / L, 0, 1)``::

        lr(t) = floor + (peak - floor) * 0.5 * (1 + cos(pi * f))
    """
    length = steps / cycles

    def schedule(step: jax.Array) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        cycle = jnp.clip(jnp.floor(t / length), 0, cycles - 1)
        frac = jnp.clip((t - cycle * length) / length, 0.0, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def _wsd(peak: float, floor: float, steps: int, decay_ratio: float) -> optax.Schedule:
    """Warmup-stable-decay main phase: ``peak`` for ``steps - D`` steps, then linear to ``floor``.

    ``D = round(decay_ratio * steps)``; ``lr(t) = peak`` for ``t < steps - D`` and
    ``lr(t) = peak + (floor - peak) * (t - (steps - D)) / D`` afterwards (clamped at ``floor``).
    """
    decay = round(decay_ratio * steps)
    if decay == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
        [steps - decay],
    )


def _rsqrt(peak: float, timescale: int, offset: int) -> optax.Schedule:
    """``lr(s) = peak * sqrt(tau / max(s + offset, tau))``; ``s + offset`` is the global step."""

    def schedule(step: jax.Array) -> jax.Array:
        t = jnp.asarray(step, jnp.float32) + offset
        return peak * jnp.sqrt(timescale / jnp.maximum(t, float(timescale)))

    return schedule


def build_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule ``lr_t = optim.lr * m(t)`` (multiplier 1, i.e. the peak group).

    With ``W`` warmup steps (:func:`resolve_warmup`), peak ``lr``, floor ``lr_min = lr *
    min_lr_ratio`` and ``T = total_steps - W`` main steps, ``t = step - W``:

    * warmup (``step < W``): ``lr * step / W``;
    * ``constant``: ``lr``;
    * ``linear``: ``lr + (lr_min - lr) * min(t, T) / T``;
    * ``cosine``: ``lr_min + (lr - lr_min) * 0.5 * (1 + cos(pi * min(t, T) / T))``;
    * ``cosine_restarts``: ``num_cycles`` cosine cycles of length ``T / num_cycles``, each jumping
      back to ``lr`` at its start and decaying to ``lr_min``;
    * ``wsd`` (warmup-stable-decay): ``lr`` until the last ``D = round(decay_ratio * T)`` steps,
      then linear decay to ``lr_min``;
    * ``rsqrt``: ``lr * sqrt(tau / max(step, tau))`` with ``step`` counted from the start of
      training (warmup included) and ``tau = rsqrt_timescale or warmup_steps or 1``. With the
      default ``tau = W`` the curve is continuous at the end of warmup.

    Steps past ``total_steps`` stay at the final value (``constant``/``rsqrt`` keep their formula).
    """
    total_steps = _total_steps(total_steps)
    kind = _choice(cfg, "schedule", SCHEDULES)
    peak = _number(cfg, "lr", 0.0)
    floor = peak * _number(cfg, "min_lr_ratio", 0.0, 1.0)
    warmup = resolve_warmup(cfg, total_steps)
    steps = total_steps - warmup

    if kind == "constant":
        main = optax.constant_schedule(peak)
    elif kind == "linear":
        main = optax.linear_schedule(peak, floor, steps)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(peak, steps, alpha=floor / peak if peak else 0.0)
    elif kind == "cosine_restarts":
        cycles = _integer(cfg, "num_cycles", 1)
        if cycles > steps:
            raise _invalid(
                "num_cycles",
                cycles,
                f"only {steps} post-warmup steps are available; use at most {steps} cycles.",
            )
        main = _cosine_restarts(peak, floor, steps, cycles)
    elif kind == "wsd":
        main = _wsd(peak, floor, steps, _number(cfg, "decay_ratio", 0.0, 1.0))
    else:  # rsqrt
        timescale = _integer(cfg, "rsqrt_timescale", 0) or warmup or 1
        main = _rsqrt(peak, timescale, offset=warmup)

    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


# --------------------------------------------------------------------------------------------------
# Parameter paths, groups and masks
# --------------------------------------------------------------------------------------------------


def param_paths(params: PyTree) -> PyTree:
    """Same structure as ``params``; each leaf is its ``'/'``-joined key path.

    Dict keys (incl. Flax ``FrozenDict``), attribute names and sequence indices are all used, e.g.
    ``{'dense': {'kernel': w}, 'blocks': [{'b': b}]}`` → ``{'dense': {'kernel': 'dense/kernel'},
    'blocks': [{'b': 'blocks/0/b'}]}``.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path_str(path), params)


def _compile(key: str, pattern: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise _invalid(key, pattern, "the regex must be a string.")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise _invalid(key, pattern, f"not a valid regular expression ({err}).") from err


def _param_groups(cfg: Any) -> tuple[tuple[re.Pattern[str], float], ...]:
    """Parse ``optim.param_groups`` into ``((compiled_regex, multiplier), ...)``."""
    raw = _get(cfg, "param_groups") or ()
    fix = "use a sequence of (regex, lr_multiplier) pairs, e.g. (('txt/.*', 0.1), ('img/.*', 0.0))."
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise _invalid("param_groups", raw, fix)
    groups = []
    for entry in raw:
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise _invalid("param_groups", raw, f"entry {entry!r} is not a pair; {fix}")
        pattern, mult = entry
        if (
            isinstance(mult, bool)
            or not isinstance(mult, (int, float))
            or not math.isfinite(mult)
            or mult < 0
        ):
            raise _invalid(
                "param_groups",
                raw,
                f"multiplier {mult!r} of {pattern!r} must be a finite number >= 0 (0 = frozen).",
            )
        groups.append((_compile("param_groups", pattern), float(mult)))
    return tuple(groups)


def _group_index(path: str, groups: Sequence[tuple[re.Pattern[str], float]]) -> int | None:
    """Index of the first group whose regex ``re.search``-es ``path``; ``None`` if none does."""
    for i, (regex, _) in enumerate(groups):
        if regex.search(path):
            return i
    return None


def _label(path: str, groups: Sequence[tuple[re.Pattern[str], float]]) -> str:
    i = _group_index(path, groups)
    if i is None:
        return DEFAULT_LABEL
    return FROZEN_LABEL if groups[i][1] == 0.0 else f"group_{i}"


def _labels_fn(groups: Sequence[tuple[re.Pattern[str], float]]) -> Callable[[PyTree], PyTree]:
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: _label(path_str(path), groups), tree
    )


def _frozen_fn(groups: Sequence[tuple[re.Pattern[str], float]]) -> Callable[[PyTree], PyTree]:
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: _label(path_str(path), groups) == FROZEN_LABEL, tree
    )


def trainable_mask(cfg: Any, params: PyTree) -> PyTree:
    """Bool tree like ``params``: ``False`` for frozen params (their group multiplier is 0)."""
    frozen = _frozen_fn(_param_groups(cfg))(params)
    return jax.tree_util.tree_map(lambda f: not f, frozen)


def _decay_fn(cfg: Any) -> Callable[[PyTree], PyTree]:
    """Mask callable: decay iff ``ndim > 1`` and ``optim.wd_exclude`` does not match the path."""
    pattern = _get(cfg, "wd_exclude") or ""
    regex = _compile("wd_exclude", pattern) if pattern else None

    def decays(path: Sequence[Any], leaf: Any) -> bool:
        if jnp.ndim(leaf) <= 1:
            return False
        return regex is None or regex.search(path_str(path)) is None

    return lambda tree: jax.tree_util.tree_map_with_path(decays, tree)


def weight_decay_mask(cfg: Any, params: PyTree) -> PyTree:
    """Bool tree like ``params``: ``True`` where weight decay applies.

    A param decays iff ``ndim > 1`` and ``re.search(optim.wd_exclude, path)`` is ``None`` (an empty
    ``wd_exclude`` keeps only the ndim rule). Frozen params never change, whatever this says.
    """
    return _decay_fn(cfg)(params)


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def _scaled(schedule: optax.Schedule, factor: float) -> optax.Schedule:
    """``step -> factor * schedule(step)`` (``schedule`` itself when ``factor == 1``)."""
    if factor == 1.0:
        return schedule
    return lambda step: factor * schedule(step)


def _inner_optimizer(
    cfg: Any, name: str, lr: optax.Schedule, decay_mask: Callable[[PyTree], PyTree]
) -> optax.GradientTransformation:
    """The chosen optimizer with learning rate ``lr`` and masked decoupled weight decay.

    Every optimizer shrinks decayed params by ``lr_t * weight_decay * w`` per step on top of its
    own update: adamw/lion natively, adafactor via ``weight_decay_rate = weight_decay * lr_t``
    (optax's adafactor does not scale the decay by the lr itself), sgd via
    ``add_decayed_weights`` before ``sgd`` (so with momentum the decay goes through the momentum).
    """
    wd = _number(cfg, "weight_decay", 0.0)
    mask = decay_mask if wd > 0 else None
    if name == "adamw":
        return optax.adamw(
            lr,
            b1=_number(cfg, "b1", 0.0, 1.0, hi_open=True),
            b2=_number(cfg, "b2", 0.0, 1.0, hi_open=True),
            eps=_number(cfg, "eps", 0.0),
            weight_decay=wd,
            mask=mask,
        )
    if name == "lion":
        return optax.lion(
            lr,
            b1=_number(cfg, "b1", 0.0, 1.0, hi_open=True),
            b2=_number(cfg, "b2", 0.0, 1.0, hi_open=True),
            weight_decay=wd,
            mask=mask,
        )
    if name == "adafactor":
        return optax.adafactor(
            learning_rate=lr,
            weight_decay_rate=_scaled(lr, wd) if wd > 0 else None,
            weight_decay_mask=mask,
        )
    momentum = _number(cfg, "momentum", 0.0, 1.0, hi_open=True)
    return optax.chain(
        optax.add_decayed_weights(wd, mask),
        optax.sgd(lr, momentum=momentum or None, nesterov=bool(_get(cfg, "nesterov"))),
    )


def build_optimizer(
    cfg: Any, total_steps: int, *, schedule: optax.Schedule | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build ``(optimizer, schedule)`` from the ``optim`` config.

    The optimizer is::

        chain(masked(set_to_zero, frozen),          # only if some group has multiplier 0
              clip_by_global_norm(clip_norm),       # only if clip_norm > 0
              multi_transform({'default': opt(lr_t), 'group_i': opt(m_i * lr_t),
                               'frozen': set_to_zero()}, labels))

    Frozen grads are zeroed *before* clipping, so the global norm
    ``||g|| = sqrt(sum over trainable leaves of sum(g**2))`` ignores them; they get no optimizer
    state (``multi_transform`` masks them out of every other group). ``schedule`` is the
    multiplier-1 learning rate (for logging). No params are needed: masks and labels are callables
    evaluated on the param/update trees.

    ``schedule``, if given, replaces :func:`build_schedule` (``optim.schedule``, ``lr``, warmup and
    ``min_lr_ratio`` are then unused; group multipliers still scale it), e.g. the learning-rate
    finder's sweep (:mod:`jaxtrain.lr_find`).
    """
    name = _choice(cfg, "name", OPTIMIZERS)
    if schedule is None:
        schedule = build_schedule(cfg, total_steps)
    groups = _param_groups(cfg)
    decay_mask = _decay_fn(cfg)

    transforms: dict[str, optax.GradientTransformation] = {
        DEFAULT_LABEL: _inner_optimizer(cfg, name, schedule, decay_mask)
    }
    for i, (_, mult) in enumerate(groups):
        if mult == 0.0:
            transforms[FROZEN_LABEL] = optax.set_to_zero()
        else:
            transforms[f"group_{i}"] = _inner_optimizer(
                cfg, name, _scaled(schedule, mult), decay_mask
            )

    chain: list[optax.GradientTransformation] = []
    if FROZEN_LABEL in transforms:
        chain.append(optax.masked(optax.set_to_zero(), _frozen_fn(groups)))
    clip_norm = _get(cfg, "clip_norm")
    if clip_norm is not None and _number(cfg, "clip_norm", 0.0) > 0:
        chain.append(optax.clip_by_global_norm(float(clip_norm)))
    chain.append(optax.multi_transform(transforms, _labels_fn(groups)))
    return optax.chain(*chain), schedule
