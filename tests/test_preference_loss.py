"""Preference losses (jaxtrain.losses.preference) against NumPy references and hand values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.losses.preference import (
    LOSS_TYPES,
    METRIC_NAMES,
    preference_loss,
    preference_losses,
    sequence_logps,
)

B = 16


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_losses(pc, pr, rc, rr, beta, loss_type, eps):
    """Independent float64 reference of each loss (formulas as in TRL's DPOTrainer)."""
    rho = (pc - rc) - (pr - rr)
    h = beta * rho
    if loss_type == "sigmoid":
        return -(1 - eps) * _np_log_sigmoid(h) - eps * _np_log_sigmoid(-h)
    if loss_type == "robust":
        return (-(1 - eps) * _np_log_sigmoid(h) + eps * _np_log_sigmoid(-h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (rho - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - h)
    raise AssertionError(loss_type)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    # summed log-probs of responses: negative, tens of nats, policy near the reference
    ref = -rng.uniform(5, 40, size=(2, B))
    pol = ref + rng.normal(0, 3, size=(2, B))
    return [x.astype(np.float32) for x in (pol[0], pol[1], ref[0], ref[1])]


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5), ("robust", 0.0),
         ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0)]


@pytest.mark.parametrize("loss_type, eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_match_numpy(loss_type, eps, beta):
    pc, pr, rc, rr = _inputs()
    want = _np_losses(*(x.astype(np.float64) for x in (pc, pr, rc, rr)), beta, loss_type, eps)
    per_pair = preference_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                 label_smoothing=eps)
    np.testing.assert_allclose(np.asarray(per_pair), want, rtol=1e-5, atol=1e-5)
    loss, metrics = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                    label_smoothing=eps)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-5, atol=1e-6)
    assert tuple(metrics) == METRIC_NAMES


def test_robust_without_noise_is_sigmoid():
    args = _inputs(1)
    a, _ = preference_loss(*args, beta=0.3, loss_type="robust", label_smoothing=0.0)
    b, _ = preference_loss(*args, beta=0.3, loss_type="sigmoid")
    assert float(a) == float(b)


def test_metrics_by_hand():
    beta = 0.5
    pc = np.array([-1.0, -2.0, -3.0], np.float32)
    pr = np.array([-2.0, -1.0, -5.0], np.float32)
    rc = np.array([-1.5, -2.0, -2.0], np.float32)
    rr = np.array([-1.5, -2.0, -4.5], np.float32)
    # reward_c = 0.5 (pc - rc) = [0.25, 0, -0.5];  reward_r = 0.5 (pr - rr) = [-0.25, 0.5, -0.25]
    # margins h = [0.5, -0.5, -0.25];  chosen wins only in pair 0
    loss, m = preference_loss(pc, pr, rc, rr, beta=beta)
    want = {
        "rewards/chosen": (0.25 + 0.0 - 0.5) / 3,
        "rewards/rejected": (-0.25 + 0.5 - 0.25) / 3,
        "rewards/accuracies": 1 / 3,
        "rewards/margins": (0.5 - 0.5 - 0.25) / 3,
        "logps/chosen": -2.0,
        "logps/rejected": -8 / 3,
    }
    for k, v in want.items():
        assert float(m[k]) == pytest.approx(v, abs=1e-6), k
    # −log σ(h) = log(1 + e^{−h})
    sigmoid = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))
               + math.log1p(math.exp(0.25))) / 3
    assert float(loss) == pytest.approx(sigmoid, rel=1e-6)
    hinge, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    assert float(hinge) == pytest.approx((0.5 + 1.5 + 1.25) / 3, rel=1e-6)
    # rho = h / β = [1, -1, -0.5];  1/(2β) = 1
    ipo, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert float(ipo) == pytest.approx((0.0 + 4.0 + 2.25) / 3, rel=1e-6)
    # a tie is not an accuracy: rewards equal in every pair
    _, tie = preference_loss(pc, pc, rc, rc, beta=beta)
    assert float(tie["rewards/accuracies"]) == 0.0


@pytest.mark.parametrize("loss_type, eps", CASES)
def test_reference_gets_no_gradient(loss_type, eps):
    pc, pr, rc, rr = _inputs(2)

    def total(pc, pr, rc, rr):
        loss, metrics = preference_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type,
                                        label_smoothing=eps)
        return loss + sum(metrics.values())  # the metrics carry no gradient either

    grads = jax.grad(total, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)
    assert np.any(np.asarray(grads[0]) != 0)


def test_sigmoid_gradient_is_analytic():
    pc, pr, rc, rr = _inputs(3)
    beta = 0.25
    g = jax.grad(lambda x: preference_loss(x, pr, rc, rr, beta=beta)[0])(pc)
    h = beta * ((pc - rc) - (pr - rr)).astype(np.float64)
    sigmoid_neg_h = 1 / (1 + np.exp(h))
    np.testing.assert_allclose(np.asarray(g), -beta * sigmoid_neg_h / B, rtol=1e-4, atol=1e-7)


def test_jit_and_bad_arguments():
    args = _inputs(4)
    fn = jax.jit(lambda *a: preference_loss(*a, beta=0.1, loss_type="ipo"))
    loss, _ = fn(*args)
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match=r"Unknown preference loss_type 'kto'.*'sigmoid', "
                                         r"'robust', 'ipo', 'hinge'"):
        preference_loss(*args, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        preference_loss(*args, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="'sigmoid' and 'robust' only"):
        preference_loss(*args, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be positive"):
        preference_loss(*args, beta=0.0)
    assert set(LOSS_TYPES) == {"sigmoid", "robust", "ipo", "hinge"}


def test_sequence_logps_matches_numpy():
    rng = np.random.default_rng(5)
    n, t, v = 3, 6, 9
    logits = (3 * rng.standard_normal((n, t, v))).astype(np.float32)
    targets = rng.integers(0, v, size=(n, t)).astype(np.int32)
    mask = (rng.random((n, t)) < 0.5).astype(np.float32)
    mask[2] = 0.0  # an empty response sums to 0 over 0 tokens
    z = logits.astype(np.float64)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    got, count = sequence_logps(logits, targets, mask)
    assert got.dtype == count.dtype == jnp.float32 and got.shape == count.shape == (n,)
    np.testing.assert_allclose(np.asarray(got), (picked * mask).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(count), mask.sum(-1))
    assert float(got[2]) == 0.0 and float(count[2]) == 0.0
    # bf16 logits are promoted to float32 before the softmax
    got16, _ = sequence_logps(jnp.asarray(logits, jnp.bfloat16), targets, mask)
    assert got16.dtype == jnp.float32
