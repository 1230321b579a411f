"""Choosing the next token from logits: temperature, top-k, top-p (nucleus), greedy.

Pure, jittable functions of arrays. ``logits`` are [..., V] (float32); a filtered-out token gets
logit ``-inf``, so ``softmax`` gives it probability 0. The order is that of Hugging Face's
``generate``: temperature, then top-k, then top-p on the tempered distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def apply_temperature(logits: Array, temperature: float | Array) -> Array:
    """``logits / temperature`` (temperature > 0): p_i ∝ exp(z_i / T). T < 1 sharpens the
    distribution, T > 1 flattens it, T -> 0 tends to greedy (argmax)."""
    return logits / temperature


def top_k_filter(logits: Array, k: int) -> Array:
    """Keep the k largest logits of the last axis, ``-inf`` elsewhere (k = 0: unchanged):

        z'_i = z_i if z_i >= z_(k) else -inf,    z_(k) = the k-th largest logit

    (tokens tied with the k-th largest are all kept). ``k`` is static (a Python int)."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: Array, p: float | Array) -> Array:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass is
    >= p (always at least the most likely token), ``-inf`` elsewhere. With the probabilities
    sorted in decreasing order, q_(1) >= q_(2) >= ..., token (j) is kept iff

        sum_{i < j} q_(i) < p

    (tokens tied with the last kept one are kept too). p >= 1 keeps every token with
    probability > 0. ``p`` may be traced."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0 < p
    kept = jnp.where(p >= 1.0, logits.shape[-1], kept)  # not cut by float32 rounding of the sum
    cutoff = jnp.take_along_axis(sorted_logits, jnp.maximum(kept, 1) - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def filter_logits(logits: Array, *, temperature: float | Array, top_k: int = 0,
                  top_p: float | Array = 1.0) -> Array:
    """Temperature, then top-k, then top-p: the logits whose softmax :func:`sample` draws
    from. top_p given as a Python float >= 1 skips the nucleus sort."""
    z = apply_temperature(logits.astype(jnp.float32), temperature)
    z = top_k_filter(z, top_k)
    if isinstance(top_p, int | float) and top_p >= 1.0:
        return z
    return top_p_filter(z, top_p)


def greedy(logits: Array) -> Array:
    """``argmax(logits, -1)`` (the first maximum), as two one-operand reductions:

        m = max_v logits[..., v];   id = min { v : logits[..., v] == m }

    which XLA:CPU runs ~3x faster than its (value, index) argmax reduction over a 50k
    vocabulary (0.33 vs 1.06 ms for [8, 50304]). A row of NaN logits gives the last id."""
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v)
    return jnp.minimum(jnp.min(ids, axis=-1), v - 1).astype(jnp.int32)


def sample(logits: Array, rng: Array, *, temperature: float | Array = 1.0, top_k: int = 0,
           top_p: float | Array = 1.0) -> Array:
    """Token ids [...] drawn from ``softmax(filter_logits(logits))`` (logits [..., V]).

    ``temperature == 0`` (a Python number) is greedy: ``argmax(logits)``, ``rng`` unused; a
    traced temperature must be > 0. ``rng``: one key (split across the rows) or a key array
    shaped like ``logits.shape[:-1]`` (one key per row: rows sample independently, so a row's
    tokens do not depend on the batch it is in). ``top_k`` is static (0 = off); ``top_p`` in
    (0, 1] (1 = off) may be traced."""
    if isinstance(temperature, int | float) and temperature == 0:
        return greedy(logits)
    z = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    batch = z.shape[:-1]
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a raw uint32 jax.random.PRNGKey
        rng = jax.random.wrap_key_data(rng)
    if rng.shape == ():
        rng = jax.random.split(rng, batch) if batch else rng
    if rng.shape != batch:
        raise ValueError(f"sample: rng must be one key or one key per row {batch}; got keys "
                         f"shaped {rng.shape}")
    flat_z = z.reshape(-1, z.shape[-1])
    flat_rng = rng.reshape(-1)
    draws = jax.vmap(lambda k, x: jax.random.categorical(k, x))(flat_rng, flat_z)
    return draws.reshape(batch).astype(jnp.int32)
