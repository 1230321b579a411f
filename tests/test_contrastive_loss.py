"""Tests for jaxtrain.losses.contrastive: dual-encoder losses against NumPy references.

Every reference is written here in NumPy (float64) from the docstring formulas, never by calling
the code under test; gradients are checked against central finite differences of those
references. The shard_map variants are checked on the 8 simulated devices against both the
NumPy references and the global (single-program) losses, values, metrics and gradients.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.losses.contrastive import (
    clip_loss,
    embedding_distillation_loss,
    info_nce_loss,
    sharded_info_nce_loss,
    sharded_siglip_loss,
    siglip_loss,
)
from jaxtrain.mesh import BATCH_AXES, make_mesh


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


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pairs(seed: int, b: int, d: int, n: int = 0):
    """Matched (query, key) rows with some structure, plus n hard negatives per row that lie
    near the row's key (so top-1 accuracies are neither 0 nor 1)."""
    rng = np.random.default_rng(seed)
    q = _normalize(rng.normal(size=(b, d)))
    k = _normalize(q + 0.6 * rng.normal(size=(b, d)))
    h = _normalize(k[:, None, :] + 1.5 * rng.normal(size=(b, n, d))) if n else None
    return q, k, h


def _np_candidates(k: np.ndarray, h: np.ndarray | None) -> np.ndarray:
    return k if h is None else np.concatenate([k, h.reshape(-1, k.shape[1])], axis=0)


def _np_info_nce(q, k, h, log_scale, max_scale=100.0, symmetric=True) -> dict:
    s = min(np.exp(log_scale), max_scale)
    idx = np.arange(len(q))
    q2k = s * (q @ _np_candidates(k, h).T)  # query i vs B keys then B·N hard negatives
    k2q = s * (k @ q.T)  # key j vs the B queries
    ce_q2k = -_np_log_softmax(q2k, axis=1)[idx, idx].mean()
    ce_k2q = -_np_log_softmax(k2q, axis=1)[idx, idx].mean()
    return {
        "loss": 0.5 * (ce_q2k + ce_k2q) if symmetric else ce_q2k,
        "q2k_acc": np.mean(q2k.argmax(axis=1) == idx),
        "k2q_acc": np.mean(k2q.argmax(axis=1) == idx),
        "temperature": 1.0 / s,
    }


def _np_siglip(q, k, h, log_scale, bias, max_scale=None) -> dict:
    t = np.exp(log_scale) if max_scale is None else min(np.exp(log_scale), max_scale)
    logits = t * (q @ _np_candidates(k, h).T) + bias
    z = -np.ones_like(logits)
    idx = np.arange(len(q))
    z[idx, idx] = 1.0
    log_sigmoid = -np.logaddexp(0.0, -z * logits)
    return {
        "loss": -log_sigmoid.sum() / len(q),
        "q2k_acc": np.mean(logits.argmax(axis=1) == idx),
        "temperature": 1.0 / t,
        "bias": bias,
    }


def _np_kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    log_p, log_q = _np_log_softmax(p_logits, axis=1), _np_log_softmax(q_logits, axis=1)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def _np_distill(sq, sk, tq, tk, s_scale, t_scale, temp=1.0, max_scale=100.0) -> dict:
    ls = min(np.exp(s_scale), max_scale) * (sq @ sk.T)
    lt = min(np.exp(t_scale), max_scale) * (tq @ tk.T)
    row = _np_kl_rows(lt / temp, ls / temp).mean()
    col = _np_kl_rows(lt.T / temp, ls.T / temp).mean()
    return {
        "distill_kl": temp**2 * 0.5 * (row + col),
        "distill_top1_agreement": np.mean(ls.argmax(axis=1) == lt.argmax(axis=1)),
    }


def _fd_grads(f, args: list, eps: float = 1e-6) -> list:
    """Central finite differences of the scalar f(*args) w.r.t. every element of every arg."""
    grads = []
    for a, x in enumerate(args):
        x = np.asarray(x, np.float64)
        g = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[i] += eps
            down[i] -= eps
            hi = f(*args[:a], up if x.ndim else float(up), *args[a + 1:])
            lo = f(*args[:a], down if x.ndim else float(down), *args[a + 1:])
            g[i] = (hi - lo) / (2 * eps)
        grads.append(g)
    return grads


