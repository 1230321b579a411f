"""MoE routing: router losses (jaxtrain.losses.router), GShard dispatch
(jaxtrain.models.moe.dispatch_and_combine) and the MoE module's capacity path with the router
losses of its statistics, against NumPy / plain-loop references (the dropless path:
tests/test_moe_dropless.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.losses import router
from jaxtrain.models.moe import MoE
from jaxtrain.models.moe import dispatch_and_combine as _dispatch_and_combine

# Jitted: one compile per function and shape instead of one per eager op (faster on 2 cores).
expert_fractions = jax.jit(router.expert_fractions, static_argnums=1)
load_balance_loss = jax.jit(router.load_balance_loss)
balance_deviation_loss = jax.jit(router.balance_deviation_loss)
router_z_loss = jax.jit(router.router_z_loss)
dispatch_and_combine = jax.jit(_dispatch_and_combine, static_argnums=(1, 2))
load_balance_grad = jax.jit(jax.grad(router.load_balance_loss))
balance_deviation_grad = jax.jit(jax.grad(router.balance_deviation_loss))
router_z_grad = jax.jit(jax.grad(router.router_z_loss))


def _np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_topk(probs, k):
    """Indices of the k largest entries along the last axis, largest first."""
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k]


def _router_inputs(seed=0, shape=(2, 6), c=4, k=2, scale=1.5):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((*shape, c))).astype(np.float32)
    idx = _np_topk(_np_softmax(logits), k).astype(np.int32)
    return logits, idx


def _np_stats(logits, idx, c):
    """(f, P) in float64: f from a counting loop, P the mean router probability."""
    flat_idx = idx.reshape(-1, idx.shape[-1])
    counts = np.zeros(c)
    for row in flat_idx:
        for e in row:
            counts[e] += 1
    f = counts / flat_idx.size
    p = _np_softmax(logits).reshape(-1, c).mean(0)
    return f, p


# ---------------------------------------------------------------------------- router losses


def test_expert_fractions_counts():
    idx = np.array([[[0, 1], [0, 2]], [[3, 0], [1, 0]]], np.int32)  # 8 assignments, C = 5
    f = np.asarray(expert_fractions(jnp.asarray(idx), 5))
    np.testing.assert_allclose(f, [4 / 8, 2 / 8, 1 / 8, 1 / 8, 0.0])


@pytest.mark.parametrize("c,k", [(4, 1), (4, 2), (8, 3)])
def test_load_balance_loss_matches_numpy(c, k):
    logits, idx = _router_inputs(c=c, k=k, seed=c + k)
    f, p = _np_stats(logits, idx, c)
    out = load_balance_loss(jnp.asarray(logits), jnp.asarray(idx))
    np.testing.assert_allclose(float(out), c * np.sum(f * p), rtol=1e-5)


def test_load_balance_uniform_is_one_and_collapsed_is_c():
    c, n = 4, 12
    # Uniform probabilities: 1 whatever the choices.
    idx = np.random.default_rng(0).integers(0, c, size=(n, 1)).astype(np.int32)
    out = load_balance_loss(jnp.zeros((n, c)), jnp.asarray(idx))
    np.testing.assert_allclose(float(out), 1.0, rtol=1e-6)
    # Evenly spread choices with one-hot-ish probabilities: also 1.
    idx = (np.arange(n) % c)[:, None].astype(np.int32)
    logits = 30.0 * np.eye(c, dtype=np.float32)[idx[:, 0]]
    np.testing.assert_allclose(
        float(load_balance_loss(jnp.asarray(logits), jnp.asarray(idx))), 1.0, rtol=1e-5)
    # Every token on expert 0 with probability ~1 (k = 1): C.
    logits = np.zeros((n, c), np.float32)
    logits[:, 0] = 30.0
    out = load_balance_loss(jnp.asarray(logits), jnp.zeros((n, 1), jnp.int32))
    np.testing.assert_allclose(float(out), c, rtol=1e-5)


def test_load_balance_gradient_flows_through_probabilities():
    c = 5
    logits, idx = _router_inputs(seed=3, shape=(7,), c=c, k=2)
    g = np.asarray(load_balance_grad(jnp.asarray(logits), jnp.asarray(idx)))
    f, _ = _np_stats(logits, idx, c)
    p = _np_softmax(logits)
    n = logits.shape[0]
    # d/dz_nj of C Σ_i f_i P_i = (C/N) p_nj (f_j − Σ_i f_i p_ni)
    ref = c / n * p * (f[None, :] - (p * f[None, :]).sum(-1, keepdims=True))
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("c,k", [(4, 1), (6, 2)])
def test_balance_deviation_loss_value_and_gradient(c, k):
    logits, idx = _router_inputs(seed=10 + c, shape=(3, 5), c=c, k=k)
    f, _ = _np_stats(logits, idx, c)
    out = balance_deviation_loss(jnp.asarray(logits), jnp.asarray(idx))
    np.testing.assert_allclose(float(out), np.sum((f - 1 / c) ** 2), rtol=1e-5, atol=1e-8)
    assert float(out) > 1e-3
    g = np.asarray(balance_deviation_grad(jnp.asarray(logits), jnp.asarray(idx)))
    # Straight-through: the gradient of Σ_i a_i P_i with a = f − 1/C held constant,
    # d/dz_nj = (1/N) p_nj (a_j − Σ_i a_i p_ni).
    a = f - 1 / c
    p = _np_softmax(logits).reshape(-1, c)
    n = p.shape[0]
    ref = (p * (a[None, :] - (p * a[None, :]).sum(-1, keepdims=True)) / n).reshape(logits.shape)
    assert np.abs(ref).max() > 1e-4
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-7)
    # A gradient step lowers the probability mass of the overloaded expert.
    heavy = int(np.argmax(f))
    p_before = _np_softmax(logits).reshape(-1, c).mean(0)[heavy]
    p_after = _np_softmax(logits - 10.0 * g).reshape(-1, c).mean(0)[heavy]
    assert p_after < p_before


def test_balance_deviation_zero_for_even_load():
    c, n = 4, 8
    idx = (np.arange(n) % c)[:, None].astype(np.int32)
    logits = np.random.default_rng(1).standard_normal((n, c)).astype(np.float32)
    out = balance_deviation_loss(jnp.asarray(logits), jnp.asarray(idx))
    assert abs(float(out)) < 1e-7
    g = balance_deviation_grad(jnp.asarray(logits), jnp.asarray(idx))
    assert np.abs(np.asarray(g)).max() < 1e-7


def test_router_z_loss_matches_numpy():
    logits, _ = _router_inputs(seed=4, scale=4.0)
    z = np.asarray(logits, np.float64)
    m = z.max(-1)
    lse = m + np.log(np.exp(z - m[..., None]).sum(-1))
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits))), np.mean(lse**2),
                               rtol=1e-5)
    g = np.asarray(router_z_grad(jnp.asarray(logits)))
    ref = 2 * lse[..., None] * _np_softmax(z) / lse.size
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- dispatch


def _ref_dispatch(probs, k, cap):
    """GShard priority routing with plain loops, one group: probs [T, C]."""
    t_len, c = probs.shape
    top = _np_topk(probs, k)
    w = np.take_along_axis(probs, top, -1)
    w = w / w.sum(-1, keepdims=True)
    dispatch = np.zeros((t_len, c, cap))
    combine = np.zeros((t_len, c, cap))
    count = [0] * c
    kept = 0
    for j in range(k):  # all first choices, then all second choices, ...
        for t in range(t_len):  # in token order
            e = top[t, j]
            if count[e] < cap:
                dispatch[t, e, count[e]] = 1
                combine[t, e, count[e]] = w[t, j]
                count[e] += 1
                kept += 1
    return dispatch, combine, top, kept / (k * t_len)


@pytest.mark.parametrize("t,c,k,cap", [
    (8, 4, 1, 2),    # exact fit on average, drops where unbalanced
    (8, 4, 2, 5),    # roomy
    (10, 4, 2, 2),   # heavy overflow
    (12, 6, 3, 3),
    (6, 3, 2, 1),    # capacity 1
    (5, 4, 4, 5),    # k = C, no drops possible
])
def test_dispatch_matches_loop_reference(t, c, k, cap):
    rng = np.random.default_rng(t * 100 + c * 10 + k + cap)
    b = 3
    # Skewed probabilities so that some experts overflow.
    logits = rng.standard_normal((b, t, c)) + np.linspace(0, 1.5, c)
    probs = _np_softmax(logits).astype(np.float32)
    dispatch, combine, top_i, kept = dispatch_and_combine(jnp.asarray(probs), k, cap)
    assert dispatch.shape == combine.shape == (b, t, c, cap)
    assert top_i.shape == (b, t, k) and kept.shape == (b,)
    any_drop = False
    for i in range(b):
        d_ref, c_ref, top_ref, kept_ref = _ref_dispatch(probs[i].astype(np.float64), k, cap)
        np.testing.assert_array_equal(np.asarray(top_i[i]), top_ref)
        np.testing.assert_array_equal(np.asarray(dispatch[i]), d_ref)
        np.testing.assert_allclose(np.asarray(combine[i]), c_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(float(kept[i]), kept_ref, rtol=1e-6)
        any_drop |= kept_ref < 1
    if k * t > c * cap:  # over total capacity: something must drop
        assert any_drop


def test_dispatch_invariants_and_kept_fraction():
    rng = np.random.default_rng(0)
    b, t, c, k, cap = 4, 16, 4, 2, 5
    probs = _np_softmax(rng.standard_normal((b, t, c)) * 2).astype(np.float32)
    dispatch, combine, _, kept = dispatch_and_combine(jnp.asarray(probs), k, cap)
    dispatch, combine, kept = map(np.asarray, (dispatch, combine, kept))
    assert set(np.unique(dispatch)) <= {0.0, 1.0}
    # Each (expert, slot) holds at most one token; each expert at most `cap` tokens.
    assert dispatch.sum(axis=1).max() <= 1
    assert dispatch.sum(axis=(1, 3)).max() <= cap
    # A token goes to at most k experts, once each.
    per_token = dispatch.sum(axis=(2, 3))
    assert per_token.max() <= k
    np.testing.assert_allclose(kept, per_token.sum(1) / (k * t), rtol=1e-6)
    # Combine weights are supported on the dispatch; per token they sum to <= 1, == 1 when
    # none of its assignments dropped.
    assert np.all(combine[dispatch == 0] == 0)
    assert np.all(combine[dispatch == 1] > 0)
    w = combine.sum(axis=(2, 3))
    assert w.max() <= 1 + 1e-6
    full = per_token == k
    np.testing.assert_allclose(w[full], 1.0, rtol=1e-6)
    assert np.all(w[~full] < 1 - 1e-6)
    assert (~full).any() and full.any()  # both cases exercised


def test_dispatch_first_choice_beats_earlier_second_choice():
    # Token 0 picks expert 1 second; token 1 picks expert 1 first. Capacity 1: the first
    # choice of the later token wins.
    probs = np.array([[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]], np.float32)
    dispatch, combine, _, kept = dispatch_and_combine(jnp.asarray(probs), 2, 1)
    dispatch = np.asarray(dispatch)
    assert dispatch[0, 1, 1, 0] == 1 and dispatch[0, 0, 1, 0] == 0
    assert dispatch[0, 0, 0, 0] == 1  # token 0's first choice kept
    assert dispatch[0, 1, 0, 0] == 0  # token 1's second choice (expert 0) is full
    np.testing.assert_allclose(float(kept[0]), 0.5)
    np.testing.assert_allclose(float(combine[0, 1, 1, 0]), 0.7 / 0.9, rtol=1e-6)


# ---------------------------------------------------------------------------- MoE module


def _moe(**kw) -> MoE:
    base = dict(num_experts=4, num_experts_per_tok=2, intermediate_size=12,
                capacity_factor=1.25, initializer_range=0.5, impl="capacity")
    return MoE(**{**base, **kw})


def _np_moe(params, x, k, cap):
    """Token-by-token reference: Σ over kept choices j of w_j · SwiGLU_{e_j}(x)."""
    wr = np.asarray(params["router"]["kernel"], np.float64)
    g, u, d = (np.asarray(params[n], np.float64) for n in ("gate_proj", "up_proj", "down_proj"))
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    y = np.zeros_like(x)
    kept_all, top_all = [], []
    for i in range(b):
        probs = _np_softmax(x[i] @ wr)
        _, comb, top, kept = _ref_dispatch(probs, k, cap)
        kept_all.append(kept)
        top_all.append(top)
        for n in range(t):
            for e in top[n]:
                w = comb[n, e].sum()  # 0 when this assignment was dropped
                if w:
                    h = silu(x[i, n] @ g[e]) * (x[i, n] @ u[e])
                    y[i, n] += w * (h @ d[e])
    return y, np.array(kept_all), np.array(top_all)


@pytest.mark.parametrize("capacity_factor", [8.0, 0.5])
def test_moe_module_matches_token_loop(capacity_factor):
    model = _moe(capacity_factor=capacity_factor)
    b, t, d = 2, 8, 16
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), x)["params"])
    assert params["gate_proj"].shape == (4, 16, 12)
    y, stats = jax.jit(model.apply)({"params": params}, x)
    assert set(stats) == {"router_logits", "expert_index", "dropped_fraction"}
    k, c = model.num_experts_per_tok, model.num_experts
    cap = max(1, math.ceil(k * t * capacity_factor / c))
    y_ref, kept, top = _np_moe(params, x, k, cap)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)
    dropped = 1 - kept.mean()
    np.testing.assert_allclose(float(stats["dropped_fraction"]), dropped, atol=1e-6)
    if capacity_factor > 1:
        assert dropped == 0
    else:
        assert dropped > 0
    logits = np.asarray(x, np.float64) @ np.asarray(params["router"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(stats["router_logits"]), logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats["expert_index"]), top)
    # The router losses of the module's own statistics (one layer), as the LM task takes them.
    losses = jax.jit(router.router_losses)(stats["router_logits"][None],
                                           stats["expert_index"][None])
    f = np.bincount(top.reshape(-1), minlength=c) / top.size
    np.testing.assert_allclose(np.asarray(losses["expert_load"]), f, rtol=1e-6)
    p = _np_softmax(logits).reshape(-1, c).mean(0)
    np.testing.assert_allclose(float(losses["load_balance"]), c * np.sum(f * p), rtol=1e-4)
    np.testing.assert_allclose(float(losses["balance_deviation"]), np.sum((f - 1 / c) ** 2),
                               rtol=1e-4, atol=1e-8)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(losses["router_z"]), np.mean(lse**2), rtol=1e-4)


def test_router_losses_are_the_mean_over_layers():
    """Stacked layers [L, ...]: each loss is the mean of the per-layer losses."""
    c, k = 6, 2
    layers = [_router_inputs(seed=20 + i, shape=(2, 5), c=c, k=k) for i in range(3)]
    logits = jnp.asarray(np.stack([z for z, _ in layers]))
    idx = jnp.asarray(np.stack([i for _, i in layers]))
    out = jax.jit(router.router_losses)(logits, idx)
    per_layer = {
        "load_balance": [load_balance_loss(z, i) for z, i in zip(logits, idx, strict=True)],
        "balance_deviation": [balance_deviation_loss(z, i)
                              for z, i in zip(logits, idx, strict=True)],
        "router_z": [router_z_loss(z) for z in logits],
        "expert_load": [expert_fractions(i, c) for i in idx],
    }
    assert set(out) == set(per_layer)
    for name, values in per_layer.items():
        np.testing.assert_allclose(np.asarray(out[name]), np.mean(np.stack(values), axis=0),
                                   rtol=1e-5, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(float(jnp.sum(out["expert_load"])), 1.0, rtol=1e-6)
