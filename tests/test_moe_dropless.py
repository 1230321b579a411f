"""Dropless MoE (jaxtrain.models.moe, impl='dropless'): equal to the capacity path when nothing is
dropped (forward and gradients), to a token-by-token NumPy loop when the capacity path would
drop, expert-sharded over 8 devices equal to 1 device, the router statistics and losses
unchanged, and a bad ``moe_impl`` rejected."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import ConfigError
from jaxtrain.losses import router
from jaxtrain.mesh import DEFAULT_RULES, logical_shardings, make_mesh
from jaxtrain.models.llama import Llama, LlamaConfig
from jaxtrain.models.moe import MoE, dropless_experts

C, K, F, D = 4, 2, 12, 16


def _moe(impl: str, capacity_factor: float = C / K) -> MoE:
    """capacity_factor C/k: capacity = T, so the capacity path drops nothing."""
    return MoE(C, K, F, capacity_factor, initializer_range=0.5, impl=impl)


def _init(b=4, t=6, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, D))
    boxed = jax.jit(_moe("dropless").init)(jax.random.key(seed + 1), x)
    return x, boxed, nn.meta.unbox(boxed)


def _loss(model):
    def f(params, x):  # a loss that weights every output entry differently
        y, _ = model.apply(params, x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))
    return f


def _np_reference(params, x, experts=range(C)):
    """Token by token: y_n = Σ_{j: e_j in experts} w_j · down_e(silu(x gate_e) * (x up_e))."""
    p = {n: np.asarray(params["params"][n], np.float64)
         for n in ("gate_proj", "up_proj", "down_proj")}
    wr = np.asarray(params["params"]["router"]["kernel"], np.float64)
    x = np.asarray(x, np.float64).reshape(-1, D)
    logits = x @ wr
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for n in range(len(x)):
        top = np.argsort(-probs[n], kind="stable")[:K]
        w = probs[n, top] / probs[n, top].sum()
        for e, we in zip(top, w, strict=True):
            if e in experts:
                a = x[n] @ p["gate_proj"][e]
                h = a / (1 + np.exp(-a)) * (x[n] @ p["up_proj"][e])
                y[n] += we * (h @ p["down_proj"][e])
    return y


def _close(a, b, rtol=1e-4):
    """Equal up to float32 rounding, relative to the array's scale."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_dropless_equals_capacity_path_when_nothing_drops():
    x, _, params = _init()
    (y_d, s_d), (y_c, s_c) = (jax.jit(_moe(i).apply)(params, x) for i in ("dropless", "capacity"))
    assert float(s_c["dropped_fraction"]) == 0.0 == float(s_d["dropped_fraction"])
    _close(y_d, y_c)
    np.testing.assert_array_equal(np.asarray(s_d["expert_index"]), np.asarray(s_c["expert_index"]))
    np.testing.assert_array_equal(np.asarray(s_d["router_logits"]),
                                  np.asarray(s_c["router_logits"]))
    g_d, g_c = (jax.jit(jax.grad(_loss(_moe(i)), argnums=(0, 1)))(params, x)
                for i in ("dropless", "capacity"))
    for a, b in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_c), strict=True):
        _close(a, b)


def test_dropless_matches_token_loop_where_capacity_drops():
    x, _, params = _init(b=2, t=8, seed=3)
    y, stats = jax.jit(_moe("dropless", capacity_factor=0.5).apply)(params, x)
    _, cap_stats = jax.jit(_moe("capacity", capacity_factor=0.5).apply)(params, x)
    assert float(cap_stats["dropped_fraction"]) > 0  # the capacity path would drop here
    assert float(stats["dropped_fraction"]) == 0.0
    _close(y.reshape(-1, D), _np_reference(params, x))


def test_dropless_experts_of_one_shard_count_only_their_experts():
    """What one expert shard computes: experts first .. first+G-1 of C, the others give 0."""
    x, _, params = _init(b=3, t=5, seed=5)
    p = params["params"]
    logits = x.reshape(-1, D) @ p["router"]["kernel"]
    top_p, top_i = jax.lax.top_k(jax.nn.softmax(logits), K)
    w = top_p / top_p.sum(-1, keepdims=True)
    for first in (0, 2):
        sl = slice(first, first + 2)
        y = jax.jit(dropless_experts)(x.reshape(-1, D), top_i, w, p["gate_proj"][sl],
                                      p["up_proj"][sl], p["down_proj"][sl], first)
        _close(y, _np_reference(params, x, experts=range(first, first + 2)))


