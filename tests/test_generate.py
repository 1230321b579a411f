"""KV-cache decoding and sampling (jaxtrain.generate, the cache of jaxtrain.models.llama).

* Greedy decoding is token-identical to transformers' ``generate(do_sample=False)`` (torch, CPU)
  on saved tiny random-init Llama (GQA), Qwen2 (q/k/v biases) and Mistral (a sliding window
  shorter than the sequence) models, for a batch of ragged, left-padded prompts.
* Decoding with the cache equals re-running the whole sequence without one, every step (dense
  with a sliding window, MoE, scanned layers).
* Sampling filters against NumPy references; seeds reproduce; temperature -> 0 is greedy;
  sample frequencies follow the filtered distribution.
* 8 devices (data x fsdp x tensor) give the tokens 1 device gives; LoRA-merged weights decode as
  the same weights merged by hand; stop tokens, max_new_tokens, max_context and bad input.
"""

import dataclasses
import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxtrain import lora
from jaxtrain.errors import ConfigError
from jaxtrain.generate import (
    Generator,
    SamplingConfig,
    decode_config,
    sample,
    top_k_filter,
    top_p_filter,
)
from jaxtrain.generate.decode import bucket
from jaxtrain.mesh import make_mesh
from jaxtrain.models.llama import Llama, LlamaConfig, init_cache, init_params, unstack_layers
from jaxtrain.tree import nest

V = 128
BASE = dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=96)
LENGTHS = (9, 3, 14)  # ragged prompts: left padding differs per row


def _cfg(**kw) -> LlamaConfig:
    return LlamaConfig(**{**BASE, **kw})


