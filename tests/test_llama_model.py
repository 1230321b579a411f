"""The Llama-family decoder (jaxtrain.models.llama): masking (causal, packed segments, sliding
window), GQA, scan vs unrolled layers, remat, tied embeddings, bf16, the config's validation,
parameter count and FLOPs. Parity with Hugging Face is in test_hf_llama.py."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.models.llama import Llama, LlamaConfig, RMSNorm, rope

V, T = 64, 12
BASE = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=48)


def _cfg(**kw) -> LlamaConfig:
    return LlamaConfig(**{**BASE, **kw})


@functools.cache
def _fwd(cfg: LlamaConfig):
    return jax.jit(Llama(cfg).apply)


def _shapes(cfg: LlamaConfig):
    init = Llama(cfg).init
    tree = jax.eval_shape(lambda: init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))
    return jax.tree.map(jnp.shape, nn.meta.unbox(tree["params"]), is_leaf=lambda x: hasattr(
        x, "shape"))


def _params(cfg: LlamaConfig, seed: int = 0):
    """Random parameters of the model's shapes (no init compile): kernels N(0, 0.2²), RMSNorm
    scales 1 + N(0, 0.3²) and biases N(0, 0.3²), so misplaced norms or biases show."""
    rng = np.random.default_rng(seed)

    def f(path, shape):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            x = 1.0 + 0.3 * rng.standard_normal(shape)
        elif "bias" in name:
            x = 0.3 * rng.standard_normal(shape)
        else:
            x = 0.2 * rng.standard_normal(shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(f, _shapes(cfg), is_leaf=lambda x: isinstance(
        x, tuple))


def _run(cfg, params, tokens, positions=None, segment_ids=None):
    """(logits as NumPy, aux); positions are always passed so each config compiles at most
    twice (with and without segment ids)."""
    tokens = np.asarray(tokens, np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, aux = _fwd(cfg)({"params": params}, jnp.asarray(tokens),
                            jnp.asarray(positions, jnp.int32),
                            None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32))
    return np.asarray(logits), aux


def _logits(cfg, params, tokens, positions=None, segment_ids=None):
    return _run(cfg, params, tokens, positions, segment_ids)[0]


def _alone(cfg, params, tokens):
    """Logits of `tokens` [B, n] run on their own from position 0. They are padded with random
    tokens to length T (one compiled shape); causality (tested below) makes the padding
    irrelevant to the first n positions."""
    b, n = tokens.shape
    pad = np.random.default_rng(n).integers(0, V, size=(b, T - n))
    return _logits(cfg, params, np.concatenate([tokens, pad], axis=1))[:, :n]


def _tokens(seed=0, b=2, t=T):
    return np.random.default_rng(seed).integers(0, V, size=(b, t)).astype(np.int32)


def _changed(tokens, pos):
    out = tokens.copy()
    out[:, pos] = (out[:, pos] + 17) % V
    return out


def _max_diff(a, b):
    return np.abs(a - b).max(axis=-1)  # [B, T]


# ---------------------------------------------------------------------------- building blocks


def test_rope_matches_numpy_rotate_half():
    rng = np.random.default_rng(0)
    b, t, n, d, theta = 2, 5, 3, 8, 500.0
    x = rng.standard_normal((b, t, n, d)).astype(np.float32)
    pos = rng.integers(0, 50, size=(b, t))
    out = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), theta))
    ref = np.empty_like(x, dtype=np.float64)
    for i in range(b):
        for j in range(t):
            for m in range(d // 2):
                a = pos[i, j] * theta ** (-2 * m / d)
                x1, x2 = x[i, j, :, m].astype(np.float64), x[i, j, :, m + d // 2]
                ref[i, j, :, m] = x1 * np.cos(a) - x2 * np.sin(a)
                ref[i, j, :, m + d // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # A rotation: norms of each (m, m + d/2) pair are kept; position 0 is the identity.
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    zero = np.asarray(rope(jnp.asarray(x), jnp.zeros((b, t), jnp.int32), theta))
    np.testing.assert_allclose(zero, x, atol=1e-7)


def test_rmsnorm_matches_numpy():
    rng = np.random.default_rng(1)
    x = (3 * rng.standard_normal((2, 3, 16))).astype(np.float32)
    scale = rng.standard_normal(16).astype(np.float32)
    out = RMSNorm(eps=1e-5).apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- masking


def test_causal_no_dependence_on_future_tokens():
    cfg = _cfg()
    params = _params(cfg)
    tokens = _tokens()
    base = _logits(cfg, params, tokens)
    assert base.shape == (2, T, V) and base.dtype == np.float32
    for s in (0, 5, T - 1):
        d = _max_diff(base, _logits(cfg, params, _changed(tokens, s)))
        assert d[:, :s].max(initial=0.0) <= 1e-6, s
        assert d[:, s:].min() > 1e-4, s  # the changed token and everything after it moves


def test_rope_is_relative_shifting_positions_keeps_logits():
    cfg = _cfg()
    params = _params(cfg)
    tokens = _tokens(1)
    pos = np.broadcast_to(np.arange(T), tokens.shape)
    a = _logits(cfg, params, tokens, pos)
    np.testing.assert_allclose(a, _logits(cfg, params, tokens), atol=1e-6)
    b = _logits(cfg, params, tokens, pos + 7)
    np.testing.assert_allclose(a, b, atol=2e-4)
    # ... but the positions do matter: a non-uniform change moves the logits.
    pos2 = pos.copy()
    pos2[:, 3:] += 5
    assert np.abs(a - _logits(cfg, params, tokens, pos2))[:, 3:].max() > 1e-3


def test_packed_segments_are_independent():
    cfg = _cfg()
    params = _params(cfg)
    a, b = 5, T - 5
    tokens = _tokens(2)
    seg = np.array([[1] * a + [2] * b] * 2, np.int32)
    pos = np.array([list(range(a)) + list(range(b))] * 2, np.int32)
    packed = _logits(cfg, params, tokens, pos, seg)
    # Each segment equals running it alone (positions from 0).
    np.testing.assert_allclose(packed[:, a:], _alone(cfg, params, tokens[:, a:]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, :a], _alone(cfg, params, tokens[:, :a]),
                               rtol=1e-5, atol=1e-5)
    # Changing segment 1 never changes segment 2 ...
    other = tokens.copy()
    other[:, :a] = _tokens(3)[:, :a]
    packed2 = _logits(cfg, params, other, pos, seg)
    assert np.abs(packed2[:, a:] - packed[:, a:]).max() <= 1e-6
    assert np.abs(packed2[:, :a] - packed[:, :a]).max() > 1e-3
    # ... while without segment ids it does (the test can tell).
    unpacked = _logits(cfg, params, tokens, pos)
    unpacked2 = _logits(cfg, params, other, pos)
    assert np.abs(unpacked2[:, a:] - unpacked[:, a:]).max() > 1e-3


def test_packed_three_segments():
    cfg = _cfg()
    params = _params(cfg)
    lens = [4, 5, 3]
    tokens = _tokens(4)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None]
    pos = np.concatenate([np.arange(n) for n in lens])[None]
    packed = _logits(cfg, params, tokens, pos, seg)
    start = 0
    for n in lens:
        np.testing.assert_allclose(packed[:, start:start + n],
                                   _alone(cfg, params, tokens[:, start:start + n]),
                                   rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("layers", [1, 2])
def test_sliding_window_receptive_field(layers):
    w = 3
    cfg = _cfg(num_layers=layers, sliding_window=w)
    params = _params(cfg)
    tokens = _tokens(5)
    base = _logits(cfg, params, tokens)
    reach = layers * (w - 1)  # each layer looks w − 1 tokens back
    s = 2
    d = _max_diff(base, _logits(cfg, params, _changed(tokens, s)))
    assert d[:, :s].max(initial=0.0) <= 1e-6
    assert d[:, s:s + reach + 1].min() > 1e-5  # t = s + reach still sees token s
    assert d[:, s + reach + 1:].max() <= 1e-6  # later positions do not
    # The same parameters without a window see all of the past.
    full = dataclasses.replace(cfg, sliding_window=0)
    d_full = _max_diff(_logits(full, params, tokens), _logits(full, params, _changed(tokens, s)))
    assert d_full[:, s:].min() > 1e-5


def test_sliding_window_at_least_length_is_full_attention():
    cfg = _cfg(sliding_window=T)
    params = _params(cfg)
    tokens = _tokens(6)
    full = dataclasses.replace(cfg, sliding_window=0)
    np.testing.assert_allclose(_logits(cfg, params, tokens), _logits(full, params, tokens),
                               atol=1e-6)


# ---------------------------------------------------------------------------- GQA


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg = _cfg(num_heads=4, num_kv_heads=2, attention_bias=True)
    params = _params(cfg, seed=1)
    mha = dataclasses.replace(cfg, num_kv_heads=4)
    group = cfg.num_heads // cfg.num_kv_heads

    def repeat(path, x):
        name = jax.tree_util.keystr(path)
        if "k_proj" in name or "v_proj" in name:
            # query head n uses kv head n // group: kernel [D, K, Dh] / bias [K, Dh]
            return jnp.repeat(x, group, axis=1 if "kernel" in name else 0)
        return x

    mha_params = jax.tree_util.tree_map_with_path(repeat, params)
    k_shape = mha_params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape
    assert k_shape == (32, 4, 8)
    expected = _shapes(mha)
    assert jax.tree.map(jnp.shape, mha_params) == expected
    tokens = _tokens(7)
    np.testing.assert_allclose(_logits(cfg, params, tokens), _logits(mha, mha_params, tokens),
                               rtol=1e-5, atol=1e-5)
    # Tiling instead of repeating (the wrong grouping) gives different logits.
    wrong = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.tile(x, (1, group, 1) if "kernel" in jax.tree_util.keystr(p)
                              else (group, 1))
        if ("k_proj" in jax.tree_util.keystr(p) or "v_proj" in jax.tree_util.keystr(p))
        else x, params)
    assert np.abs(_logits(cfg, params, tokens) - _logits(mha, wrong, tokens)).max() > 1e-3


# ---------------------------------------------------------------------------- scan / remat


def _stack_layers(params, n):
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"]
                                                              for i in range(n)])
    return out


def _unstack_layers(params, n):
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


@pytest.mark.parametrize("moe", [False, True])
def test_scan_layers_equals_unrolled(moe):
    extra = dict(num_experts=4, num_experts_per_tok=2, capacity_factor=1.0) if moe else {}
    cfg = _cfg(**extra)
    params = _params(cfg)
    scan = dataclasses.replace(cfg, scan_layers=True)
    stacked = _stack_layers(params, cfg.num_layers)
    assert jax.tree.map(jnp.shape, stacked) == _shapes(scan)
    tokens = _tokens(8)
    la, aux_a = _run(cfg, params, tokens)
    lb, aux_b = _run(scan, stacked, tokens)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
    assert set(aux_a) == set(aux_b)
    for key in aux_a:
        np.testing.assert_allclose(np.asarray(aux_a[key]), np.asarray(aux_b[key]),
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    if moe:
        # The router statistics, stacked over layers (the task computes the losses from them).
        b, t = tokens.shape
        assert aux_a["router_logits"].shape == (cfg.num_layers, b, t, 4)
        assert aux_a["expert_index"].shape == (cfg.num_layers, b, t, 2)
        assert aux_a["dropped_fraction"].shape == (cfg.num_layers,)
        for i in range(cfg.num_layers):  # each layer's own routing, not a copy of one
            top = np.argsort(-np.asarray(aux_a["router_logits"][i]), axis=-1, kind="stable")
            np.testing.assert_array_equal(np.asarray(aux_a["expert_index"][i]), top[..., :2])
        assert not np.allclose(aux_a["router_logits"][0], aux_a["router_logits"][1])
        assert not ({"load_balance", "balance_deviation", "router_z"} & set(aux_a))
    else:
        assert set(aux_a) == {"hidden"}
    # Swapping two layers changes the output (the layer order is really kept).
    swapped = dict(params, layers_0=params["layers_1"], layers_1=params["layers_0"])
    assert np.abs(la - _logits(cfg, swapped, tokens)).max() > 1e-3


def _loss_fn(cfg):
    def loss(p, tokens):
        logits, _ = Llama(cfg).apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    return jax.value_and_grad(loss)


def test_remat_policies_keep_loss_and_grads():
    cfg = _cfg()
    params = _params(cfg)
    tokens = jnp.asarray(_tokens(9, t=T + 1))
    policies = ["full", "dots", "dots_no_batch", "attention_out"]
    scan = dataclasses.replace(cfg, scan_layers=True, remat_policy="full")

    @jax.jit
    def all_grads(params, tokens):  # one compile for all variants
        out = {"none": _loss_fn(cfg)(params, tokens)}
        for policy in policies:
            out[policy] = _loss_fn(dataclasses.replace(cfg, remat_policy=policy))(params, tokens)
        loss, g = _loss_fn(scan)(_stack_layers(params, cfg.num_layers), tokens)
        out["scan+full"] = (loss, _unstack_layers(g, cfg.num_layers))
        return out

    out = all_grads(params, tokens)
    ref_loss, ref_grads = out.pop("none")
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads))
    assert set(out) == {*policies, "scan+full"}
    for name, (loss, grads) in out.items():
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=name)
        jax.tree.map(lambda a, b, n=name: np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7, err_msg=n), grads, ref_grads)


# ---------------------------------------------------------------------------- head / params


def test_tied_embeddings():
    cfg = _cfg(tie_embeddings=True)
    params = _params(cfg)
    assert "lm_head" not in params
    tokens = _tokens(10)
    logits, aux = _run(cfg, params, tokens)
    emb = np.asarray(params["embed_tokens"]["embedding"], np.float64)
    hidden = np.asarray(aux["hidden"], np.float64)
    assert hidden.shape == (2, T, 32)
    np.testing.assert_allclose(np.asarray(logits), hidden @ emb.T, rtol=1e-4, atol=1e-5)
    # Untied: logits = hidden · lm_head (the hidden state the model reports is the head input).
    untied = _cfg()
    up = _params(untied)
    assert "lm_head" in up
    lg, aux_u = _run(untied, up, tokens)
    np.testing.assert_allclose(
        np.asarray(lg),
        np.asarray(aux_u["hidden"], np.float64) @ np.asarray(up["lm_head"]["kernel"]),
        rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [
    {},
    {"tie_embeddings": True},
    {"attention_bias": True},
    {"head_dim": 16},
    {"num_kv_heads": 1},
    {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 20},
    {"num_experts": 3, "num_experts_per_tok": 1},
    {"scan_layers": True, "attention_bias": True, "tie_embeddings": True},
])
def test_num_params_matches_counted(kw):
    cfg = _cfg(**kw)
    shapes = jax.eval_shape(
        lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    leaves = jax.tree.leaves(nn.meta.unbox(shapes))
    counted = sum(math.prod(x.shape) for x in leaves)
    assert cfg.num_params() == counted
    embed = math.prod(nn.meta.unbox(shapes)["embed_tokens"]["embedding"].shape)
    head = 0 if cfg.tie_embeddings else math.prod(nn.meta.unbox(shapes)["lm_head"]["kernel"].shape)
    assert cfg.num_params(include_embeddings=False) == counted - embed - head


def test_flops_per_token_hand_computed():
    cfg = _cfg(num_heads=4, num_kv_heads=2)  # d 32, f 48, dh 8, L 2, V 64
    attn = 32 * 4 * 8 + 2 * (32 * 2 * 8) + 4 * 8 * 32  # q, k+v, o = 1024 + 1024 + 1024
    mlp = 3 * 32 * 48
    active = 2 * (attn + mlp) + 32 * 64
    assert active == 2 * (3072 + 4608) + 2048
    assert cfg.flops_per_token(16) == 6 * active + 12 * 2 * 4 * 8 * 16
    # The window caps the attended span.
    win = dataclasses.replace(cfg, sliding_window=4)
    assert win.flops_per_token(16) == 6 * active + 12 * 2 * 4 * 8 * 4
    assert win.flops_per_token(3) == 6 * active + 12 * 2 * 4 * 8 * 3
    # MoE: only the k routed experts count, plus the router.
    moe = dataclasses.replace(cfg, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    moe_mlp = 3 * 32 * 24 * 2 + 32 * 4
    assert moe.flops_per_token(16) == 6 * (2 * (attn + moe_mlp) + 32 * 64) + 12 * 2 * 4 * 8 * 16


def test_flops_matmul_params_match_param_tree():
    # For a dense model, N_active = every matmul kernel in the tree (the embedding lookup is
    # no matmul, the head is), whether tied or not.
    for tie in (False, True):
        cfg = _cfg(tie_embeddings=tie)
        params = _params(cfg)
        kernels = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                      if "kernel" in jax.tree_util.keystr(p))
        if tie:
            kernels += params["embed_tokens"]["embedding"].size
        attn_term = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * 10
        assert cfg.flops_per_token(10) == 6 * kernels + attn_term


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw,field", [
    ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
    ({"dtype": "float64"}, "dtype"),  # float16 is valid (with loss scaling)
    ({"dtype": "bf16"}, "dtype"),
    ({"remat_policy": "everything"}, "remat_policy"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_layers": -1}, "num_layers"),
    ({"hidden_size": 32.0}, "hidden_size"),
    ({"num_heads": True}, "num_heads"),
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),
    ({"sliding_window": -1}, "sliding_window"),
    ({"attention_impl": "flash"}, "attention_impl"),
    ({"num_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"head_dim": 7}, "head"),
])
def test_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        _cfg(**kw)


def test_config_accepts_valid_and_from_dict():
    cfg = LlamaConfig.from_dict({**BASE, "hidden_size": 30, "head_dim": 8, "dtype": "bfloat16"})
    assert cfg.head_size == 8 and cfg.compute_dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LlamaConfig.from_dict({**BASE, "num_hidden_layers": 2})


# ---------------------------------------------------------------------------- bf16


def test_bf16_compute_close_to_fp32():
    cfg = _cfg()
    params = _params(cfg)
    tokens = _tokens(11)
    ref = _logits(cfg, params, tokens)
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    out = _logits(bf, params, tokens)  # the same float32 parameters
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err = np.abs(out - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err
    assert err > 0  # it really computed in a lower precision
    # Argmax mostly agrees.
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9