def _assert_metrics(metrics: dict, ref: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(metrics) == set(ref)
    for name, value in ref.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=rtol, atol=atol, err_msg=name)


def _assert_grads(grads, ref, rtol: float = 1e-4, atol: float = 2e-5) -> None:
    for i, (g, r) in enumerate(zip(grads, ref, strict=True)):
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of argument {i}")
        assert np.abs(r).max() > 1e-3, f"reference gradient {i} is ~0: the check is vacuous"


f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
# Jitted once per configuration: one compile is much cheaper than op-by-op dispatch on CPU.
clip_jit = jax.jit(clip_loss, static_argnames="max_logit_scale")
info_nce_jit = jax.jit(info_nce_loss, static_argnames=("max_logit_scale", "symmetric"))
siglip_jit = jax.jit(siglip_loss, static_argnames="max_logit_scale")
distill_jit = jax.jit(
    embedding_distillation_loss, static_argnames=("temperature", "max_logit_scale")
)


# --------------------------------------------------------------------------------------------
# clip_loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "log_scale,max_scale",
    [(np.log(1 / 0.07), 100.0), (np.log(200.0), 100.0), (np.log(200.0), 50.0), (0.0, 100.0)],
)
def test_clip_matches_numpy_reference(log_scale: float, max_scale: float) -> None:
    rng = np.random.default_rng(0)
    x, y = _unit(rng, 12, 8), _unit(rng, 12, 8)
    y = 0.7 * x + 0.3 * y  # some structure so accuracies are non-trivial
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    loss, metrics = clip_jit(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.float32),
        jnp.float32(log_scale),
        max_logit_scale=max_scale,
    )
    ref = _np_clip_loss(x, y, log_scale, max_scale)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5, atol=1e-5)
    for key in ("loss", "i2t_acc", "t2i_acc", "temperature"):
        np.testing.assert_allclose(float(metrics[key]), ref[key], rtol=1e-5, atol=1e-6)


def test_clip_asymmetric_directions_differ() -> None:
    # Non-symmetric similarity: row and column softmaxes give different CE terms.
    rng = np.random.default_rng(1)
    x, y = _unit(rng, 6, 4), _unit(rng, 6, 4)
    loss, _ = clip_jit(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.0))
    ref = _np_clip_loss(x, y, 2.0, 100.0)["loss"]
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    swapped, _ = clip_jit(jnp.asarray(y), jnp.asarray(x), jnp.float32(2.0))
    np.testing.assert_allclose(float(swapped), float(loss), rtol=1e-5)


def test_clip_bfloat16_inputs_computed_in_float32() -> None:
    rng = np.random.default_rng(2)
    x, y = _unit(rng, 8, 16), _unit(rng, 8, 16)
    xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    loss, metrics = clip_jit(xb, yb, jnp.float32(3.0))
    assert loss.dtype == jnp.float32
    ref = _np_clip_loss(np.asarray(xb, np.float32), np.asarray(yb, np.float32), 3.0, 100.0)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5)
    assert metrics["temperature"].dtype == jnp.float32


def test_clip_grad_logit_scale_matches_finite_differences() -> None:
    rng = np.random.default_rng(3)
    x = jnp.asarray(_unit(rng, 10, 8), jnp.float32)
    y = jnp.asarray(_unit(rng, 10, 8), jnp.float32)

    def f(t):
        return clip_loss(x, y, t)[0]

    t0 = 1.5
    grad = float(jax.jit(jax.grad(f))(jnp.float32(t0)))
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    eps = 1e-4
    fd = (
        _np_clip_loss(x64, y64, t0 + eps, 100.0)["loss"]
        - _np_clip_loss(x64, y64, t0 - eps, 100.0)["loss"]
    ) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)
    assert abs(grad) > 1e-3


def test_clip_grad_is_zero_when_scale_clipped() -> None:
    rng = np.random.default_rng(4)
    x = jnp.asarray(_unit(rng, 6, 4), jnp.float32)
    y = jnp.asarray(_unit(rng, 6, 4), jnp.float32)
    grad = jax.jit(jax.grad(lambda t: clip_loss(x, y, t, max_logit_scale=10.0)[0]))(
        jnp.float32(5.0)
    )
    assert float(grad) == 0.0


