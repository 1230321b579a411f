"""Pooling of a text tower's hidden states into one vector per sequence.

``pool(hidden [B, T, D], mask [B, T] bool, how) -> [B, D]``, ``how`` one of :data:`POOLINGS`:

* ``cls``: the first non-pad position, ``h[b, i₀]`` with ``i₀ = min{i : mask[b, i]}`` (BERT's
  [CLS]; position 0 with right padding, the first real token with left padding);
* ``mean``: the masked mean, ``Σᵢ mask[b, i]·h[b, i] / max(1, Σᵢ mask[b, i])``;
* ``last_token``: the last non-pad position, ``h[b, i₁]`` with ``i₁ = max{i : mask[b, i]}``
  (``Σᵢ mask[b, i] − 1`` with right padding, ``T − 1`` with left padding): the eos a decoder
  embedder appends, the only position a causal tower lets see the whole text.

Padding may be on either side (or both); a row with no real token pools to position 0 (cls,
last_token) or zeros (mean). The mean accumulates in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS: tuple[str, ...] = ("cls", "mean", "last_token")


def pool(hidden: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """One ``[B, D]`` vector per row of ``hidden [B, T, D]``; ``mask [B, T]`` True at tokens."""
    if how not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {how!r}")
    mask = mask.astype(bool)
    if how == "mean":
        m = mask.astype(jnp.float32)[..., None]
        total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
        return (total / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(hidden.dtype)
    positions = jnp.arange(mask.shape[1])
    if how == "cls":
        index = jnp.argmax(mask, axis=1)  # first True (0 when none)
    else:
        index = jnp.max(jnp.where(mask, positions, 0), axis=1)  # last True (0 when none)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
