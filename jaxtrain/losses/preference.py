"""Preference-optimisation losses (the DPO family): pure functions of sequence log-probs.

Inputs are per-sequence summed log-probabilities of the responses, float32 [B]: the policy's
``π_c = log π(y_c | x)`` and ``π_r = log π(y_r | x)`` of the chosen and rejected responses and
the frozen reference model's ``ref_c``, ``ref_r`` (see :func:`sequence_logps`). With

    ρ = (π_c − ref_c) − (π_r − ref_r)      (the log-ratio difference, TRL's ``logits``)
    h = β · ρ                              (the implicit reward margin)

the per-pair losses of :data:`LOSS_TYPES` are (ε = ``label_smoothing``):

- ``"sigmoid"`` (DPO, Rafailov et al. 2023; with ε > 0 conservative DPO, Mitchell 2023, as
  TRL's ``label_smoothing``):  −(1 − ε) · log σ(h) − ε · log σ(−h);
- ``"robust"`` (robust DPO, Chowdhury et al. 2024, TRL's ``"robust"``):
  (−(1 − ε) · log σ(h) + ε · log σ(−h)) / (1 − 2ε), an unbiased loss under label noise ε;
- ``"ipo"`` (IPO, Azar et al. 2023, eq. 17; β is the paper's τ):  (ρ − 1/(2β))², on the plain
  summed log-ratios (TRL divides the log-probs by the response lengths first; pass
  length-normalised log-probs here for that variant);
- ``"hinge"`` (SLiC, Zhao et al. 2023):  relu(1 − h).

The loss is the mean over the B pairs. The reference log-probs get no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtrain.losses.lm import token_cross_entropy

Array = jax.Array

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "ipo", "hinge")
METRIC_NAMES: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def sequence_logps(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """``(Σ_t mask_t · log softmax(z_t)[y_t], Σ_t mask_t)``, both float32 [N].

    logits [N, T, V] (computed in float32), targets [N, T] ints, mask [N, T] (1 = the target is
    a response token). The first output is the summed log-probability of each response, the
    second its number of tokens (divide by it for length-normalised log-probs).
    """
    mask = mask.astype(jnp.float32)
    nll, _ = token_cross_entropy(logits, targets)  # logsumexp(z) − z[y] = −log softmax(z)[y]
    return -jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def _check_label_smoothing(loss_type: str, label_smoothing: float) -> None:
    eps = float(label_smoothing)
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for 'sigmoid', got {eps}.")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust' (it divides by "
                         f"1 − 2ε), got {eps}.")
    if loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'robust' only; "
                         f"loss_type {loss_type!r} got label_smoothing={eps}.")


def preference_losses(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Array:
    """The per-pair losses [B] of ``loss_type`` (formulas: module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown preference loss_type {loss_type!r}; valid: {list(LOSS_TYPES)}.")
    _check_label_smoothing(loss_type, label_smoothing)
    if isinstance(beta, int | float) and beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    f32 = jnp.float32
    ref_c = jax.lax.stop_gradient(jnp.asarray(ref_chosen, f32))
    ref_r = jax.lax.stop_gradient(jnp.asarray(ref_rejected, f32))
    rho = (jnp.asarray(policy_chosen, f32) - ref_c) - (jnp.asarray(policy_rejected, f32) - ref_r)
    h = beta * rho
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(h)
        if eps:
            losses = (1.0 - eps) * losses - eps * jax.nn.log_sigmoid(-h)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(h) + eps * jax.nn.log_sigmoid(-h)) / (
            1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (rho - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = jax.nn.relu(1.0 - h)
    return losses


def preference_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Mean preference loss over the B pairs, and TRL's metrics (scalars, no gradient):

        rewards/chosen     = mean β(π_c − ref_c)         rewards/rejected = mean β(π_r − ref_r)
        rewards/accuracies = mean [β(π_c − ref_c) > β(π_r − ref_r)]
        rewards/margins    = mean (β(π_c − ref_c) − β(π_r − ref_r))
        logps/chosen       = mean π_c                    logps/rejected   = mean π_r

    ``loss_type`` is one of :data:`LOSS_TYPES` (else ValueError); ``label_smoothing`` ε is
    used by ``"sigmoid"`` (0 ≤ ε ≤ 0.5) and ``"robust"`` (0 ≤ ε < 0.5) and must be 0 for the
    others. ``beta`` > 0.
    """
    losses = preference_losses(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )
    sg = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    pi_c, pi_r = sg(policy_chosen), sg(policy_rejected)
    reward_c = beta * (pi_c - sg(ref_chosen))
    reward_r = beta * (pi_r - sg(ref_rejected))
    metrics = {
        "rewards/chosen": jnp.mean(reward_c),
        "rewards/rejected": jnp.mean(reward_r),
        "rewards/accuracies": jnp.mean((reward_c > reward_r).astype(jnp.float32)),
        "rewards/margins": jnp.mean(reward_c - reward_r),
        "logps/chosen": jnp.mean(pi_c),
        "logps/rejected": jnp.mean(pi_r),
    }
    return jnp.mean(losses), metrics
