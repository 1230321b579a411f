"""Contrastive losses for dual encoders (pure functions of arrays)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def clip_loss(
    image_embeds: Array,
    text_embeds: Array,
    logit_scale: Array,
    max_logit_scale: float = 100.0,
) -> tuple[Array, dict[str, Array]]:
    r"""Symmetric InfoNCE (CLIP) loss over the batch it is given.

    Row ``i`` of ``image_embeds`` (x) and ``text_embeds`` (y) is a matched pair; every other
    row of the batch is a negative. Both are assumed to be already L2-normalised (so the dot
    product is the cosine similarity). With B the batch size::

        s    = min(exp(logit_scale), max_logit_scale)
        L_ij = s * <x_i, y_j>
        loss = 1/2 * [ CE(L, I) + CE(L^T, I) ]
        CE(L, I) = -1/B * sum_i log softmax(L_i)_i

    Under ``jit`` with the batch sharded over devices the inputs are the *global* batch, so
    negatives come from every device (the compiler inserts the needed gathers).

    Logits are computed in float32 (inputs are cast). Clipping uses ``min``, so the gradient
    with respect to ``logit_scale`` is zero once ``exp(logit_scale) > max_logit_scale``.

    Args:
      image_embeds: ``[B, D]`` L2-normalised image embeddings.
      text_embeds: ``[B, D]`` L2-normalised text embeddings.
      logit_scale: scalar log of the inverse temperature.
      max_logit_scale: upper bound on ``exp(logit_scale)``.

    Returns:
      ``(loss, metrics)`` where metrics has ``'loss'``, ``'i2t_acc'`` and ``'t2i_acc'``
      (in-batch top-1 accuracy, image->text and text->image) and ``'temperature'`` (1/s).
    """
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must both be [B, D] with equal shapes; got "
            f"{image_embeds.shape} and {text_embeds.shape}"
        )
    if jnp.ndim(logit_scale) != 0:
        raise ValueError(f"logit_scale must be a scalar; got shape {jnp.shape(logit_scale)}")
    x = image_embeds.astype(jnp.float32)
    y = text_embeds.astype(jnp.float32)
    scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, jnp.float32)), max_logit_scale)
    logits = scale * (x @ y.T)  # [B_image, B_text]
    labels = jnp.arange(logits.shape[0])
    i2t_logp = jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    t2i_logp = jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    loss = -0.5 * (jnp.mean(i2t_logp) + jnp.mean(t2i_logp))
    metrics = {
        "loss": loss,
        "i2t_acc": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "t2i_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels),
        "temperature": 1.0 / scale,
    }
    return loss, metrics
