"""float16 compute with loss scaling (jaxtrain/loss_scale.py): overflow skips the step and halves
the scale, growth after N good steps, unscaled float16 gradients equal the float32 ones (and
without scaling they underflow), resume continues the scale, a float16 LM run tracks float32."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain import loss_scale as ls
from jaxtrain.checkpoint import read_state
from jaxtrain.hooks import NonFiniteError, check_nonfinite
from jaxtrain.mesh import shard_batch
from jaxtrain.state import TrainState
from jaxtrain.step import loss_and_grad, make_train_step

from .test_lm_task import load_config


def toy_loss(params, batch, rng, frozen):
    """mean(x * w) over rows x [n, 1], computed in float16: dL/dw = mean(x); the float16
    backward value S * sum(x) / n overflows float16 (65504) for S * 100 > 65504 at x = 100."""
    y = batch["x"].astype(jnp.float16) * params["w"].astype(jnp.float16)
    return jnp.mean(y.astype(jnp.float32)), {}


def toy_state(scale_cfg):
    params = {"w": jnp.ones((1,), jnp.float32)}
    tx = optax.sgd(1.0)
    return tx, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(0), frozen=None,
                          loss_scale=ls.init_state(scale_cfg))


def run_toy(scale_cfg, x, steps, accum_steps=1):
    tx, state = toy_state(scale_cfg)
    step = jax.jit(make_train_step(toy_loss, tx, optax.constant_schedule(1.0),
                                   accum_steps=accum_steps, loss_scale=scale_cfg))
    history = []
    for _ in range(steps):
        before = state
        state, m = step(state, {"x": jnp.asarray(x, jnp.float32).reshape(-1, 1)})
        history.append((jax.device_get(m), jax.device_get(before.params["w"]),
                        jax.device_get(state.params["w"]), jax.device_get(state.loss_scale)))
    return state, history


def test_overflow_skips_the_step_and_halves_the_scale():
    # x = 100: S * 100 overflows float16 for S >= 2**10 (2**9 * 100 = 51200 fits)
    x = np.full((4,), 100.0, np.float32)
    cfg = ls.LossScale(dynamic=True, init=2.0**15, growth_interval=100)
    _, history = run_toy(cfg, x, steps=8)
    scales = [float(m["loss_scale"]) for m, *_ in history]
    assert scales == [2.0**k for k in range(15, 8, -1)] + [2.0**9]
    for i, (m, before, after, st) in enumerate(history):
        overflow = i < 6
        assert int(m["overflow"]) == overflow and int(m["nonfinite"]) == 0, i
        if overflow:  # skipped: params unchanged, scale backed off, counter reset
            np.testing.assert_array_equal(after, before)
            assert st["scale"] == scales[i] / 2 and st["good_steps"] == 0
        else:  # applied, with the true (unscaled) gradient mean(x) = 100 at lr 1
            np.testing.assert_allclose(before - after, 100.0, rtol=1e-3)
            assert st["scale"] == scales[i] and st["good_steps"] == i - 5


def test_overflow_in_one_microbatch_skips_the_accumulated_step():
    # microbatch i takes rows i, i+2: rows 0 and 2 are large (S * 100 overflows), 1 and 3 not
    x = np.asarray([100.0, 1.0, 100.0, 1.0], np.float32)
    cfg = ls.LossScale(dynamic=True, init=2.0**15, growth_interval=100)
    _, history = run_toy(cfg, x, steps=1, accum_steps=2)
    m, before, after, st = history[0]
    assert int(m["overflow"]) == 1 and st["scale"] == 2.0**14
    np.testing.assert_array_equal(after, before)
    # in range, the unscaled mean of the microbatch gradients is the full batch's, mean(x)
    _, history = run_toy(ls.LossScale(dynamic=True, init=2.0**7), x, steps=1, accum_steps=2)
    m, before, after, _ = history[0]
    assert int(m["overflow"]) == 0
    np.testing.assert_allclose(before - after, x.mean(), rtol=1e-3)


def test_the_scale_grows_after_n_good_steps_and_a_fixed_scale_never_changes():
    x = np.full((4,), 1.0, np.float32)
    _, history = run_toy(ls.LossScale(dynamic=True, init=4.0, growth_interval=3), x, steps=7)
    assert [float(m["loss_scale"]) for m, *_ in history] == [4, 4, 4, 8, 8, 8, 16]
    assert [int(st["good_steps"]) for *_, st in history] == [1, 2, 0, 1, 2, 0, 1]
    # fixed: no state, S constant; an overflow is an ordinary non-finite step
    fixed = ls.LossScale(dynamic=False, init=2.0**15)
    assert ls.init_state(fixed) is None
    _, history = run_toy(fixed, np.full((4,), 100.0, np.float32), steps=2)
    for m, before, after, st in history:
        assert float(m["loss_scale"]) == 2.0**15 and st is None
        assert int(m["nonfinite"]) == 1 and int(m["overflow"]) == 0
        np.testing.assert_array_equal(after, before)


def test_adjust_rule():
    cfg = ls.LossScale(dynamic=True, init=2.0, growth_interval=2)
    st = ls.init_state(cfg)
    t, f = jnp.array(True), jnp.array(False)
    # overflow at S = 2 backs off to S_min = 1; a further one at S_min is no overflow (a real
    # non-finite step: the scale cannot help)
    st, ov = ls.adjust(cfg, st, t, f)
    assert bool(ov) and float(st["scale"]) == 1.0
    st, ov = ls.adjust(cfg, st, t, f)
    assert not bool(ov) and float(st["scale"]) == 1.0 and int(st["good_steps"]) == 0
    # a non-finite loss is not an overflow and leaves S alone
    st, ov = ls.adjust(cfg, {"scale": jnp.float32(8.0), "good_steps": jnp.int32(1)}, f, f)
    assert not bool(ov) and float(st["scale"]) == 8.0 and int(st["good_steps"]) == 0
    # growth is capped at S_max
    st, _ = ls.adjust(cfg, {"scale": jnp.float32(ls.MAX_SCALE), "good_steps": jnp.int32(1)}, t, t)
    assert float(st["scale"]) == ls.MAX_SCALE


def test_overflow_steps_do_not_count_as_nonfinite():
    cfg = load_config("lm", train__nonfinite="error").train
    host = [{"nonfinite": 0, "overflow": 1}] * 5
    assert check_nonfinite(cfg, host, 5, 0) == 0  # no error in 'error' mode
    # nor do they end (or extend) a streak of real non-finite steps
    cfg = load_config("lm", train__max_nonfinite_streak=3).train
    host = [{"nonfinite": 1, "overflow": 0}, {"nonfinite": 0, "overflow": 1},
            {"nonfinite": 1, "overflow": 0}]
    assert check_nonfinite(cfg, host, 3, 0) == 2
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        check_nonfinite(cfg, host[:1], 4, 2)


def _grads(loss_fn, params, batch, scale=None):
    """The gradients of `loss_fn`, computed with the loss scaled by `scale` and unscaled."""
    if scale is not None:
        loss_fn = ls.scaled(loss_fn, jnp.float32(scale))
    _, _, g = jax.jit(loss_and_grad(loss_fn))(params, batch, jax.random.PRNGKey(0), None)
    return g if scale is None else ls.unscale(g, jnp.float32(scale))


def _times(loss_fn, factor):
    def fn(*args):
        loss, metrics = loss_fn(*args)
        return loss * factor, metrics
    return fn


def _rel_err(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.linalg.norm(np.asarray(x) - np.asarray(y)) /
                     (np.linalg.norm(np.asarray(y)) + 1e-30)) for x, y in zip(a, b, strict=True))


def test_unscaled_float16_gradients_equal_float32_and_underflow_without_scaling():
    one = jax.devices()[:1]
    t32 = Trainer(load_config("lm"), devices=one)
    t16 = Trainer(load_config("lm", model__dtype="float16", train__loss_scale="dynamic"),
                  devices=one)
    params = jax.device_get(t32.init_state().params)  # float32 in both: the same init
    p16 = jax.device_get(t16.init_state().params)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(p16))
    for x, y in zip(jax.tree.leaves(p16), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)
    batch = next(t32.train_iterator())
    g32 = _grads(t32.task.loss_fn, params, batch)
    # measured: 1.4e-3 (float16 rounding of the activations' values and gradients)
    assert _rel_err(_grads(t16.task.loss_fn, params, batch, scale=2.0**15), g32) < 5e-3
    # a loss 1e-3 times smaller: its float16 backward values fall below float16's ~6e-8 and
    # vanish without scaling (measured error 1.0); S = 2**15 brings them back (1.5e-3)
    tiny = _times(t16.task.loss_fn, 1e-3)
    g32_tiny = jax.tree.map(lambda g: g * 1e-3, g32)
    assert _rel_err(_grads(tiny, params, batch), g32_tiny) > 0.5
    assert _rel_err(_grads(tiny, params, batch, scale=2.0**15), g32_tiny) < 5e-3


def test_float16_lm_run_tracks_float32_and_resume_continues_the_scale(tmp_path):
    common = dict(train__steps=6, eval__every=0, checkpoint__every=0, train__log_every=1)
    one = jax.devices()[:1]
    f32 = Trainer(load_config("lm", **common), str(tmp_path / "f32"), devices=one).train()
    cfg = load_config("lm", model__dtype="float16", train__loss_scale="dynamic",
                      train__loss_scale_init=2.0**14, train__loss_scale_growth_interval=2,
                      **common)
    straight = Trainer(cfg, str(tmp_path / "a"), devices=one).train()
    loss16 = [loss for _, loss in straight.loss_history]
    assert len(loss16) == 6 and np.all(np.isfinite(loss16))
    np.testing.assert_allclose(loss16, [loss for _, loss in f32.loss_history], rtol=1e-3)
    scales = [r["train/loss_scale"] for r in straight.metrics if "train/loss_scale" in r]
    assert scales == [2.0**14] * 2 + [2.0**15] * 2 + [2.0**16] * 2  # grew every 2 good steps
    assert sum(r["train/overflow_steps"] for r in straight.metrics
               if "train/overflow_steps" in r) == 0
    # train, stop, resume: the scale and its counter continue from the checkpoint
    Trainer(cfg, str(tmp_path / "b"), devices=one).train(stop_at_step=3)
    _, saved = read_state(str(tmp_path / "b"))
    assert float(saved["loss_scale"]["scale"]) == 2.0**15
    assert int(saved["loss_scale"]["good_steps"]) == 1
    resumed = Trainer(cfg, str(tmp_path / "b"), devices=one).train()
    again = [r["train/loss_scale"] for r in resumed.metrics if "train/loss_scale" in r]
    assert again == scales  # metrics.jsonl: steps 1-3 from the first call, 4-6 resumed
    np.testing.assert_allclose([loss for _, loss in resumed.loss_history], loss16[3:],
                               rtol=1e-5)
    np.testing.assert_array_equal(jax.device_get(resumed.final_state.loss_scale["scale"]),
                                  jax.device_get(straight.final_state.loss_scale["scale"]))
    # loss scaling off: nothing new in the state tree or the checkpoint
    assert f32.final_state.loss_scale is None
    assert "loss_scale" not in read_state(str(tmp_path / "f32"))[1]


def test_config_checks(caplog):
    with pytest.raises(ConfigError, match="train.loss_scale"):
        Trainer(load_config("lm", train__loss_scale="auto"))
    assert ls.parse("1024") == 1024.0 and ls.parse("dynamic") == "dynamic"
    with pytest.raises(ConfigError, match="positive number"):
        ls.parse("-1")
    with caplog.at_level(logging.WARNING):
        Trainer(load_config("lm", model__dtype="float16"))
    assert any("without loss scaling" in r.getMessage() for r in caplog.records)
    # a task's own gradient function (the contrastive gradient cache) cannot be scaled
    with pytest.raises(ConfigError, match="computes its own gradients"):
        Trainer(load_config("clip", model__dtype="float16", train__loss_scale="dynamic",
                            train__use_gradient_cache=True))


def test_float16_clip_backs_off_from_overflow_then_trains():
    """CLIP's gradients (norm ~40 at init) overflow float16 at S = 2**15: the first steps are
    skipped as overflows (not non-finite), the scale backs off, then updates apply."""
    trainer = Trainer(load_config("clip", model__dtype="float16", train__loss_scale="dynamic"),
                      devices=jax.devices()[:1])
    it, state = trainer.train_iterator(), trainer.init_state()
    history = []
    for _ in range(6):
        state, m = trainer.train_step(state, shard_batch(next(it), trainer.mesh))
        history.append(jax.device_get(m))
    assert int(history[0]["overflow"]) == 1 and not np.isfinite(history[0]["grad_norm"])
    assert all(int(m["nonfinite"]) == 0 for m in history)
    assert all(np.isfinite(m["loss"]) for m in history)
    applied = [m for m in history if not m["overflow"]]
    assert len(applied) >= 2 and all(np.isfinite(m["grad_norm"]) for m in applied)
    assert float(state.loss_scale["scale"]) < 2.0**15