def test_clip_perfect_alignment_large_scale() -> None:
    x = jnp.eye(8, 16, dtype=jnp.float32)  # orthonormal rows
    loss, metrics = clip_jit(x, x, jnp.float32(np.log(100.0)))
    assert float(loss) < 1e-6
    assert float(metrics["i2t_acc"]) == 1.0
    assert float(metrics["t2i_acc"]) == 1.0
    np.testing.assert_allclose(float(metrics["temperature"]), 0.01, rtol=1e-5)


def test_clip_jit_and_shape_errors() -> None:
    rng = np.random.default_rng(5)
    x = jnp.asarray(_unit(rng, 4, 4), jnp.float32)
    loss, _ = jax.jit(clip_loss)(x, x, jnp.float32(1.0))
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="equal shapes"):
        clip_loss(x, x[:3], jnp.float32(1.0))
    with pytest.raises(ValueError, match="scalar"):
        clip_loss(x, x, jnp.ones((1,)))


# --------------------------------------------------------------------------------------------
# info_nce_loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "symmetric,n_hard,log_scale,max_scale",
    [
        (True, 0, np.log(10.0), 100.0),
        (True, 2, np.log(30.0), 20.0),  # clipped scale
        (False, 2, np.log(10.0), 100.0),
        (False, 0, np.log(30.0), 20.0),
    ],
)
def test_info_nce_matches_numpy(symmetric, n_hard, log_scale, max_scale) -> None:
    q, k, h = _pairs(10, 8, 6, n_hard)
    loss, metrics = info_nce_jit(
        f32(q), f32(k), jnp.float32(log_scale), max_scale,
        hard_negatives=None if h is None else f32(h), symmetric=symmetric,
    )
    ref = _np_info_nce(q, k, h, log_scale, max_scale, symmetric)
    assert 0.0 < ref["q2k_acc"] < 1.0 and 0.0 < ref["k2q_acc"] < 1.0
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5)
    _assert_metrics(metrics, ref)


def test_info_nce_hard_negatives_are_shared_by_the_batch() -> None:
    # A hard negative mined for row 1 that equals query 0 beats query 0's own key: under the
    # batch-wide (MultipleNegativesRankingLoss) convention it is a candidate for every query.
    q = np.eye(4, 8)
    k = _normalize(q + 0.5 * np.eye(4, 8, k=4))
    h = np.zeros((4, 1, 8))
    h[:, 0, 7] = 1.0  # orthogonal to every query
    h[1, 0] = q[0]
    loss, metrics = info_nce_jit(f32(q), f32(k), jnp.float32(np.log(10.0)), hard_negatives=f32(h))
    assert float(metrics["q2k_acc"]) == 0.75  # query 0 now retrieves hard negative 1
    assert float(metrics["k2q_acc"]) == 1.0  # hard negatives are never queries
    np.testing.assert_allclose(float(loss), _np_info_nce(q, k, h, np.log(10.0))["loss"], rtol=1e-5)


@pytest.mark.parametrize("symmetric,n_hard", [(True, 2), (False, 2), (True, 0)])
def test_info_nce_gradients_match_finite_differences(symmetric, n_hard) -> None:
    q, k, h = _pairs(11, 6, 4, n_hard)
    log_scale = np.log(8.0)
    args = [q, k, log_scale] + ([h] if n_hard else [])

    def ref(q, k, s, h=None):
        return _np_info_nce(q, k, h, s, symmetric=symmetric)["loss"]

    def loss(q, k, s, h=None):
        return info_nce_loss(q, k, s, hard_negatives=h, symmetric=symmetric)[0]

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*map(f32, args))
    _assert_grads(grads, _fd_grads(ref, args))


# --------------------------------------------------------------------------------------------
# siglip_loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_hard,log_scale,bias,max_scale",
    [(0, np.log(10.0), -10.0, None), (3, np.log(10.0), -10.0, None), (3, np.log(50.0), -2.0, 20.0)],
)
def test_siglip_matches_numpy(n_hard, log_scale, bias, max_scale) -> None:
    q, k, h = _pairs(20, 8, 6, n_hard)
    loss, metrics = siglip_jit(
        f32(q), f32(k), jnp.float32(log_scale), jnp.float32(bias),
        hard_negatives=None if h is None else f32(h), max_logit_scale=max_scale,
    )
    ref = _np_siglip(q, k, h, log_scale, bias, max_scale)
    assert 0.0 < ref["q2k_acc"] < 1.0
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5)
    _assert_metrics(metrics, ref)


