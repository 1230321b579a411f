"""Tests for jaxtrain.losses.contrastive.clip_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.losses.contrastive import clip_loss


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _np_clip_loss(x: np.ndarray, y: np.ndarray, log_scale: float, max_scale: float) -> dict:
    s = min(np.exp(log_scale), max_scale)
    logits = s * (x.astype(np.float64) @ y.astype(np.float64).T)
    n = logits.shape[0]
    idx = np.arange(n)
    row = -_np_log_softmax(logits, axis=1)[idx, idx].mean()
    col = -_np_log_softmax(logits.T, axis=1)[idx, idx].mean()
    return {
        "loss": 0.5 * (row + col),
        "i2t_acc": np.mean(logits.argmax(axis=1) == idx),
        "t2i_acc": np.mean(logits.argmax(axis=0) == idx),
        "temperature": 1.0 / s,
    }


@pytest.mark.parametrize(
    "log_scale,max_scale",
    [(np.log(1 / 0.07), 100.0), (np.log(200.0), 100.0), (np.log(200.0), 50.0), (0.0, 100.0)],
)
def test_matches_numpy_reference(log_scale: float, max_scale: float) -> None:
    rng = np.random.default_rng(0)
    x, y = _unit(rng, 12, 8), _unit(rng, 12, 8)
    y = 0.7 * x + 0.3 * y  # some structure so accuracies are non-trivial
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    loss, metrics = clip_loss(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.float32),
        jnp.float32(log_scale),
        max_logit_scale=max_scale,
    )
    ref = _np_clip_loss(x, y, log_scale, max_scale)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5, atol=1e-5)
    for key in ("loss", "i2t_acc", "t2i_acc", "temperature"):
        np.testing.assert_allclose(float(metrics[key]), ref[key], rtol=1e-5, atol=1e-6)


def test_asymmetric_directions_differ() -> None:
    # Non-symmetric similarity: row and column softmaxes give different CE terms.
    rng = np.random.default_rng(1)
    x, y = _unit(rng, 6, 4), _unit(rng, 6, 4)
    loss, _ = clip_loss(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.0))
    ref = _np_clip_loss(x, y, 2.0, 100.0)["loss"]
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    swapped, _ = clip_loss(jnp.asarray(y), jnp.asarray(x), jnp.float32(2.0))
    np.testing.assert_allclose(float(swapped), float(loss), rtol=1e-5)


def test_bfloat16_inputs_computed_in_float32() -> None:
    rng = np.random.default_rng(2)
    x, y = _unit(rng, 8, 16), _unit(rng, 8, 16)
    xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    loss, metrics = clip_loss(xb, yb, jnp.float32(3.0))
    assert loss.dtype == jnp.float32
    ref = _np_clip_loss(np.asarray(xb, np.float32), np.asarray(yb, np.float32), 3.0, 100.0)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5)
    assert metrics["temperature"].dtype == jnp.float32


def test_grad_logit_scale_matches_finite_differences() -> None:
    rng = np.random.default_rng(3)
    x = jnp.asarray(_unit(rng, 10, 8), jnp.float32)
    y = jnp.asarray(_unit(rng, 10, 8), jnp.float32)

    def f(t):
        return clip_loss(x, y, t)[0]

    t0 = 1.5
    grad = float(jax.grad(f)(jnp.float32(t0)))
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    eps = 1e-4
    fd = (
        _np_clip_loss(x64, y64, t0 + eps, 100.0)["loss"]
        - _np_clip_loss(x64, y64, t0 - eps, 100.0)["loss"]
    ) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)
    assert abs(grad) > 1e-3


def test_grad_is_zero_when_scale_clipped() -> None:
    rng = np.random.default_rng(4)
    x = jnp.asarray(_unit(rng, 6, 4), jnp.float32)
    y = jnp.asarray(_unit(rng, 6, 4), jnp.float32)
    grad = jax.grad(lambda t: clip_loss(x, y, t, max_logit_scale=10.0)[0])(jnp.float32(5.0))
    assert float(grad) == 0.0


def test_perfect_alignment_large_scale() -> None:
    x = jnp.eye(8, 16, dtype=jnp.float32)  # orthonormal rows
    loss, metrics = clip_loss(x, x, jnp.float32(np.log(100.0)))
    assert float(loss) < 1e-6
    assert float(metrics["i2t_acc"]) == 1.0
    assert float(metrics["t2i_acc"]) == 1.0
    np.testing.assert_allclose(float(metrics["temperature"]), 0.01, rtol=1e-5)


def test_jit_and_shape_errors() -> None:
    rng = np.random.default_rng(5)
    x = jnp.asarray(_unit(rng, 4, 4), jnp.float32)
    loss, _ = jax.jit(clip_loss)(x, x, jnp.float32(1.0))
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="equal shapes"):
        clip_loss(x, x[:3], jnp.float32(1.0))
    with pytest.raises(ValueError, match="scalar"):
        clip_loss(x, x, jnp.ones((1,)))
