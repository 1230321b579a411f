"""The jitted train and eval steps, built from a task's pure loss function.

Gradient accumulation and NaN/Inf skipping are wrappers around loss-and-grad, not branches in the
trainer loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain import loss_scale as ls
from jaxtrain.axes import BATCH_AXES
from jaxtrain.errors import ConfigError
from jaxtrain.state import TrainState

LossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]
GradFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict, Any]]


def loss_and_grad(loss_fn: LossFn) -> GradFn:
    """(params, batch, rng, frozen) -> (loss, metrics, grads)."""

    def fn(params, batch, rng, frozen):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, rng, frozen
        )
        return loss, metrics, grads

    return fn


def accumulate(grad_fn: GradFn, accum_steps: int, mesh: Mesh | None = None) -> GradFn:
    """Average loss, metrics and grads over `accum_steps` equal microbatches, one at a time.

    For losses that are a mean over independent examples this equals the full-batch gradient
    while holding the activations of one microbatch only. (A contrastive loss is not such a
    mean: its negatives come from the batch it sees — the gradient cache is the tool there.)
    Microbatch i takes rows i, i+A, i+2A, ... so every device keeps its own rows.
    """
    if accum_steps == 1:
        return grad_fn

    def split(x):
        micro = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 1)))
            micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, spec))
        return micro

    def fn(params, batch, rng, frozen):
        micro_batches = jax.tree.map(split, batch)

        def body(carry, inputs):
            i, micro = inputs
            loss, metrics, grads = grad_fn(params, micro, jax.random.fold_in(rng, i), frozen)
            carry = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return carry, None

        zero = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches),
                              rng, frozen)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
        total, _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro_batches))
        return jax.tree.map(lambda x: x / accum_steps, total)

    return fn


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    accum_steps: int = 1,
    mesh: Mesh | None = None,
    grad_fn: GradFn | None = None,
    loss_scale: ls.LossScale | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step. A non-finite loss or gradient norm leaves params and optimizer state
    unchanged (the step counter still advances) and reports `nonfinite=1` in the metrics.
    `grad_fn` replaces `jax.value_and_grad(loss_fn)` (a task's own, e.g. the gradient cache).
    `loss_scale` (float16 compute, :mod:`jaxtrain.loss_scale`): the loss is scaled by S, the
    gradients unscaled; metrics add `loss_scale` (S of this step) and `overflow` (1 = skipped by
    dynamic scaling, expected: not `nonfinite`); the TrainState's `loss_scale` carries S."""
    if loss_scale is not None and grad_fn is not None:
        raise ConfigError(
            "train.loss_scale is set but the task computes its own gradients (e.g. the "
            "contrastive gradient cache or local loss), which loss scaling cannot wrap. Set "
            "train.loss_scale='none' (and model.dtype='bfloat16'), or turn that option off.")
    scaled_grad_fn = lambda scale: accumulate(  # noqa: E731 - S is traced: built per trace
        loss_and_grad(ls.scaled(loss_fn, scale)), accum_steps, mesh)
    grad_fn = accumulate(grad_fn or loss_and_grad(loss_fn), accum_steps, mesh)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        if loss_scale is None:
            loss, metrics, grads = grad_fn(state.params, batch, rng, state.frozen)
        else:
            scale = ls.current(loss_scale, state.loss_scale)
            loss, metrics, grads = scaled_grad_fn(scale)(state.params, batch, rng, state.frozen)
            loss, grads = ls.unscale((loss, grads), scale)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        scale_state, overflow = state.loss_scale, jnp.zeros((), bool)
        if loss_scale is not None:
            scale_state, overflow = ls.adjust(loss_scale, state.loss_scale,
                                              jnp.isfinite(loss), jnp.isfinite(grad_norm))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            loss_scale=scale_state,
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "nonfinite": (~finite & ~overflow).astype(jnp.int32),
        }
        if loss_scale is not None:
            metrics.update(loss_scale=scale, overflow=overflow.astype(jnp.int32))
        return new_state, metrics

    return train_step
