"""Language-model losses (jaxtrain.losses.lm) against independent NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.losses.lm import (
    distillation_kl,
    distillation_loss,
    next_token_loss,
    token_cross_entropy,
)

B, T, V = 3, 7, 11


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))
    return z - lse


def _np_lse(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[..., None]).sum(axis=-1))


def _np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_np_log_softmax(z))


def _data(seed: int = 0, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.6).astype(np.int32)
    mask[0, 0] = 1  # at least one counted target
    mask[1, 1] = 0  # at least one ignored target
    return logits, targets, mask


def _np_ce(logits, targets, mask):
    logp = _np_log_softmax(logits)
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * mask).sum() / mask.sum()


def _np_kl(student, teacher, mask, temp):
    log_p = _np_log_softmax(teacher / temp)
    log_q = _np_log_softmax(student / temp)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return temp**2 * (kl * mask).sum() / mask.sum()


def test_token_cross_entropy_matches_numpy():
    logits, targets, _ = _data()
    ce, lse = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    logp = _np_log_softmax(logits)
    ref = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    assert ce.shape == lse.shape == (B, T)
    np.testing.assert_allclose(np.asarray(ce), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), _np_lse(logits), rtol=1e-5, atol=1e-5)


def test_token_cross_entropy_bf16_logits_computed_in_fp32():
    logits, targets, _ = _data(1)
    bf = jnp.asarray(logits).astype(jnp.bfloat16)
    ce, _ = token_cross_entropy(bf, jnp.asarray(targets))
    assert ce.dtype == jnp.float32
    ref_logits = np.asarray(bf.astype(jnp.float32))
    ref = -np.take_along_axis(_np_log_softmax(ref_logits), targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(ce), ref, rtol=1e-5, atol=1e-5)


def test_next_token_loss_masked_mean_matches_numpy():
    logits, targets, mask = _data()
    loss, aux = next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    ref = _np_ce(logits, targets, mask)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(aux["ce"]), ref, rtol=1e-5)
    assert float(aux["tokens"]) == mask.sum()
    # An unmasked mean would differ (the reference really depends on the mask).
    assert abs(ref - _np_ce(logits, targets, np.ones_like(mask))) > 1e-3


def test_masked_positions_do_not_change_loss_or_get_gradient():
    logits, targets, mask = _data(2)
    perturbed = logits.copy()
    rng = np.random.default_rng(5)
    off = mask == 0
    perturbed[off] += 50.0 * rng.standard_normal((off.sum(), V)).astype(np.float32)
    targets2 = targets.copy()
    targets2[off] = (targets2[off] + 3) % V

    def f(z, y):
        return next_token_loss(z, jnp.asarray(y), jnp.asarray(mask), z_loss=1e-2)[0]

    a = f(jnp.asarray(logits), targets)
    b = f(jnp.asarray(perturbed), targets2)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    g = np.asarray(jax.grad(f)(jnp.asarray(logits), targets))
    assert np.all(g[off] == 0)
    assert np.any(g[~off] != 0)
    # ... and perturbing a counted position does change it.
    perturbed2 = logits.copy()
    perturbed2[0, 0] += 5.0 * rng.standard_normal(V).astype(np.float32)
    assert abs(float(f(jnp.asarray(perturbed2), targets)) - float(a)) > 1e-4


def test_z_loss_term_matches_numpy():
    logits, targets, mask = _data(3)
    coef = 1e-3
    loss, aux = next_token_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=coef)
    zl = (_np_lse(logits) ** 2 * mask).sum() / mask.sum()
    ce = _np_ce(logits, targets, mask)
    np.testing.assert_allclose(float(aux["z_loss"]), zl, rtol=1e-5)
    np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce + coef * zl, rtol=1e-5)
    assert coef * zl > 1e-3  # the term is visible at this tolerance
    # z_loss=0 gives the plain cross-entropy (the z statistic is still reported).
    loss0, aux0 = next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(loss0), ce, rtol=1e-5)
    np.testing.assert_allclose(float(aux0["z_loss"]), zl, rtol=1e-5)


def test_next_token_loss_gradient_matches_softmax_minus_onehot():
    logits, targets, mask = _data(4)
    g = jax.grad(lambda z: next_token_loss(z, jnp.asarray(targets), jnp.asarray(mask))[0])(
        jnp.asarray(logits))
    ref = (_np_softmax(logits) - np.eye(V)[targets]) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-6)


def test_all_masked_is_zero_not_nan():
    logits, targets, mask = _data(5)
    loss, aux = next_token_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.zeros_like(jnp.asarray(mask)), z_loss=1.0)
    assert float(loss) == 0.0 and float(aux["tokens"]) == 0.0


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_distillation_kl_matches_numpy(temp):
    s, _, mask = _data(6)
    t, _, _ = _data(7)
    out = distillation_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), temp)
    ref = _np_kl(s, t, mask, temp)
    np.testing.assert_allclose(float(out), ref, rtol=1e-4, atol=1e-6)
    assert ref > 1e-2
    # Without the T² factor the value would be off for T != 1.
    if temp != 1.0:
        assert abs(float(out) - ref / temp**2) > 1e-3


def test_distillation_kl_zero_for_identical_logits():
    s, _, mask = _data(8)
    out = distillation_kl(jnp.asarray(s), jnp.asarray(s), jnp.asarray(mask), 3.0)
    assert abs(float(out)) < 1e-5


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_distillation_kl_gradients(temp):
    s, _, mask = _data(9)
    t, _, _ = _data(10)
    fn = lambda a, b: distillation_kl(a, b, jnp.asarray(mask), temp)  # noqa: E731
    gs, gt = jax.grad(fn, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    # d/ds [T² KL(p || softmax(s/T))] = T (q − p), averaged over the M counted tokens.
    ref = temp * (_np_softmax(s / temp) - _np_softmax(t / temp)) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(np.asarray(gs), ref, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(gt) == 0)  # the teacher is a constant
    # Finite-difference check of one coordinate against the NumPy reference of the value.
    eps, idx = 1e-3, (0, 0, 3)
    sp, sm = s.astype(np.float64).copy(), s.astype(np.float64).copy()
    sp[idx] += eps
    sm[idx] -= eps
    fd = (_np_kl(sp, t, mask, temp) - _np_kl(sm, t, mask, temp)) / (2 * eps)
    np.testing.assert_allclose(float(gs[idx]), fd, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_mixes_by_alpha(alpha):
    s, targets, mask = _data(11)
    t, _, _ = _data(12)
    temp = 2.0
    loss, aux = distillation_loss(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(targets), jnp.asarray(mask),
        alpha=alpha, temperature=temp)
    kd = _np_kl(s, t, mask, temp)
    ce = _np_ce(s, targets, mask)
    np.testing.assert_allclose(float(aux["kd"]), kd, rtol=1e-4)
    np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), alpha * kd + (1 - alpha) * ce, rtol=1e-4)
    assert float(aux["tokens"]) == mask.sum()
    assert abs(kd - ce) > 1e-2  # the mix is distinguishable