@functools.cache
def _params(cfg: LlamaConfig, seed: int = 0, boxed: bool = False):
    """Random numpy parameters of init_params' shapes: weights N(0, 0.2²) (peaked logits: few
    near-ties for argmax), norm scales 1 + N(0, 0.3²), biases N(0, 0.3²)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1.0 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
        return ((0.3 if "bias" in name else 0.2) * rng.standard_normal(s.shape)).astype(
            np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes if boxed else nn.unbox(shapes))


def _prompts(lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, n).tolist() for n in lengths]


def _left_padded(prompts, total: int):
    """(tokens, segment_ids, positions) [B, total] with the prompts right-aligned at column
    P = the longest prompt (new tokens go at P, P+1, ...)."""
    p = max(map(len, prompts))
    tokens = np.zeros((len(prompts), total), np.int32)
    seg = np.zeros((len(prompts), total), np.int32)
    for b, row in enumerate(prompts):
        tokens[b, p - len(row):p] = row
        seg[b, p - len(row):] = 1
    return tokens, seg, np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)


@functools.cache
def _forward(cfg: LlamaConfig):
    return jax.jit(lambda p, t, pos, seg: Llama(cfg).apply({"params": p}, t, pos, seg)[0])


def _greedy_without_cache(cfg: LlamaConfig, params, prompts, n: int) -> list[list[int]]:
    """Greedy decoding by re-running the whole (left-padded) sequence at every step: token t
    = argmax of the full forward pass's logits at the last filled column. One compiled shape
    (the unfilled columns on the right cannot affect earlier ones: causal)."""
    p = max(map(len, prompts))
    tokens, seg, pos = _left_padded(prompts, p + n)
    for t in range(n):
        logits = np.asarray(_forward(cfg)(params, tokens, pos, seg))
        tokens[:, p + t] = logits[:, p + t - 1].argmax(-1)
    return tokens[:, p:].tolist()


def _tokens(completions) -> list[list[int]]:
    return [c.tokens for c in completions]


@functools.cache
def _generator(cfg: LlamaConfig, mesh_axes: tuple = (), seed: int = 0) -> Generator:
    mesh = make_mesh(dict(mesh_axes)) if mesh_axes else None
    return Generator(cfg, _params(cfg, seed), mesh=mesh)


GREEDY = SamplingConfig(max_new_tokens=24)
SAMPLED = SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.9, seed=7)


# ------------------------------------------------------------------ parity with transformers


def _hf_model(arch: str, **kw):
    """A tiny random-init float32 transformers model (tests/test_hf_llama.py's: eager attention,
    norms and biases perturbed away from 1 / 0); initializer_range 0.1 gives peaked logits."""
    from tests.test_hf_llama import _hf_model as hf_model

    return hf_model(arch, initializer_range=0.1, **kw)


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}),                       # GQA: 4 query heads, 2 kv heads
    ("qwen2", {}),                       # q/k/v biases
    ("mistral", {"sliding_window": 6}),  # window 6 < prompt (<= 14) + 40 new tokens
])
def test_greedy_matches_transformers(arch, kw, tmp_path):
    """Fair comparison: both sides float32, eager attention, the same left-padded batch
    (transformers: attention_mask + pad_token_id, positions from the mask as ours), and no
    stopping on either side (transformers' eos_token_id = None, our eos_ids = ()), so both
    emit exactly 40 tokens per row, compared token for token."""
    torch = pytest.importorskip("torch")
    from jaxtrain.hf.llama import load_hf

    model = _hf_model(arch, **kw)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    assert cfg.num_kv_heads == 2 and cfg.sliding_window == kw.get("sliding_window", 0)
    assert cfg.attention_bias == (arch == "qwen2")
    prompts, n = _prompts(), 40
    p = max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(prompts):
        ids[b, p - len(row):], mask[b, p - len(row):] = row, 1
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    want = out[:, p:].numpy().tolist()

    got = Generator(cfg, params).generate(prompts, SamplingConfig(max_new_tokens=n))
    assert _tokens(got) == want
    assert all(c.finish_reason == "length" and c.prompt_tokens == prompts[i]
               for i, c in enumerate(got))
    assert all(len(set(row)) >= 3 for row in want)  # not one repeated token
    if arch == "mistral":  # the window matters for these sequences
        full = dataclasses.replace(cfg, sliding_window=0)
        assert _tokens(Generator(full, params).generate(prompts, SamplingConfig(n))) != want


# ------------------------------------------------------------------ cache == no cache


@pytest.mark.parametrize("kw", [
    {"sliding_window": 5},
    {"num_experts": 4, "num_experts_per_tok": 2, "capacity_factor": 2.0},
], ids=["window", "moe"])
def test_cache_logits_equal_full_forward(kw):
    """Model level: a left-padded prefill into the cache, then one token per call; the logits of
    every real position equal the full forward pass's (positions and padding given the same
    way). MoE at capacity_factor = experts / k drops nothing either way."""
    cfg = _cfg(**kw)
    params = _params(cfg)
    prompts, n = _prompts((8, 5, 2)), 6
    p = 8
    tokens, seg, pos = _left_padded(prompts, p + n)
    tokens[:, p:] = np.random.default_rng(3).integers(0, V, (3, n))
    want = np.asarray(_forward(cfg)(params, tokens, pos, seg))

    model = Llama(cfg)
    cache = init_cache(cfg, 3, p + n + 2)
    assert cache["k"].shape == (2, 3, p + n + 2, 2, 16) and not cache["valid"].any()
    logits, aux = model.apply({"params": params}, tokens[:, :p], pos[:, :p], seg[:, :p],
                              cache=cache)
    cache = aux["cache"]
    assert int(cache["index"]) == p
    np.testing.assert_array_equal(np.asarray(cache["valid"])[:, :p], seg[:, :p] > 0)
    for b, row in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(logits)[b, p - len(row):],
                                   want[b, p - len(row):p], rtol=1e-4, atol=1e-4)
    for t in range(n):  # positions left to the cache's count of valid slots
        logits, aux = model.apply({"params": params}, tokens[:, p + t:p + t + 1], cache=cache)
        cache = aux["cache"]
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, p + t], rtol=1e-4,
                                   atol=1e-4)
    assert int(cache["index"]) == p + n


@pytest.mark.parametrize("kw", [
    {"sliding_window": 4},
    {"num_experts": 4, "num_experts_per_tok": 2},
    {"scan_layers": True, "remat_policy": "full"},
], ids=["dense_window", "moe", "scan"])
def test_generator_equals_greedy_without_cache(kw):
    """The Generator (prefill + on-device loop) gives the tokens of greedy decoding by full
    forward passes. MoE: the reference runs at the decoder's no-drop capacity factor (the
    config's 1.25 could drop tokens in the long forward pass). Scan: the scanned parameters
    go in as they are; the reference runs the scanned model."""
    cfg = _cfg(**kw)
    ref_cfg = dataclasses.replace(cfg, capacity_factor=2.0) if cfg.num_experts else cfg
    want = _greedy_without_cache(ref_cfg, _params(cfg), _prompts(), GREEDY.max_new_tokens)
    gen = _generator(cfg)
    assert gen.cfg == decode_config(cfg) and not gen.cfg.scan_layers
    assert gen.cfg.remat_policy == "none"
    assert gen.cfg.capacity_factor == (2.0 if cfg.num_experts else cfg.capacity_factor)
    assert _tokens(gen.generate(_prompts(), GREEDY)) == want


def test_scanned_model_with_a_cache_is_an_error():
    cfg = _cfg(scan_layers=True)
    params = _params(cfg)
    with pytest.raises(ValueError, match=r"scan_layers=True.*unstack_layers"):
        Llama(cfg).apply({"params": params}, np.zeros((1, 4), np.int32),
                         cache=init_cache(cfg, 1, 8))
    flat = unstack_layers(params)
    assert "layers" not in flat and set(flat["layers_1"]) == set(params["layers"])
    np.testing.assert_array_equal(flat["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  params["layers"]["mlp"]["up_proj"]["kernel"][1])


# ------------------------------------------------------------------ sampling


def _np_top_k(z, k):
    kth = np.sort(z, axis=-1)[..., -k][..., None]
    return np.where(z >= kth, z, -np.inf)


def _np_top_p(z, p):
    out = np.full_like(z, -np.inf)
    for i, row in enumerate(z):
        order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        mass, keep = 0.0, []
        for j, q in zip(order, probs, strict=True):
            keep.append(j)
            mass += q
            if mass >= p:
                break
        cutoff = row[keep].min()
        out[i] = np.where(row >= cutoff, row, -np.inf)
    return out


def test_top_k_and_top_p_match_numpy():
    z = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
    for k in (1, 5, 49):
        np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(z), k)),
                                      _np_top_k(z, k))
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(z), 0)), z)
    for p in (1e-6, 0.3, 0.9, 0.999):
        got = np.asarray(top_p_filter(jnp.asarray(z), p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(_np_top_p(z, p)))
    # p -> 0 keeps the most likely token alone; p = 1 keeps everything
    assert (np.isfinite(np.asarray(top_p_filter(jnp.asarray(z), 1e-6))).sum(-1) == 1).all()
    assert np.isfinite(np.asarray(top_p_filter(jnp.asarray(z), 1.0))).all()


def test_sample_frequencies_follow_filtered_distribution():
    """20000 draws from a 6-way categorical with temperature 0.7, top-k 4, top-p 0.9: the
    counts of the kept tokens match softmax(filtered logits) (chi-square, 5 sigma), the
    filtered-out tokens are never drawn."""
    z = np.array([2.0, 1.5, 1.0, 0.5, 0.0, 3.0], np.float32)
    n = 20000
    draws = np.asarray(sample(jnp.broadcast_to(jnp.asarray(z), (n, 6)), jax.random.key(0),
                              temperature=0.7, top_k=4, top_p=0.9))
    zt = _np_top_p(_np_top_k(z[None] / 0.7, 4), 0.9)[0]
    kept = np.isfinite(zt)
    probs = np.exp(zt[kept] - zt[kept].max())
    probs /= probs.sum()
    counts = np.bincount(draws, minlength=6)
    assert kept.sum() == 3 and counts[~kept].sum() == 0
    expected = n * probs
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    dof = kept.sum() - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (counts, expected)


def test_sample_greedy_and_seeds():
    z = jnp.asarray(np.random.default_rng(1).normal(size=(16, 50)), jnp.float32)
    greedy = np.asarray(sample(z, jax.random.key(0), temperature=0))
    np.testing.assert_array_equal(greedy, np.asarray(z).argmax(-1))
    np.testing.assert_array_equal(np.asarray(sample(z, jax.random.key(5), temperature=1e-6)),
                                  greedy)
    a = np.asarray(sample(z, jax.random.key(1), temperature=1.0))
    assert (a == np.asarray(sample(z, jax.random.key(1), temperature=1.0))).all()
    assert (a != np.asarray(sample(z, jax.random.key(2), temperature=1.0))).any()
    keys = jax.random.split(jax.random.key(3), 16)  # one key per row
    per_row = np.asarray(sample(z, keys, temperature=1.0))
    np.testing.assert_array_equal(per_row[:4], np.asarray(sample(z[:4], keys[:4],
                                                                 temperature=1.0)))


def test_generator_sampling_is_reproducible():
    gen = _generator(_cfg())
    prompts = _prompts()
    a = gen.generate(prompts, SAMPLED)
    assert _tokens(a) == _tokens(gen.generate(prompts, SAMPLED))
    assert _tokens(a) != _tokens(gen.generate(prompts, dataclasses.replace(SAMPLED, seed=8)))
    assert _tokens(a) != _tokens(gen.generate(prompts, GREEDY))
    # a row's tokens do not depend on the rows beside it (per-row keys): row 0 alone
    assert _tokens(gen.generate(prompts[:1], SAMPLED)) == _tokens(a)[:1]
    cold = dataclasses.replace(SAMPLED, temperature=1e-6, top_k=0, top_p=1.0)
    assert _tokens(gen.generate(prompts, cold)) == _tokens(gen.generate(prompts, GREEDY))


# ------------------------------------------------------------------ meshes, LoRA, dtypes


def test_eight_devices_give_the_tokens_of_one():
    cfg = _cfg(num_kv_heads=2)
    params = _params(cfg)
    one = Generator(cfg, params, mesh=make_mesh({"data": 1}, jax.devices()[:1]))
    eight = _generator(cfg, (("data", 2), ("fsdp", 2), ("tensor", 2)))
    # the parameters really are sharded over fsdp and tensor
    q = eight.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec[:2] == ("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32, 2, 16)
    prompts = _prompts()
    for sampling in (GREEDY, SAMPLED):
        assert _tokens(eight.generate(prompts, sampling)) == \
            _tokens(one.generate(prompts, sampling))
    assert eight.compiled_keys[0][0] == 4  # batch 3 -> bucket 4 (a multiple of data x fsdp)


def test_lora_merged_weights_decode_as_merged_by_hand():
    """Adapters (random A and B, rank 2) on q_proj, o_proj and down_proj, merged by
    lora.merge (as a LoRA run's eval params are), decode exactly as the base weights plus
    (alpha / r) · A B computed here in NumPy; and differently from the base alone."""
    cfg = _cfg()
    boxed = _params(cfg, boxed=True)
    base = nn.unbox(boxed)
    lora_cfg = ml_collections.ConfigDict(dict(
        rank=2, alpha=4.0, dropout=0.0, targets=r".*(q_proj|o_proj|down_proj)/kernel"))
    adapters = lora.init_adapters(boxed, lora_cfg, jax.random.key(1))
    rng = np.random.default_rng(2)
    adapters = {path: {"a": np.asarray(nn.unbox(ab["a"])),
                       "b": 0.3 * rng.standard_normal(nn.unbox(ab["b"]).shape).astype(
                           np.float32)} for path, ab in adapters.items()}
    merged = lora.merge({"lora": nest(adapters)}, base, lora_cfg)

    by_hand = jax.tree.map(np.copy, base)
    for path, ab in adapters.items():
        node = by_hand
        *parents, leaf = path.split("/")
        for key in parents:
            node = node[key]
        node[leaf] = node[leaf] + 2.0 * np.tensordot(ab["a"], ab["b"], axes=([-1], [0]))
    assert len(adapters) == 6

    prompts = _prompts()
    got = Generator(cfg, merged).generate(prompts, GREEDY)
    assert _tokens(got) == _tokens(Generator(cfg, by_hand).generate(prompts, GREEDY))
    assert _tokens(got) != _tokens(Generator(cfg, base).generate(prompts, GREEDY))


def test_bfloat16_compute():
    """bf16 compute: matmul weights stored in bf16, norms in float32, a bf16 cache; greedy
    tokens follow greedy decoding by bf16 full forward passes until bf16 rounding (other
    matmul shapes, other summation order) flips a near-tie: here the 8th token."""
    cfg = _cfg(dtype="bfloat16")
    gen = _generator(cfg)
    assert gen.params["layers_0"]["mlp"]["gate_proj"]["kernel"].dtype == jnp.bfloat16
    assert gen.params["layers_0"]["input_layernorm"]["scale"].dtype == jnp.float32
    assert init_cache(cfg, 1, 4)["k"].dtype == jnp.bfloat16
    prompts = _prompts()
    want = _greedy_without_cache(cfg, _params(cfg), prompts, 8)
    got = gen.generate(prompts, SamplingConfig(max_new_tokens=8))
    assert [row[:7] for row in _tokens(got)] == [row[:7] for row in want]


# ------------------------------------------------------------------ stopping and limits


def test_stop_tokens_and_max_new_tokens():
    gen = _generator(_cfg())
    prompts = _prompts()
    free = _tokens(gen.generate(prompts, GREEDY))
    eos, stop = free[0][5], free[1][3]
    out = gen.generate(prompts, dataclasses.replace(GREEDY, eos_ids=(eos,), stop_ids=(stop,)))
    for row, c in zip(free, out, strict=True):
        cut = next((j for j, t in enumerate(row) if t in (eos, stop)), None)
        if cut is None:
            assert c.tokens == row and c.finish_reason == "length"
        else:
            assert c.tokens == row[:cut + 1] and c.finish_reason == "stop"
    assert out[0].tokens[-1] in (eos, stop) and len(out[0].tokens) <= 6
    assert out[1].tokens[-1] in (eos, stop) and len(out[1].tokens) <= 4

    short = gen.generate(prompts, SamplingConfig(max_new_tokens=5))
    assert _tokens(short) == [row[:5] for row in free]
    assert all(c.finish_reason == "length" for c in short)
    # 5 and 24 new tokens, prompts of 3..14 tokens: two buckets of new tokens, one of prompts
    keys = gen.compiled_keys
    assert {k[2] for k in keys} >= {16, 32} and {k[1] for k in keys} == {16}


def test_max_context(caplog):
    cfg = _cfg()
    gen = Generator(cfg, _params(cfg), max_context=20)
    prompts = _prompts()  # 9, 3, 14 tokens
    with caplog.at_level(logging.WARNING):
        out = gen.generate(prompts, SamplingConfig(max_new_tokens=30))
    assert [len(c.tokens) for c in out] == [6, 6, 6]  # 20 - 14
    assert "max_context (20)" in caplog.text and "at most 6 new tokens" in caplog.text
    with pytest.raises(ConfigError, match=r"prompt row 1 has 21 tokens.*context of 20"):
        gen.generate([[1, 2], [5] * 21], GREEDY)
    assert [c.tokens for c in gen.generate([[7] * 20], GREEDY)] == [[]]


def test_bad_input_is_named():
    gen = _generator(_cfg())
    with pytest.raises(ConfigError, match=r"prompt row 1 is empty"):
        gen.generate([[1, 2], []])
    with pytest.raises(ConfigError, match=r"prompt row 0: token id 128 is outside.*\[0, 128\)"):
        gen.generate([[1, 128]])
    assert gen.generate([]) == []
    for kw, match in [({"temperature": -1.0}, "temperature must be >= 0"),
                      ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                      ({"top_k": -2}, "top_k must be an int >= 0"),
                      ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
                      ({"eos_ids": (1, -3)}, "eos_ids must be a tuple of token ids")]:
        with pytest.raises(ConfigError, match=match):
            SamplingConfig(**kw)
    wrong = _params(_cfg(intermediate_size=64))
    with pytest.raises(ConfigError, match=r"do not fit.*mlp/up_proj/kernel: got \[64, 64\], "
                                          r"expected \[64, 96\]"):
        Generator(_cfg(), wrong)
    with pytest.raises(ConfigError, match=r"pad_id must be a token id in \[0, 128\)"):
        Generator(_cfg(), _params(_cfg()), pad_id=128)
    assert (bucket(1), bucket(16), bucket(17), bucket(3, 1)) == (16, 16, 32, 4)
