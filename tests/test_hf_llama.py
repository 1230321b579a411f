"""Parity of jaxtrain's Llama-family decoder with Hugging Face transformers (torch, CPU).

Random-init tiny transformers models (no download) are saved with ``save_pretrained`` and loaded
with :func:`jaxtrain.hf.load_hf`, and jaxtrain models are exported with
:func:`jaxtrain.hf.save_hf` and loaded with ``AutoModelForCausalLM.from_pretrained``; logits
must agree to 1e-4 in float32.
"""

import dataclasses
import functools
import json
import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from jaxtrain.hf import config_from_hf, config_to_hf, load_hf, save_hf  # noqa: E402
from jaxtrain.hf.llama import params_from_hf, params_to_hf  # noqa: E402
from jaxtrain.models.llama import Llama, LlamaConfig, init_params  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128}
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def _hf_model(arch: str, seed: int = 0, **kwargs):
    """A random-init float32 transformers model whose norm weights and biases are perturbed away
    from 1 / 0, so that misplaced norms or biases change the logits."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **kwargs})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, segment_ids):
    return Llama(cfg).apply({"params": params}, tokens, positions, segment_ids)[0]


def _jax_logits(cfg, params, tokens, positions=None, segment_ids=None) -> np.ndarray:
    return np.asarray(_forward(cfg, params, jnp.asarray(tokens), positions, segment_ids))


def _tokens(b: int = 2, t: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, TINY["vocab_size"], (b, t))


def _init_shapes(cfg: LlamaConfig, boxed: bool = False):
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return shapes if boxed else nn.unbox(shapes)


def _assert_tree_like_init(cfg: LlamaConfig, params) -> None:
    ref = _init_shapes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        assert got.shape == want.shape and got.dtype == np.float32


def _random_params(cfg: LlamaConfig, seed: int = 0, boxed: bool = False):
    """Random parameters shaped as init_params' (numpy: compiling the init costs seconds on
    CPU); norm scales near 1, everything else (biases included) ~ N(0, 0.1^2)."""
    rng = np.random.RandomState(seed)

    def leaf(path, s):
        x = 0.1 * rng.standard_normal(s.shape).astype(np.float32)
        return x + 1.0 if "norm" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(leaf, _init_shapes(cfg, boxed))


# ------------------------------------------------------------------ HF -> jaxtrain


@pytest.mark.parametrize("case", ["llama", "llama_tied", "qwen2", "mistral", "llama_scan"])
def test_hf_to_jaxtrain_logits(case, tmp_path):
    overrides = {}
    if case == "llama":
        model = _hf_model("llama", rope_theta=50000.0)
    elif case == "llama_tied":
        model = _hf_model("llama", tie_word_embeddings=True)
    elif case == "qwen2":
        model = _hf_model("qwen2", seed=1)
    elif case == "mistral":
        # A window shorter than T (transformers' eager attention applies it), head_dim != D/H.
        model = _hf_model("mistral", seed=2, sliding_window=4, head_dim=24)
    else:
        model = _hf_model("llama", seed=3)
        overrides = {"scan_layers": True}
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_hf(tmp_path, **overrides)

    _assert_tree_like_init(cfg, params)
    tokens = _tokens()
    np.testing.assert_allclose(_jax_logits(cfg, params, tokens), _torch_logits(model, tokens),
                               **TOL)
    if case == "llama":
        assert cfg.rope_theta == 50000.0 and not cfg.tie_embeddings
    if case == "llama_tied":
        assert cfg.tie_embeddings and "lm_head" not in params
    if case == "qwen2":
        assert cfg.attention_bias and cfg.sliding_window == 0
        assert "bias" in params["layers_0"]["self_attn"]["q_proj"]
    if case == "mistral":
        assert cfg.sliding_window == 4 and cfg.head_size == 24
        # The window matters on these tokens: without it the logits differ.
        full = dataclasses.replace(cfg, sliding_window=0)
        assert np.abs(_jax_logits(full, params, tokens) - _torch_logits(model, tokens)).max() > 1e-2
    if case == "llama_scan":
        assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)


def test_load_bf16_checkpoint(tmp_path):
    model = _hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    _, params = load_hf(tmp_path)
    want = model.model.embed_tokens.weight.detach().float().numpy()
    got = params["embed_tokens"]["embedding"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_config_from_hf_legacy_and_v5_rope_theta():
    base = {"model_type": "llama", **TINY}
    assert config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None}).rope_theta == 5e5
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    cfg = config_from_hf(v5, dtype="bfloat16", scan_layers=True)
    assert (cfg.rope_theta, cfg.dtype, cfg.scan_layers) == (1e6, "bfloat16", True)
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 0
    assert config_from_hf({**base, "num_key_value_heads": None}).num_kv_heads == 4
    qwen = {**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096}
    assert config_from_hf(qwen).sliding_window == 0
    assert config_from_hf({**base, "model_type": "mistral", "sliding_window": None}) \
        .sliding_window == 0


# ------------------------------------------------------------------ jaxtrain -> HF


@pytest.mark.parametrize("model_type,kwargs", [
    ("llama", {}),
    ("qwen2", {"attention_bias": True, "tie_embeddings": True, "sliding_window": 4,
               "head_dim": 24}),
    ("mistral", {"sliding_window": 4, "scan_layers": True, "rope_theta": 1e6}),
])
def test_jaxtrain_to_hf_logits(model_type, kwargs, tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, rms_norm_eps=1e-6, **kwargs)
    params = _random_params(cfg)

    # params_to_hf / params_from_hf round trip exactly.
    state = params_to_hf(params, cfg)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())
    back = params_from_hf(state, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))

    save_hf(tmp_path, params, cfg, model_type)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == config_to_hf(cfg, model_type)["architectures"][0]
    assert next(model.parameters()).dtype == torch.float32
    tokens = _tokens(seed=1)
    np.testing.assert_allclose(_torch_logits(model.eval(), tokens),
                               _jax_logits(cfg, params, tokens), **TOL)


def test_save_hf_accepts_boxed_params(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=48)
    boxed = jax.tree.map(jnp.asarray, _random_params(cfg, boxed=True))
    assert isinstance(boxed["norm"]["scale"], nn.Partitioned)
    save_hf(tmp_path, boxed, cfg)
    cfg2, params = load_hf(tmp_path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nn.unbox(boxed)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


# ------------------------------------------------------------------ packed rows


def test_packed_rows_match_separate_torch_runs(tmp_path):
    model = _hf_model("llama", seed=4)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_hf(tmp_path)
    tokens = _tokens(b=2, t=16, seed=2)
    segment_ids = jnp.asarray([[1] * 8 + [2] * 8] * 2)
    positions = jnp.asarray([list(range(8)) * 2] * 2)
    packed = _jax_logits(cfg, params, tokens, positions, segment_ids)
    np.testing.assert_allclose(packed[:, :8], _torch_logits(model, tokens[:, :8]), **TOL)
    np.testing.assert_allclose(packed[:, 8:], _torch_logits(model, tokens[:, 8:]), **TOL)


# ------------------------------------------------------------------ errors


def _write_config(path, **hf):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY, **hf}))
    return path


def test_unsupported_configs():
    base = {"model_type": "llama", **TINY}
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*llama.*mistral.*qwen2"):
        config_from_hf({**base, "model_type": "gpt2"})
    llama3 = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    with pytest.raises(ValueError, match=r"rope_parameters.rope_type='llama3'.*not supported"):
        config_from_hf({**base, "rope_parameters": llama3})
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='linear'.*not supported"):
        config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"mlp_bias=True"):
        config_from_hf({**base, "mlp_bias": True})
    with pytest.raises(ValueError, match=r"hidden_act='gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match=r"attention_bias=True.*o_proj"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match=r"layer_types"):
        config_from_hf({**base, "model_type": "qwen2", "use_sliding_window": True,
                        "sliding_window": 4, "max_window_layers": 1})
    with pytest.raises(ValueError, match=r"missing the required key .hidden_size."):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match=r"unknown LlamaConfig keys \['scan'\]"):
        config_from_hf(base, scan=True)
    with pytest.raises(ValueError, match=r"num_experts=4"):
        config_to_hf(LlamaConfig(num_experts=4))
    with pytest.raises(ValueError, match=r"qwen2"):
        config_to_hf(LlamaConfig(attention_bias=True), "llama")
    with pytest.raises(ValueError, match=r"mistral"):
        config_to_hf(LlamaConfig(sliding_window=8), "llama")


def test_load_hf_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json does not exist"):
        load_hf(tmp_path / "empty")
    d = _write_config(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or .*noweights"):
        load_hf(d)
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*never unpickles.*safe_serialization"):
        load_hf(d)
    d = _write_config(tmp_path / "llama3", rope_parameters={"rope_type": "llama3",
                                                            "rope_theta": 5e5})
    with pytest.raises(ValueError, match=r"llama3/config.json.*'llama3'"):
        load_hf(d)


def test_state_dict_mismatch_names_keys_and_shapes():
    big = _hf_model("llama", num_hidden_layers=3, vocab_size=160)
    state = {k: v.numpy() for k, v in big.state_dict().items()}
    del state["model.layers.0.mlp.up_proj.weight"]
    state["model.layers.1.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    cfg = config_from_hf({"model_type": "llama", **TINY})
    with pytest.raises(ValueError) as err:
        params_from_hf(state, cfg)
    msg = str(err.value)
    assert "missing keys (1): model.layers.0.mlp.up_proj.weight" in msg
    assert "model.layers.2.input_layernorm.weight" in msg  # unexpected (3rd layer)
    assert "unexpected keys (10)" in msg and "o_proj / MLP biases are not supported" in msg
    assert "model.embed_tokens.weight: got [160, 64], expected [128, 64]" in msg
    assert "lm_head.weight: got [160, 64], expected [128, 64]" in msg

    params = _random_params(cfg)
    params["layers_1"]["mlp"]["up_proj"]["kernel"] = np.zeros((64, 97), np.float32)
    with pytest.raises(ValueError, match=r"layers_1/mlp/up_proj/kernel: got \[64, 97\], "
                                         r"expected \[64, 96\]"):
        params_to_hf(params, cfg)


# ------------------------------------------------------------------ sharding


def test_sharded_save_and_load(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96)
    params = _random_params(cfg, seed=7)
    save_hf(tmp_path, params, cfg)  # unsharded first: the sharded save must remove it
    save_hf(tmp_path, params, cfg, max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.startswith("model-")]
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params_to_hf(params, cfg))

    cfg2, back = load_hf(tmp_path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(),
                                  np.asarray(params["lm_head"]["kernel"]).T)

    os.remove(tmp_path / shards[0])
    with pytest.raises(FileNotFoundError, match=shards[0]):
        load_hf(tmp_path)


# ------------------------------------------------------------------ the model registry


def test_llama_family_reads_what_this_module_converts(tmp_path):
    """The registry's 'llama' family claims exactly the model types this converter supports,
    converts through it, and a transformers directory it saved is found to be its own."""
    from jaxtrain.hf import llama as hf_llama
    from jaxtrain.models import get_model
    from jaxtrain.models.registry import family_for_hf_dir

    family = get_model("llama")
    assert set(family.hf_model_types) == set(hf_llama.SUPPORTED_MODEL_TYPES)
    assert family.hf() is hf_llama
    model = _hf_model("qwen2")
    model.save_pretrained(tmp_path / "qwen2")
    assert family_for_hf_dir(str(tmp_path / "qwen2")) is family
    cfg, params = family.load_hf(str(tmp_path / "qwen2"))
    assert cfg == load_hf(tmp_path / "qwen2")[0] and cfg.attention_bias
    assert family.hf_data_settings(str(tmp_path / "qwen2")) == {}  # no tokenizer saved
    family.save_hf(str(tmp_path / "out"), params, cfg, model_type="qwen2")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 7))
    out = family.inference(cfg, params, {"tokens": jnp.asarray(tokens, jnp.int32)})
    np.testing.assert_allclose(np.asarray(out["logits"]), _torch_logits(model, tokens), **TOL)