@pytest.mark.parametrize("n_hard", [0, 2])
def test_siglip_gradients_match_finite_differences(n_hard) -> None:
    q, k, h = _pairs(21, 6, 4, n_hard)
    args = [q, k, np.log(5.0), -1.5] + ([h] if n_hard else [])

    def ref(q, k, s, b, h=None):
        return _np_siglip(q, k, h, s, b)["loss"]

    def loss(q, k, s, b, h=None):
        return siglip_loss(q, k, s, b, hard_negatives=h)[0]

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*map(f32, args))
    _assert_grads(grads, _fd_grads(ref, args))


def test_siglip_scale_gradient_is_zero_when_clipped() -> None:
    q, k, _ = _pairs(22, 6, 4)
    q, k = f32(q), f32(k)
    g = jax.jit(jax.grad(lambda s: siglip_loss(q, k, s, jnp.float32(0.0), max_logit_scale=10.0)[0]))
    assert float(g(jnp.float32(np.log(20.0)))) == 0.0
    assert abs(float(g(jnp.float32(np.log(5.0))))) > 1e-3


# --------------------------------------------------------------------------------------------
# sharded (shard_map) variants == global losses
# --------------------------------------------------------------------------------------------

_B, _D, _N = 16, 8, 2
_MESHES = {"data8": dict(data=8), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


@functools.cache
def _mesh(name: str):
    axes = dict(data=1, fsdp=1, tensor=1, expert=1) | _MESHES[name]
    return make_mesh(ml_collections.ConfigDict(axes))


def _place(mesh, *arrays):
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return [None if a is None else jax.device_put(f32(a), sharding) for a in arrays]


def _value_and_grads(fn, args):
    """jit(value_and_grad) w.r.t. every argument of fn; the loss's metrics as aux."""
    vg = jax.value_and_grad(fn, argnums=tuple(range(len(args))), has_aux=True)
    return jax.jit(vg)(*args)


@functools.cache
def _global_info_nce(symmetric: bool, n_hard: int):
    q, k, h = _pairs(30, _B, _D, n_hard)
    args = [f32(q), f32(k), jnp.float32(np.log(10.0))] + ([f32(h)] if n_hard else [])

    def fn(q, k, s, h=None):
        return info_nce_loss(q, k, s, hard_negatives=h, symmetric=symmetric)

    return (q, k, h), _value_and_grads(fn, args)


@pytest.mark.parametrize("mesh_name", list(_MESHES))
@pytest.mark.parametrize("symmetric,n_hard", [(True, 0), (True, _N), (False, _N)])
def test_sharded_info_nce_equals_global(mesh_name, symmetric, n_hard) -> None:
    mesh = _mesh(mesh_name)
    (q, k, h), ((want_loss, want_metrics), want_grads) = _global_info_nce(symmetric, n_hard)
    ref = _np_info_nce(q, k, h, np.log(10.0), symmetric=symmetric)
    assert 0.0 < ref["q2k_acc"] < 1.0 and 0.0 < ref["k2q_acc"] < 1.0

    def fn(q, k, s, h=None):
        return sharded_info_nce_loss(q, k, s, mesh=mesh, hard_negatives=h, symmetric=symmetric)

    qs, ks, hs = _place(mesh, q, k, h)
    args = [qs, ks, jnp.float32(np.log(10.0))] + ([hs] if n_hard else [])
    (loss, metrics), grads = _value_and_grads(fn, args)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5)
    _assert_metrics(metrics, ref)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    _assert_metrics(metrics, {n: float(v) for n, v in want_metrics.items()}, rtol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@functools.cache
def _global_siglip(n_hard: int):
    q, k, h = _pairs(31, _B, _D, n_hard)
    args = [f32(q), f32(k), jnp.float32(np.log(10.0)), jnp.float32(-3.0)]
    args += [f32(h)] if n_hard else []

    def fn(q, k, s, b, h=None):
        return siglip_loss(q, k, s, b, hard_negatives=h)

    return (q, k, h), _value_and_grads(fn, args)


@pytest.mark.parametrize("mesh_name", list(_MESHES))
@pytest.mark.parametrize("n_hard", [0, _N])
def test_sharded_siglip_equals_global(mesh_name, n_hard) -> None:
    mesh = _mesh(mesh_name)
    (q, k, h), ((want_loss, want_metrics), want_grads) = _global_siglip(n_hard)
    ref = _np_siglip(q, k, h, np.log(10.0), -3.0)
    assert 0.0 < ref["q2k_acc"] < 1.0

    def fn(q, k, s, b, h=None):
        return sharded_siglip_loss(q, k, s, b, mesh=mesh, hard_negatives=h)

    qs, ks, hs = _place(mesh, q, k, h)
    args = [qs, ks, jnp.float32(np.log(10.0)), jnp.float32(-3.0)] + ([hs] if n_hard else [])
    (loss, metrics), grads = _value_and_grads(fn, args)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5)
    _assert_metrics(metrics, ref)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    _assert_metrics(metrics, {n: float(v) for n, v in want_metrics.items()}, rtol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every matmul in a jaxpr, nested jaxprs (shard_map, pjit) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    shapes += _dot_shapes(sub)
    return shapes


def test_sharded_losses_hold_only_a_local_logits_block() -> None:
    mesh = _mesh("data2_fsdp2_tensor2")  # 4 devices over the batch axes
    q, k, h = _place(mesh, *_pairs(32, _B, _D, _N))
    s = jnp.float32(1.0)
    local, cands = _B // 4, _B + _B * _N
    jaxpr = jax.make_jaxpr(
        lambda q, k, h: sharded_info_nce_loss(q, k, s, mesh=mesh, hard_negatives=h)
    )(q, k, h).jaxpr
    assert sorted(_dot_shapes(jaxpr)) == [(local, _B), (local, cands)]
    jaxpr = jax.make_jaxpr(
        lambda q, k, h: sharded_siglip_loss(q, k, s, s, mesh=mesh, hard_negatives=h)
    )(q, k, h).jaxpr
    assert _dot_shapes(jaxpr) == [(local, cands)]
    jaxpr = jax.make_jaxpr(lambda q, k, h: info_nce_loss(q, k, s, hard_negatives=h))(q, k, h)
    assert _dot_shapes(jaxpr.jaxpr) == [(_B, cands)]  # the global version, for contrast


# --------------------------------------------------------------------------------------------
# embedding_distillation_loss
# --------------------------------------------------------------------------------------------


def _distill_inputs(seed: int, b: int = 6):
    rng = np.random.default_rng(seed)
    tq, tk, _ = _pairs(seed, b, 8)  # teacher: width 8
    sq = _normalize(rng.normal(size=(b, 4)))  # student: width 4
    sk = _normalize(sq + rng.normal(size=(b, 4)))
    return sq, sk, tq, tk


@pytest.mark.parametrize(
    "temp,s_scale,t_scale,max_scale",
    [(1.0, np.log(10.0), np.log(20.0), 100.0), (2.0, np.log(5.0), np.log(200.0), 50.0)],
)
def test_distillation_matches_numpy(temp, s_scale, t_scale, max_scale) -> None:
    sq, sk, tq, tk = _distill_inputs(40, 8)
    loss, metrics = distill_jit(
        f32(sq), f32(sk), f32(tq), f32(tk), jnp.float32(s_scale), jnp.float32(t_scale),
        temperature=temp, max_logit_scale=max_scale,
    )
    ref = _np_distill(sq, sk, tq, tk, s_scale, t_scale, temp, max_scale)
    assert ref["distill_kl"] > 0.05 and 0.0 < ref["distill_top1_agreement"] < 1.0
    np.testing.assert_allclose(float(loss), ref["distill_kl"], rtol=1e-5)
    _assert_metrics(metrics, ref)


def test_distillation_gradients_match_finite_differences_and_spare_the_teacher() -> None:
    sq, sk, tq, tk = _distill_inputs(41)
    args = [sq, sk, np.log(6.0), tq, tk, np.log(12.0)]

    def ref(sq, sk, ss, tq, tk, ts):
        return _np_distill(sq, sk, tq, tk, ss, ts, temp=1.5)["distill_kl"]

    def loss(sq, sk, ss, tq, tk, ts):
        return embedding_distillation_loss(sq, sk, tq, tk, ss, ts, temperature=1.5)[0]

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*map(f32, args))
    _assert_grads(grads[:3], _fd_grads(lambda sq, sk, ss: ref(sq, sk, ss, *args[3:]), args[:3]))
    for g in grads[3:]:  # the teacher is frozen inside the loss
        assert not np.any(np.asarray(g))


