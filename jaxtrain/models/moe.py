"""Top-k mixture of SwiGLU experts with a capacity factor (GShard/Switch dispatch).

Each sequence is a routing group of T tokens. Every token picks its k most probable experts;
an expert takes at most ``capacity = ceil(k · T · capacity_factor / C)`` tokens per sequence,
filled first-choice-first (all tokens' first choices, then their second, ...); assignments
beyond it are dropped (the token keeps its residual). A token's output is the sum over its kept
experts of ``w_j · expert_j(x)``, with w = the top-k probabilities renormalised to sum to 1
(Mixtral's routing).

Dispatch is by one-hot einsums, so GSPMD turns it into all-to-alls when the expert weights
([C, D, F], logical axis ``expert``) are sharded over the mesh's ``expert`` axis.
The dispatch tensor is [B, T, C, capacity]: memory grows as k · T² · capacity_factor per
sequence, fine up to a few thousand tokens.

The module computes no loss: it returns what the router did (its logits, the chosen experts, the
dropped fraction) and the task applies :mod:`jaxtrain.losses.router` to it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.models.layers import Dtype, partitioned

Array = jax.Array


def dispatch_and_combine(
    probs: Array, k: int, capacity: int
) -> tuple[Array, Array, Array, Array]:
    """Routing of one batch of groups. ``probs`` [B, T, C] (float32).

    Returns (dispatch [B, T, C, cap] 0/1, combine [B, T, C, cap] weights, expert_index [B, T, k],
    kept fraction of the k·T assignments per group [B])."""
    b, t, c = probs.shape
    top_p, top_i = jax.lax.top_k(probs, k)  # [B, T, k]
    weights = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    choice = jax.nn.one_hot(top_i, c, dtype=jnp.int32)  # [B, T, k, C]
    # Priority: choice 0 of every token, then choice 1, ... (choice-major order).
    order = choice.transpose(0, 2, 1, 3).reshape(b, k * t, c)
    slot = jnp.cumsum(order, axis=1) - 1  # position in the expert's buffer
    kept = order * (slot < capacity)
    slot = jnp.where(kept > 0, slot, 0)
    one_slot = jax.nn.one_hot(slot, capacity, dtype=probs.dtype) * kept[..., None]
    one_slot = one_slot.reshape(b, k, t, c, capacity).transpose(0, 2, 1, 3, 4)  # [B,T,k,C,cap]
    dispatch = jnp.sum(one_slot, axis=2)
    combine = jnp.einsum("btk,btkce->btce", weights, one_slot)
    kept_fraction = jnp.sum(kept, axis=(1, 2)) / (k * t)
    return dispatch, combine, top_i, kept_fraction


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. Returns (y [B, T, D], stats) with the router's statistics:
    ``router_logits`` [B, T, C] float32, ``expert_index`` [B, T, k] (each token's chosen experts,
    before the capacity drop) and ``dropped_fraction`` (the share of the k·T assignments per
    group over capacity, averaged over groups)."""

    num_experts: int  # C
    num_experts_per_tok: int  # k
    intermediate_size: int  # F of each expert
    capacity_factor: float
    initializer_range: float
    dtype: Dtype = jnp.float32  # compute dtype (router and parameters are float32)

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        b, t, d = x.shape
        c, k, f = self.num_experts, self.num_experts_per_tok, self.intermediate_size
        dt = self.dtype
        init = nn.initializers.normal(stddev=self.initializer_range)
        logits = nn.Dense(
            c, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
            kernel_init=partitioned(init, ("embed", None)), name="router",
        )(x.astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)
        capacity = max(1, math.ceil(k * t * self.capacity_factor / c))
        dispatch, combine, top_i, kept = dispatch_and_combine(probs, k, capacity)

        def expert_param(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
            return self.param(name, partitioned(init, axes), shape, jnp.float32).astype(dt)

        gate = expert_param("gate_proj", (c, d, f), ("expert", "embed", "mlp"))
        up = expert_param("up_proj", (c, d, f), ("expert", "embed", "mlp"))
        down = expert_param("down_proj", (c, f, d), ("expert", "mlp", "embed"))

        xin = jnp.einsum("btd,btce->bced", x.astype(dt), dispatch.astype(dt))
        xin = nn.with_logical_constraint(xin, ("expert_batch", "act_expert", None, "act_embed"))
        h = nn.silu(jnp.einsum("bced,cdf->bcef", xin, gate)) * jnp.einsum(
            "bced,cdf->bcef", xin, up)
        out = jnp.einsum("bcef,cfd->bced", h, down)
        out = nn.with_logical_constraint(out, ("expert_batch", "act_expert", None, "act_embed"))
        y = jnp.einsum("bced,btce->btd", out, combine.astype(dt))
        stats = {
            "router_logits": logits,
            "expert_index": top_i,
            "dropped_fraction": 1.0 - jnp.mean(kept),
        }
        return y, stats
