"""Language-model losses: pure functions of logits, labels and masks.

Shapes: logits [B, T, V] (float32), targets [B, T] ints, mask [B, T] (1 = the target counts).
Every loss is a mean over the counted targets: with M = Σ mask,  mean_m(x) = Σ_t mask_t x_t / M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _mean(x: Array, mask: Array) -> Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_cross_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Per-token ``(logsumexp(z) − z[y], logsumexp(z))``, both [B, T]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked, lse


def next_token_loss(
    logits: Array, targets: Array, mask: Array, z_loss: float = 0.0
) -> tuple[Array, dict[str, Array]]:
    """Masked next-token cross-entropy with an optional output z-loss:

        ce     = mean_m( logsumexp(z_t) − z_t[y_t] )
        zl     = mean_m( logsumexp(z_t)² )
        loss   = ce + z_loss · zl

    Returns (loss, {"ce": ce, "z_loss": zl, "tokens": M}).
    """
    ce_t, lse = token_cross_entropy(logits, targets)
    ce = _mean(ce_t, mask)
    zl = _mean(lse**2, mask)
    loss = ce + z_loss * zl if z_loss else ce
    return loss, {"ce": ce, "z_loss": zl, "tokens": jnp.sum(mask.astype(jnp.float32))}


def token_kl(p_logits: Array, q_logits: Array) -> Array:
    """Per-token ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` with p = softmax(p_logits),
    q = softmax(q_logits): [B, T], ≥ 0."""
    log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distillation_kl(
    student_logits: Array, teacher_logits: Array, mask: Array, temperature: float = 1.0
) -> Array:
    """Hinton distillation term ``T² · mean_m KL(softmax(t/T) ‖ softmax(s/T))``

        KL(p ‖ q) = Σ_v p_v (log p_v − log q_v),  p = softmax(teacher/T),  q = softmax(student/T)

    The T² keeps the gradient scale independent of the temperature. The teacher gets no
    gradient.
    """
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    return temperature**2 * _mean(token_kl(t, s), mask)


def distillation_loss(
    student_logits: Array,
    teacher_logits: Array,
    targets: Array,
    mask: Array,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> tuple[Array, dict[str, Array]]:
    """``alpha · T² KL(teacher ‖ student at T) + (1 − alpha) · CE(student, targets)``."""
    kd = distillation_kl(student_logits, teacher_logits, mask, temperature)
    ce, aux = next_token_loss(student_logits, targets, mask)
    return alpha * kd + (1.0 - alpha) * ce, {"kd": kd, "ce": ce, "tokens": aux["tokens"]}