def test_distillation_is_zero_with_zero_gradient_when_student_is_teacher() -> None:
    _, _, q, k = _distill_inputs(42)
    q, k, s = f32(q), f32(k), jnp.float32(np.log(15.0))

    def loss(sq, sk, ss):
        return embedding_distillation_loss(sq, sk, q, k, ss, s, temperature=2.0)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (value, metrics), grads = value_and_grad(q, k, s)
    assert abs(float(value)) < 1e-6
    assert float(metrics["distill_top1_agreement"]) == 1.0
    for g in grads:
        np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-5)
    # ... and not for a perturbed student (the zero above is not vacuous).
    _, grads = value_and_grad(q, k, s + 0.5)
    assert max(float(jnp.abs(g).max()) for g in grads) > 1e-3


# --------------------------------------------------------------------------------------------
# dtypes, jit, errors
# --------------------------------------------------------------------------------------------


def test_new_losses_compute_in_float32_from_bfloat16_under_jit() -> None:
    q, k, h = _pairs(50, 8, 8, 1)
    qb, kb, hb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, h))
    q32, k32, h32 = (np.asarray(a, np.float64) for a in (qb, kb, hb))
    s = jnp.float32(np.log(10.0))
    loss, _ = jax.jit(lambda q, k, h: info_nce_loss(q, k, s, hard_negatives=h))(qb, kb, hb)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), _np_info_nce(q32, k32, h32, np.log(10.0))["loss"],
                               rtol=1e-5)
    loss, _ = jax.jit(lambda q, k: siglip_loss(q, k, s, jnp.float32(-5.0)))(qb, kb)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), _np_siglip(q32, k32, None, np.log(10.0), -5.0)["loss"],
                               rtol=1e-5)
    loss, _ = jax.jit(lambda a, b: embedding_distillation_loss(a, b, kb, qb, s, s))(qb, kb)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(
        float(loss), _np_distill(q32, k32, k32, q32, np.log(10.0), np.log(10.0))["distill_kl"],
        rtol=1e-5,
    )