@pytest.mark.parametrize("axes", [dict(data=2, expert=4), dict(fsdp=2, tensor=2, expert=2)])
def test_expert_sharded_on_8_devices_equals_1_device(axes):
    """Under a mesh with an expert axis the dropless path runs a shard_map over it (all-gather
    of rows, reduce-scatter of outputs): same outputs and gradients, weights stay split."""
    x, boxed, params = _init(b=8, t=6, seed=7)
    model = _moe("dropless")
    f = jax.jit(jax.value_and_grad(_loss(model), argnums=(0, 1)))
    v1, g1 = f(params, x)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **axes})
    shardings = logical_shardings(jax.eval_shape(lambda: boxed), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.device_put(params, shardings)
        compiled = f.lower(sharded, x).compile()
        v8, g8 = compiled(sharded, x)
    hlo = compiled.as_text()
    # the shard_map path ran, and its rows needed no re-layout on the way in or out
    assert "reduce-scatter(" in hlo and "all-gather(" in hlo
    relayouts = [line for line in hlo.splitlines() if "shard_map" in line
                 and ("collective-permute(" in line or "all-to-all(" in line)]
    assert not relayouts, relayouts
    np.testing.assert_allclose(float(v8), float(v1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        _close(a, b)
    gate = g8[0]["params"]["gate_proj"]
    assert gate.sharding.spec[0] == "expert", gate.sharding
    assert gate.addressable_shards[0].data.shape[0] == C // axes["expert"]


def test_llama_dropless_scanned_layers_sharded_equals_capacity_unsharded():
    """The whole model: scanned layers (shard_map inside nn.scan) on a data x expert mesh, vs
    the capacity path on one device with no drop; router statistics equal."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                      capacity_factor=2.0, scan_layers=True)
    tokens = jax.random.randint(jax.random.key(0), (8, 8), 0, 64)
    boxed = jax.jit(Llama(cfg).init)(jax.random.key(1), tokens)
    params = nn.meta.unbox(boxed)
    cap = dataclasses.replace(cfg, moe_impl="capacity")
    logits_c, aux_c = jax.jit(Llama(cap).apply)(params, tokens)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "expert": 4})
    shardings = logical_shardings(jax.eval_shape(lambda: boxed), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.device_put(params, shardings)
        logits_d, aux_d = jax.jit(Llama(cfg).apply)(sharded, tokens)
        assert "reduce_scatter" in jax.jit(Llama(cfg).apply).lower(sharded, tokens).as_text()
    _close(logits_d, logits_c)
    np.testing.assert_array_equal(np.asarray(aux_d["expert_index"]),
                                  np.asarray(aux_c["expert_index"]))
    np.testing.assert_array_equal(np.asarray(aux_d["dropped_fraction"]), [0.0, 0.0])
    # the router losses and per-expert load the LM task logs are those of the capacity path
    losses_d = router.router_losses(aux_d["router_logits"], aux_d["expert_index"])
    losses_c = router.router_losses(aux_c["router_logits"], aux_c["expert_index"])
    for name in losses_c:
        np.testing.assert_allclose(np.asarray(losses_d[name]), np.asarray(losses_c[name]),
                                   rtol=1e-5, err_msg=name)


def test_moe_impl_default_runtime_field_and_bad_value():
    assert LlamaConfig().moe_impl == "dropless"
    from jaxtrain.models.llama import FAMILY
    assert "moe_impl" in FAMILY.runtime_fields
    with pytest.raises(ConfigError, match=r"moe_impl must be one of \['dropless', 'capacity'\]"):
        LlamaConfig(num_experts=4, moe_impl="megablox")
    with pytest.raises(ConfigError, match="moe_impl"):
        MoE(C, K, F, 1.0, 0.5, impl="sparse").init(jax.random.key(0), jnp.zeros((1, 2, D)))


@pytest.mark.slow
def test_moe_flops_benchmark_prints_both_impls():
    """benchmarks/moe_flops.py (the BUILD.md table's command) on the tiny config, XLA:CPU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "moe_flops.py"),
         "--config=configs/moe.py:runlocal"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
        timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in rows] == ["dropless", "capacity"]
    assert rows[0]["model_flops_per_step"] == rows[1]["model_flops_per_step"] > 0
    assert all(r["xla_flops_per_step"] > 0 and r["ratio"] > 0 for r in rows)
    assert "| moe_impl | device | XLA TFLOP/step |" in out.stdout
