"""Mixture-of-experts router losses: pure functions of the router's logits and its choices.

Notation: C experts, N tokens (the leading axes, flattened), top-k routing.
    p_n   = softmax(logits_n)                       router probabilities of token n
    P_i   = (1/N) Σ_n p_n,i                         mean probability given to expert i
    f_i   = (1/(N k)) Σ_n [expert i in top-k(n)]    fraction of routed assignments to expert i
                                                    (counted before the capacity drop; Σ_i f_i = 1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def expert_fractions(expert_index: Array, num_experts: int) -> Array:
    """f_i from the chosen experts `expert_index` [..., k] (ints): shape [C], sums to 1."""
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
    return jnp.mean(onehot.reshape(-1, num_experts), axis=0)


def load_balance_loss(logits: Array, expert_index: Array) -> Array:
    """Switch-Transformer load balance ``C · Σ_i f_i · P_i``.

    Equals 1 when routing is uniform and grows to C when every token goes to one expert.
    Gradients flow through P (the probabilities); f is a count.
    """
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, num_experts)
    f = expert_fractions(expert_index, num_experts)
    return num_experts * jnp.sum(f * jnp.mean(probs, axis=0))


def balance_deviation_loss(logits: Array, expert_index: Array) -> Array:
    """Auxiliary ``Σ_i (f_i − 1/C)²``: 0 for a perfectly even load.

    f is a count, so this loss's gradient is routed through P: it is computed as
    ``Σ_i (f_i − 1/C) · (f_i − 1/C)`` with one factor replaced by the straight-through
    ``f_i + (P_i − stop_gradient(P_i))`` so its value is exact and its gradient pushes P
    toward the even load.
    """
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, num_experts)
    p = jnp.mean(probs, axis=0)
    f = expert_fractions(expert_index, num_experts)
    f_st = f + (p - jax.lax.stop_gradient(p))
    return jnp.sum((f - 1.0 / num_experts) * (f_st - 1.0 / num_experts))


def router_z_loss(logits: Array) -> Array:
    """ST-MoE router z-loss ``mean_n (logsumexp_i logits_n,i)²``: keeps router logits small."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(lse**2)


def router_losses(logits: Array, expert_index: Array) -> dict[str, Array]:
    """The router losses and expert load of L MoE layers, each the mean over the layers of the
    per-layer value: ``load_balance``, ``balance_deviation``, ``router_z`` (the losses above)
    and ``expert_load`` (f_i, [C]).

    ``logits`` [L, ..., C] and ``expert_index`` [L, ..., k]: layer first, as
    :class:`jaxtrain.models.llama.Llama` returns them (``router_logits``, ``expert_index``).
    """
    num_experts = logits.shape[-1]

    def one_layer(z: Array, index: Array) -> dict[str, Array]:
        return {"load_balance": load_balance_loss(z, index),
                "balance_deviation": balance_deviation_loss(z, index),
                "router_z": router_z_loss(z),
                "expert_load": expert_fractions(index, num_experts)}

    return jax.tree.map(lambda v: jnp.mean(v, axis=0), jax.vmap(one_layer)(logits, expert_index))