def test_shape_errors_name_the_argument() -> None:
    x = jnp.zeros((8, 4))
    s = jnp.float32(0.0)
    with pytest.raises(ValueError, match=r"query and key .* query \(8, 4\) and key \(6, 4\)"):
        info_nce_loss(x, x[:6], s)
    with pytest.raises(ValueError, match=r"hard_negatives must be \[B, N, D\] = \[8, N, 4\]"):
        info_nce_loss(x, x, s, hard_negatives=jnp.zeros((8, 2, 5)))
    with pytest.raises(ValueError, match="hard_negatives"):
        siglip_loss(x, x, s, s, hard_negatives=jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        siglip_loss(x, x, s, jnp.zeros((1,)))
    with pytest.raises(ValueError, match=r"teacher_query and teacher_key"):
        embedding_distillation_loss(x, x, x, x[:, :3], s, s)
    with pytest.raises(ValueError, match=r"student_query \(8, 4\) and teacher_query \(6, 4\)"):
        embedding_distillation_loss(x, x, x[:6], x[:6], s, s)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        embedding_distillation_loss(x, x, x, x, s, s, temperature=0.0)
    mesh = _mesh("data2_fsdp2_tensor2")
    with pytest.raises(ValueError, match=r"batch size 6 does not divide by the 4 devices"):
        sharded_info_nce_loss(x[:6], x[:6], s, mesh=mesh)
    with pytest.raises(ValueError, match=r"lacks"):
        sharded_siglip_loss(x, x, s, s, mesh=mesh, batch_axes=("batch",))
