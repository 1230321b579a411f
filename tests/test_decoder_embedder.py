"""Llama-family decoders as text encoders (:class:`jaxtrain.models.llama.LlamaEncoder`).

Causal: hidden states equal ``transformers.AutoModel``'s (LlamaModel, Qwen2Model, MistralModel;
random-init tiny models saved with ``save_pretrained``) on the real positions of right- and
left-padded rows. Bidirectional (``causal=False``, no transformers reference): a NumPy forward
pass written here from the formulas, checked first against transformers with a causal mask,
then run with a padding-only mask.
"""

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from jaxtrain.hf import llama_encoder  # noqa: E402
from jaxtrain.models.llama import Llama, LlamaEncoder, hidden_states  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 64}
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def _save(arch: str, path, seed: int = 0, **kwargs):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **kwargs})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)


def _rows(side: str, t: int = 10):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY["vocab_size"], (3, t)).astype(np.int32)
    lengths = np.array([t, 6, 2])
    mask = np.arange(t)[None] < lengths[:, None]
    tokens = np.where(mask, tokens, 0)
    if side == "left":  # the same rows, their real tokens moved to the end
        tokens = np.stack([np.roll(r, t - n) for r, n in zip(tokens, lengths, strict=True)])
        mask = np.stack([np.roll(r, t - n) for r, n in zip(mask, lengths, strict=True)])
    return tokens, mask


@pytest.mark.parametrize("arch,side", [("llama", "right"), ("llama", "left"),
                                       ("qwen2", "left"), ("mistral", "right")])
def test_causal_hidden_states_equal_automodel(tmp_path, arch, side):
    _save(arch, tmp_path)
    cfg, params = llama_encoder.load_hf(tmp_path)
    assert "lm_head" not in params
    tokens, mask = _rows(side)
    ours = np.asarray(jax.jit(LlamaEncoder(cfg).apply)({"params": params}, tokens, mask))
    theirs = llama_encoder.transformers_hidden(tmp_path, tokens, mask)
    np.testing.assert_allclose(ours[mask], theirs[mask], **TOL)


