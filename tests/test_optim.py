"""Tests for jaxtrain.optim: schedules, masks, param groups and optimizers vs. references."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from jaxtrain import optim
from jaxtrain.config import base_config


def make_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(base_config().optim.to_dict())
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def lr_at(schedule, step: int) -> float:
    return float(schedule(jnp.asarray(step, jnp.int32)))


# ------------------------------------------------------------------------------------------------
# Closed-form reference schedule (independent of the implementation)
# ------------------------------------------------------------------------------------------------


def ref_lr(step, total, lr, warmup, kind, min_ratio=0.0, cycles=2, decay_ratio=0.2, tau=0):
    floor = lr * min_ratio
    if step < warmup:
        return lr * step / warmup
    t, n = step - warmup, total - warmup
    if kind == "constant":
        return lr
    if kind == "linear":
        return lr + (floor - lr) * min(t, n) / n
    if kind == "cosine":
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(t, n) / n))
    if kind == "cosine_restarts":
        length = n / cycles
        c = min(int(t // length), cycles - 1)
        f = min((t - c * length) / length, 1.0)
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * f))
    if kind == "wsd":
        d = round(decay_ratio * n)
        stable = n - d
        return lr if t < stable else lr + (floor - lr) * min(t - stable, d) / d
    if kind == "rsqrt":
        tau = tau or warmup or 1
        return lr * math.sqrt(tau / max(step, tau))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", optim.SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_closed_form(kind, warmup):
    total, lr = 110, 0.3
    cfg = make_cfg(schedule=kind, lr=lr, warmup_steps=warmup, min_lr_ratio=0.1)
    schedule = optim.build_schedule(cfg, total)
    for step in [0, 1, 5, 9, 10, 11, 30, 55, 59, 60, 61, 85, 90, 95, 100, 109, 110, 150]:
        expected = ref_lr(step, total, lr, warmup, kind, min_ratio=0.1)
        assert lr_at(schedule, step) == pytest.approx(expected, rel=1e-5, abs=1e-7), step


def test_warmup_reaches_peak_linearly():
    schedule = optim.build_schedule(make_cfg(lr=2.0, warmup_steps=20, schedule="cosine"), 100)
    assert lr_at(schedule, 0) == 0.0
    assert lr_at(schedule, 5) == pytest.approx(0.5)
    assert lr_at(schedule, 10) == pytest.approx(1.0)
    assert lr_at(schedule, 20) == pytest.approx(2.0)
    assert lr_at(schedule, 100) == pytest.approx(0.0, abs=1e-7)


def test_cosine_restarts_jump_back_to_peak():
    lr, floor = 1.0, 0.2
    cfg = make_cfg(schedule="cosine_restarts", lr=lr, warmup_steps=10, num_cycles=3,
                   min_lr_ratio=floor)
    schedule = optim.build_schedule(cfg, 10 + 90)  # three cycles of 30 steps
    for start in (10, 40, 70):
        assert lr_at(schedule, start) == pytest.approx(lr)
        assert lr_at(schedule, start + 15) == pytest.approx((lr + floor) / 2)
        assert lr_at(schedule, start + 29) == pytest.approx(
            floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * 29 / 30)), rel=1e-5)
    assert lr_at(schedule, 100) == pytest.approx(floor)
    assert lr_at(schedule, 1000) == pytest.approx(floor)


def test_wsd_plateau_then_linear_decay():
    cfg = make_cfg(schedule="wsd", lr=1.0, warmup_steps=10, decay_ratio=0.25, min_lr_ratio=0.0)
    schedule = optim.build_schedule(cfg, 110)  # 100 main steps: 75 stable, 25 decay
    assert all(lr_at(schedule, s) == pytest.approx(1.0) for s in range(10, 86))
    assert lr_at(schedule, 85 + 10) == pytest.approx(0.6)
    assert lr_at(schedule, 110) == pytest.approx(0.0, abs=1e-7)


def test_rsqrt_formula():
    lr = 1.0
    cfg = make_cfg(schedule="rsqrt", lr=lr, warmup_steps=100)
    schedule = optim.build_schedule(cfg, 10_000)  # tau defaults to warmup_steps = 100
    assert lr_at(schedule, 50) == pytest.approx(0.5)
    assert lr_at(schedule, 100) == pytest.approx(1.0)
    assert lr_at(schedule, 400) == pytest.approx(0.5)
    assert lr_at(schedule, 10_000) == pytest.approx(0.1)

    cfg = make_cfg(schedule="rsqrt", lr=lr, rsqrt_timescale=25)
    schedule = optim.build_schedule(cfg, 1000)
    assert lr_at(schedule, 0) == pytest.approx(1.0)
    assert lr_at(schedule, 25) == pytest.approx(1.0)
    assert lr_at(schedule, 100) == pytest.approx(0.5)

    schedule = optim.build_schedule(make_cfg(schedule="rsqrt", lr=lr), 1000)  # tau = 1
    assert lr_at(schedule, 16) == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ["linear", "cosine", "wsd", "cosine_restarts", "rsqrt"])
def test_warmup_ratio_equals_warmup_steps(kind):
    by_ratio = optim.build_schedule(make_cfg(schedule=kind, warmup_ratio=0.1), 200)
    by_steps = optim.build_schedule(make_cfg(schedule=kind, warmup_steps=20), 200)
    for step in range(0, 220, 7):
        assert lr_at(by_ratio, step) == pytest.approx(lr_at(by_steps, step), abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Validation errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"schedule": "cosin"}, "optim.schedule", "Did you mean 'cosine'"),
        ({"schedule": "wds"}, "optim.schedule", "'wsd'"),
        ({"name": "adamww"}, "optim.name", "Did you mean 'adamw'"),
        ({"name": "lino"}, "optim.name", "'lion'"),
        ({"lr": -1e-3}, "optim.lr", ">= 0"),
        ({"warmup_steps": 100}, "optim.warmup_steps", "total_steps=100"),
        ({"warmup_ratio": 1.0}, "optim.warmup_ratio", "shorter than total_steps"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, "optim.warmup_ratio", "only one"),
        ({"min_lr_ratio": 1.5}, "optim.min_lr_ratio", "[0.0, 1.0]"),
        ({"param_groups": (("txt/(", 0.1),)}, "optim.param_groups", "regular expression"),
        ({"param_groups": (("txt/", -1.0),)}, "optim.param_groups", ">= 0"),
        ({"param_groups": ("txt/",)}, "optim.param_groups", "pair"),
        ({"wd_exclude": "bias("}, "optim.wd_exclude", "regular expression"),
    ],
)
def test_config_errors_name_key_and_fix(overrides, key, fragment):
    with pytest.raises(ValueError) as err:
        optim.build_optimizer(make_cfg(**overrides), 100)
    assert key in str(err.value)
    assert fragment in str(err.value)


def test_unknown_schedule_lists_valid_values():
    with pytest.raises(ValueError, match="optim.schedule") as err:
        optim.build_schedule(make_cfg(schedule="nope"), 10)
    for name in optim.SCHEDULES:
        assert repr(name) in str(err.value)


def test_bad_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        optim.build_schedule(make_cfg(), 0)


# ------------------------------------------------------------------------------------------------
# Paths and masks
# ------------------------------------------------------------------------------------------------


def test_param_paths_dict_frozendict_and_lists():
    params = {"img": {"encoder": {"block_0": {"attn": {"query": {"kernel": jnp.ones((2, 2))}}}}},
              "layers": [{"b": jnp.ones(2)}, {"b": jnp.ones(2)}]}
    expected = {"img": {"encoder": {"block_0": {"attn": {"query": {
        "kernel": "img/encoder/block_0/attn/query/kernel"}}}}},
        "layers": [{"b": "layers/0/b"}, {"b": "layers/1/b"}]}
    assert optim.param_paths(params) == expected
    frozen = optim.param_paths(FrozenDict(params))
    assert jax.tree_util.tree_leaves(frozen) == jax.tree_util.tree_leaves(expected)


def test_weight_decay_and_trainable_masks():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
              "embed": {"embedding": jnp.ones((5, 3))}, "w1d": jnp.ones(3),
              "txt": {"kernel": jnp.ones((2, 2))}}
    cfg = make_cfg(param_groups=(("txt/", 0.0),))
    assert optim.weight_decay_mask(cfg, params) == {
        "dense": {"kernel": True, "bias": False}, "embed": {"embedding": False}, "w1d": False,
        "txt": {"kernel": True}}
    assert optim.weight_decay_mask(make_cfg(wd_exclude=""), params)["embed"]["embedding"]
    assert optim.trainable_mask(cfg, params) == {
        "dense": {"kernel": True, "bias": True}, "embed": {"embedding": True}, "w1d": True,
        "txt": {"kernel": False}}


# ------------------------------------------------------------------------------------------------
# Optimizer behaviour
# ------------------------------------------------------------------------------------------------


def step_once(tx, params, grads, state=None):
    state = tx.init(params) if state is None else state
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_only_hits_masked_params(name):
    lr, wd = 0.1, 0.5
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                        "bias": jnp.ones(4)},
              "norm": {"scale": jnp.ones(4)},
              "embed": {"embedding": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}}
    cfg = make_cfg(name=name, lr=lr, weight_decay=wd, schedule="constant", clip_norm=0.0)
    tx, _ = optim.build_optimizer(cfg, 10)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    new, _ = step_once(tx, params, grads)
    np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"] * (1 - lr * wd),
                               rtol=1e-6)
    for path in [("dense", "bias"), ("norm", "scale"), ("embed", "embedding")]:
        np.testing.assert_array_equal(new[path[0]][path[1]], params[path[0]][path[1]])


def numpy_adamw(params, grads, lr, b1, b2, eps, wd, decay):
    """Hand-written bias-corrected AdamW on lists of arrays; yields params after each step."""
    mu = [np.zeros_like(p) for p in params]
    nu = [np.zeros_like(p) for p in params]
    for t, g in enumerate(grads, start=1):
        mu = [b1 * m + (1 - b1) * x for m, x in zip(mu, g, strict=True)]
        nu = [b2 * v + (1 - b2) * x * x for v, x in zip(nu, g, strict=True)]
        m_hat = [m / (1 - b1**t) for m in mu]
        v_hat = [v / (1 - b2**t) for v in nu]
        params = [p - lr * (m / (np.sqrt(v) + eps) + wd * d * p)
                  for p, m, v, d in zip(params, m_hat, v_hat, decay, strict=True)]
        yield params


def test_adamw_matches_numpy_reference():
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-8, 0.1
    rng = np.random.default_rng(1)
    to_jax = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)
    params = to_jax({"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}})
    grads = [to_jax({"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}})
             for _ in range(3)]
    decay = [0.0, 1.0]  # leaves in order: dense/bias, dense/kernel
    cfg = make_cfg(name="adamw", lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                   schedule="constant", clip_norm=0.0)
    tx, _ = optim.build_optimizer(cfg, 10)

    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(t)]
    reference = numpy_adamw(leaves(params), [leaves(g) for g in grads], lr, b1, b2, eps, wd,
                            decay)
    state = None
    for g, want in zip(grads, reference, strict=True):
        params, state = step_once(tx, params, g, state)
        for got, ref in zip(leaves(params), want, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_sgd_follows_schedule_step_indexing():
    cfg = make_cfg(name="sgd", momentum=0.0, lr=1.0, schedule="linear", warmup_steps=2,
                   clip_norm=0.0)
    tx, schedule = optim.build_optimizer(cfg, 6)
    params, state = {"w": jnp.zeros(2)}, None
    grads = {"w": jnp.ones(2)}
    for k in range(6):
        before = params["w"]
        params, state = step_once(tx, params, grads, state)
        np.testing.assert_allclose(before - params["w"], lr_at(schedule, k), rtol=1e-6)


@pytest.mark.parametrize(("grad", "scale"), [([3.0, 4.0, 0.0], 1 / 5), ([0.3, 0.0, 0.4], 1.0)])
def test_clipping_scales_to_clip_norm(grad, scale):
    cfg = make_cfg(name="sgd", momentum=0.0, lr=1.0, schedule="constant", clip_norm=1.0)
    tx, _ = optim.build_optimizer(cfg, 10)
    params = {"a": {"kernel": jnp.zeros((1, 2))}, "b": jnp.zeros(1)}
    grads = {"a": {"kernel": jnp.asarray([grad[:2]])}, "b": jnp.asarray(grad[2:])}
    new, _ = step_once(tx, params, grads)
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(new)])
    np.testing.assert_allclose(-flat, np.asarray(grad)[[0, 1, 2]] * scale, rtol=1e-6)


def test_group_multiplier_scales_the_step():
    cfg = make_cfg(name="sgd", momentum=0.0, lr=0.1, schedule="constant", clip_norm=0.0,
                   param_groups=(("txt/.*", 0.1), ("img/", 1.0)))
    tx, _ = optim.build_optimizer(cfg, 10)
    params = {"txt": {"kernel": jnp.zeros((2, 2))}, "img": {"kernel": jnp.zeros((2, 2))},
              "head": jnp.zeros(2)}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    new, _ = step_once(tx, params, grads)
    np.testing.assert_allclose(new["img"]["kernel"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(new["head"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(new["txt"]["kernel"], 0.1 * new["img"]["kernel"], rtol=1e-6)


def test_first_matching_group_wins():
    cfg = make_cfg(name="sgd", momentum=0.0, lr=1.0, schedule="constant", clip_norm=0.0,
                   param_groups=(("txt/head", 0.5), ("txt/", 0.0)))
    tx, _ = optim.build_optimizer(cfg, 10)
    params = {"txt": {"head": jnp.zeros(2), "body": jnp.zeros(2)}}
    new, _ = step_once(tx, params, jax.tree_util.tree_map(jnp.ones_like, params))
    np.testing.assert_allclose(new["txt"]["head"], -0.5)
    np.testing.assert_array_equal(new["txt"]["body"], 0.0)


def test_frozen_group_is_unchanged_and_has_no_state():
    cfg = make_cfg(name="adamw", lr=0.1, weight_decay=0.1, schedule="cosine", warmup_steps=1,
                   param_groups=(("img/", 0.0),))
    tx, _ = optim.build_optimizer(cfg, 10)
    rng = np.random.default_rng(2)
    params = FrozenDict({"img": {"kernel": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
                                 "bias": jnp.ones(5)},
                         "txt": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                                 "bias": jnp.ones(2)}})
    state = tx.init(params)
    trainable = 3 * 2 + 2
    arrays = [x for x in jax.tree_util.tree_leaves(state) if np.ndim(x) > 0]
    assert sum(x.size for x in arrays) == 2 * trainable  # mu and nu of txt/* only
    assert all(x.shape != (7, 5) for x in arrays)

    grad_fn = jax.jit(jax.grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(p))))
    update = jax.jit(tx.update)
    start = params
    for _ in range(4):
        updates, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["img"]["kernel"], start["img"]["kernel"])
    np.testing.assert_array_equal(params["img"]["bias"], start["img"]["bias"])
    assert not np.allclose(params["txt"]["kernel"], start["txt"]["kernel"])


def test_frozen_gradient_does_not_affect_clipping():
    cfg = make_cfg(name="sgd", momentum=0.0, lr=1.0, schedule="constant", clip_norm=1.0,
                   param_groups=(("frozen_tower", 0.0),))
    tx, _ = optim.build_optimizer(cfg, 10)
    params = {"frozen_tower": {"kernel": jnp.zeros((2, 2))}, "head": {"kernel": jnp.zeros((1, 2))}}
    grads = {"frozen_tower": {"kernel": jnp.full((2, 2), 1e6)},
             "head": {"kernel": jnp.asarray([[3.0, 4.0]])}}
    new, _ = step_once(tx, params, grads)
    np.testing.assert_allclose(new["head"]["kernel"], [[-0.6, -0.8]], rtol=1e-6)
    np.testing.assert_array_equal(new["frozen_tower"]["kernel"], 0.0)


@pytest.mark.parametrize(("name", "lr"), [("adamw", 0.1), ("adafactor", 0.1), ("lion", 0.1),
                                          ("sgd", 0.1)])
def test_optimizers_reduce_quadratic(name, lr):
    rng = np.random.default_rng(3)
    params = {"layer": {"kernel": jnp.asarray(rng.normal(size=(4, 4)) + 1.0, jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=4) + 1.0, jnp.float32)}}
    target = jax.tree_util.tree_map(lambda x: 0.1 * x, params)
    loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target), strict=True))
    cfg = make_cfg(name=name, lr=lr, weight_decay=1e-4, warmup_steps=3, schedule="cosine")
    tx, _ = optim.build_optimizer(cfg, 30)

    @jax.jit
    def train_step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    state, start = tx.init(params), float(loss(params))
    for _ in range(30):
        params, state, _ = train_step(params, state)
    assert float(loss(params)) < 0.3 * start
