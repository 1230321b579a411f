"""Gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the exact gradient of a contrastive loss over a batch whose activations do not
fit in memory at once.

A dual-encoder loss L(θ, e) depends on the batch only through its embeddings e = f_θ(x), and
every example is embedded independently, so with the batch cut into K chunks x_1..x_K::

    dL/dθ = ∂L/∂θ  +  Σ_k  (∂f_θ(x_k)/∂θ)^T · ∂L/∂e_k

1. embed every chunk with no gradient bookkeeping (nothing kept but the [B, D] embeddings);
2. take the loss and its gradient w.r.t. the embeddings (and w.r.t. θ directly: the learnable
   temperature / bias);
3. for each chunk in turn, recompute its forward pass and back-propagate its slice of ∂L/∂e
   (one `jax.vjp` per chunk inside a `lax.scan`), summing the parameter gradients.

Peak activation memory is one chunk's forward + backward, whatever the batch; the price is a
second forward pass (≈ +1/3 compute). The result equals `jax.grad` of the plain loss up to
float summation order. Chunk k takes rows k, k+K, k+2K, ... so with the batch sharded over
devices every device keeps its own rows, and the embeddings are put back in batch order (no
resharding) before the loss sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.axes import BATCH_AXES

# (params, chunk, rng, frozen) -> embeddings (pytree; every leaf has the chunk's rows first)
EmbedFn = Callable[[Any, dict, jax.Array, Any], Any]
# (params, embeddings, aux, rng, frozen) -> (loss, metrics)
EmbedLossFn = Callable[[Any, Any, Any, jax.Array, Any], tuple[jax.Array, dict]]
# (chunk, frozen) -> embeddings that need no gradient (a frozen teacher's), or None
AuxFn = Callable[[dict, Any], Any]


def _constrain(x: jax.Array, mesh: Mesh | None, batch_dim: int) -> jax.Array:
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[batch_dim] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def split_chunks(tree: Any, num_chunks: int, mesh: Mesh | None = None) -> Any:
    """[B, ...] leaves -> [K, B/K, ...]: chunk k holds rows k, k+K, k+2K, ..."""

    def split(x):
        chunks = x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]).swapaxes(0, 1)
        return _constrain(chunks, mesh, 1)

    return jax.tree.map(split, tree)


def merge_chunks(tree: Any, mesh: Mesh | None = None) -> Any:
    """Inverse of :func:`split_chunks`: [K, B/K, ...] -> [B, ...] in the original row order."""

    def merge(x):
        rows = x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
        return _constrain(rows, mesh, 0)

    return jax.tree.map(merge, tree)


def gradient_cache(
    embed_fn: EmbedFn,
    loss_fn: EmbedLossFn,
    chunk_size: int,
    *,
    aux_fn: AuxFn | None = None,
    mesh: Mesh | None = None,
) -> Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict, Any]]:
    """A (params, batch, rng, frozen) -> (loss, metrics, grads) function (`step.GradFn`) that
    embeds `chunk_size` rows at a time.

    `embed_fn` must treat rows independently (no batch statistics). Chunk k's forward uses
    `fold_in(rng, k)` in both passes, so dropout masks agree between them. `aux_fn` computes
    embeddings that need no gradient (a frozen teacher) once, in the first pass. The batch size
    must be a multiple of `chunk_size`.
    """
    if chunk_size <= 0:
        raise ValueError(f"gradient_cache_chunk_size must be > 0; got {chunk_size}")

    def grad_fn(params, batch, rng, frozen):
        rows = next(iter(jax.tree.leaves(batch))).shape[0]
        if rows % chunk_size:
            raise ValueError(
                f"The batch ({rows} rows) is not a multiple of train.gradient_cache_chunk_size "
                f"({chunk_size}): pick a chunk size that divides it."
            )
        num_chunks = rows // chunk_size
        chunks = split_chunks(batch, num_chunks, mesh)
        keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(num_chunks))

        # 1. Embeddings of every chunk, no activations kept.
        stopped = jax.lax.stop_gradient(params)

        def embed_chunk(_, inputs):
            chunk, key = inputs
            out = embed_fn(stopped, chunk, key, frozen)
            aux = aux_fn(chunk, frozen) if aux_fn is not None else None
            return None, (out, aux)

        _, (embeds, aux) = jax.lax.scan(embed_chunk, None, (chunks, keys))
        embeds, aux = merge_chunks(embeds, mesh), merge_chunks(aux, mesh)

        # 2. Loss, and its gradient w.r.t. the params it uses directly and the embeddings.
        (loss, metrics), (param_grads, embed_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(params, embeds, aux, rng, frozen)
        embed_grads = split_chunks(embed_grads, num_chunks, mesh)

        # 3. Recompute each chunk and back-propagate its slice of the embedding gradient.
        def backward_chunk(grads, inputs):
            chunk, key, cotangent = inputs
            _, vjp = jax.vjp(lambda p: embed_fn(p, chunk, key, frozen), params)
            (chunk_grads,) = vjp(cotangent)
            return jax.tree.map(jnp.add, grads, chunk_grads), None

        grads, _ = jax.lax.scan(backward_chunk, param_grads, (chunks, keys, embed_grads))
        return loss, metrics, grads

    return grad_fn