def test_base_model_round_trip_and_hidden_only(tmp_path):
    """save_hf writes a base-model (Qwen2Model) dir AutoModel loads with equal hidden states;
    load_hf reads that layout back; hidden_only equals the LM's aux['hidden']."""
    _save("qwen2", tmp_path / "lm")
    cfg, params = llama_encoder.load_hf(tmp_path / "lm")
    llama_encoder.save_hf(tmp_path / "enc", params, cfg, model_type="qwen2")
    tokens, mask = _rows("right")
    ours = np.asarray(LlamaEncoder(cfg).apply({"params": params}, tokens, mask))
    theirs = llama_encoder.transformers_hidden(tmp_path / "enc", tokens, mask)
    np.testing.assert_allclose(ours[mask], theirs[mask], **TOL)
    cfg2, params2 = llama_encoder.load_hf(tmp_path / "enc")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # the causal LM's own path: hidden_only / hidden_states vs aux["hidden"] with an lm_head
    from jaxtrain.hf.llama import load_hf as load_lm

    lm_cfg, lm_params = load_lm(tmp_path / "lm")
    _, aux = Llama(lm_cfg).apply({"params": lm_params}, tokens, segment_ids=mask.astype(np.int32))
    got = hidden_states(lm_cfg, lm_params, tokens, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(aux["hidden"]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# causal=False against a NumPy reference
# ----------------------------------------------------------------------------------------------

def _numpy_forward(cfg, params, tokens, allowed):
    """The decoder's final normed hidden states from the formulas, float64: RMSNorm, RoPE
    (rotate half), grouped-query softmax attention over ``allowed`` [B, T, T], SwiGLU."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h, k_heads, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    t = tokens.shape[1]
    # a query allowed no key (padding) attends to itself: no NaN to leak through 0 weights
    allowed = allowed | (~allowed.any(-1, keepdims=True) & np.eye(t, dtype=bool))

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * scale

    inv = 1.0 / cfg.rope_theta ** (np.arange(0, dh, 2) / dh)
    ang = np.arange(t)[:, None] * inv  # [T, dh/2]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

    def rope(x):
        x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = p["embed_tokens"]["embedding"][tokens]
    for i in range(cfg.num_layers):
        lp = p[f"layers_{i}"]
        a = rms(x, lp["input_layernorm"]["scale"])
        att = lp["self_attn"]

        def proj(name, a=a, att=att):
            y = np.einsum("btd,dnk->btnk", a, att[name]["kernel"])
            return y + att[name]["bias"] if "bias" in att[name] else y

        q, k, v = rope(proj("q_proj")), rope(proj("k_proj")), proj("v_proj")
        k, v = np.repeat(k, h // k_heads, axis=2), np.repeat(v, h // k_heads, axis=2)
        s = np.einsum("bqnk,bsnk->bnqs", q, k) / np.sqrt(dh)
        s = np.where(allowed[:, None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bnqs,bsnk->bqnk", w, v)
        x = x + np.einsum("bqnk,nkd->bqd", o, att["o_proj"]["kernel"])
        a = rms(x, lp["post_attention_layernorm"]["scale"])
        mlp = lp["mlp"]
        g = a @ mlp["gate_proj"]["kernel"]
        x = x + ((g / (1 + np.exp(-g))) * (a @ mlp["up_proj"]["kernel"])) @ \
            mlp["down_proj"]["kernel"]
    return rms(x, p["norm"]["scale"])


def test_bidirectional_matches_numpy_reference(tmp_path):
    _save("qwen2", tmp_path)
    cfg, params = llama_encoder.load_hf(tmp_path)
    tokens, mask = _rows("right")
    t = tokens.shape[1]
    pair = mask[:, :, None] & mask[:, None, :]
    causal = np.tril(np.ones((t, t), bool))[None]
    # the reference with a causal mask is transformers' model: the reference is right
    ref_causal = _numpy_forward(cfg, params, tokens, pair & causal)
    theirs = llama_encoder.transformers_hidden(tmp_path, tokens, mask)
    np.testing.assert_allclose(ref_causal[mask], theirs[mask], **TOL)
    bi = dataclasses.replace(cfg, causal=False)
    ours = np.asarray(LlamaEncoder(bi).apply({"params": params}, tokens, mask))
    ref = _numpy_forward(cfg, params, tokens, pair)
    np.testing.assert_allclose(ours[mask], ref[mask], **TOL)
    # bidirectional: the first token sees the later ones (differs from causal)
    assert np.abs(ours[0, 0] - ref_causal[0, 0]).max() > 1e-3
    # left padding: the same real-token states (RoPE is relative: positions shift uniformly)
    left_tokens, left_mask = _rows("left")
    left = np.asarray(LlamaEncoder(bi).apply({"params": params}, left_tokens, left_mask))
    np.testing.assert_allclose(left[1][left_mask[1]], ours[1][mask[1]], rtol=1e-4, atol=1e-4)


def test_bidirectional_sliding_window_and_no_cache():
    """causal=False with a sliding window attends |i - j| < window on both sides."""
    from jaxtrain.models.llama import LlamaConfig, init_cache

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, sliding_window=3, causal=False)
    params = nn.unbox(LlamaEncoder(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32)))
    params = params["params"]
    tokens = np.random.default_rng(1).integers(0, 64, (2, 8)).astype(np.int32)
    ours = np.asarray(LlamaEncoder(cfg).apply({"params": params}, tokens))
    i = np.arange(8)
    band = np.abs(i[:, None] - i[None, :]) < 3
    ref = _numpy_forward(cfg, params, tokens, np.broadcast_to(band, (2, 8, 8)))
    np.testing.assert_allclose(ours, ref, **TOL)
    with pytest.raises(ValueError, match="causal=False"):
        Llama(cfg).apply({"params": params}, tokens, cache=init_cache(cfg, 2, 8))
