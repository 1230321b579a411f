"""Hugging Face ``transformers`` checkpoints <-> :class:`jaxtrain.models.llama.Llama`.

Supported architectures: ``LlamaForCausalLM`` (``model_type`` ``llama``), ``Qwen2ForCausalLM``
(``qwen2``) and ``MistralForCausalLM`` (``mistral``), read from and written to a local directory
holding ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json`` + shards).
Pickled ``pytorch_model.bin`` checkpoints are never read.

Name mapping (``i`` = layer; D = hidden, H / K = query / key-value heads, Dh = head dim,
F = intermediate size, V = vocab). torch ``Linear`` weights are ``[out, in]``; Flax kernels are
``[in, ...out]``::

    Hugging Face                      shape      jaxtrain                          shape
    model.embed_tokens.weight         [V, D]     embed_tokens/embedding            [V, D]
    model.norm.weight                 [D]        norm/scale                        [D]
    lm_head.weight                    [V, D]     lm_head/kernel (absent when tied) [D, V]
    per layer i, with P = "model.layers.{i}" and Q = "layers_{i}":
    P.input_layernorm.weight          [D]        Q/input_layernorm/scale           [D]
    P.self_attn.q_proj.weight         [H*Dh, D]  Q/self_attn/q_proj/kernel         [D, H, Dh]
    P.self_attn.{k,v}_proj.weight     [K*Dh, D]  Q/self_attn/{k,v}_proj/kernel     [D, K, Dh]
    P.self_attn.q_proj.bias           [H*Dh]     Q/self_attn/q_proj/bias           [H, Dh]
    P.self_attn.{k,v}_proj.bias       [K*Dh]     Q/self_attn/{k,v}_proj/bias       [K, Dh]
    P.self_attn.o_proj.weight         [D, H*Dh]  Q/self_attn/o_proj/kernel         [H, Dh, D]
    P.post_attention_layernorm.weight [D]        Q/post_attention_layernorm/scale  [D]
    P.mlp.{gate,up}_proj.weight       [F, D]     Q/mlp/{gate,up}_proj/kernel       [D, F]
    P.mlp.down_proj.weight            [D, F]     Q/mlp/down_proj/kernel            [F, D]

(q/k/v biases exist for Qwen2 only.) With ``scan_layers=True`` the per-layer entries are stacked
into one ``layers/...`` subtree with a leading ``[L]`` axis. ``*.rotary_emb.inv_freq`` buffers
are ignored.

Config mapping (``config.json`` -> :class:`LlamaConfig`): ``vocab_size``, ``hidden_size``,
``num_hidden_layers`` -> ``num_layers``, ``num_attention_heads`` -> ``num_heads``,
``num_key_value_heads`` -> ``num_kv_heads``, ``head_dim``, ``intermediate_size``, ``rope_theta``
(top level, or ``rope_parameters["rope_theta"]`` in transformers v5), ``rms_norm_eps``,
``tie_word_embeddings`` -> ``tie_embeddings``, ``sliding_window`` (Mistral; Qwen2 only with
``use_sliding_window``), ``initializer_range``. Not supported (``ValueError``): RoPE scaling
(``llama3``, ``yarn``, ``linear``, ...), ``mlp_bias``, Llama's ``attention_bias`` (it also biases
``o_proj``), activations other than SiLU, Qwen2 sliding windows on only some layers.

Example::

    cfg, params = load_hf("/ckpt/Qwen2.5-0.5B", dtype="bfloat16", scan_layers=True)
    logits, _ = Llama(cfg).apply({"params": params}, tokens)
    save_hf("/tmp/export", params, cfg, model_type="qwen2")
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxtrain.hf.files import (
    CONFIG,
    DEFAULT_MAX_SHARD_BYTES,
    cast_state,
    f32,
    flatten,
    mismatch_error,
    read_state,
    same,
    to_numpy,
    transpose,
    unsupported,
    write_json,
    write_state,
)
from jaxtrain.models.llama import LlamaConfig
from jaxtrain.tokenizer_files import has_tokenizer_files

Params = dict[str, Any]

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_ACTIVATIONS = ("silu", "swish")  # the same function in transformers' ACT2FN
_IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# config.json's max_position_embeddings on export (jaxtrain's RoPE has no length limit; only
# transformers' generation utilities read it).
_EXPORT_MAX_POSITIONS = 4096


# --------------------------------------------------------------------------------------------
# config.json <-> LlamaConfig
# --------------------------------------------------------------------------------------------

def _rope_theta(hf: Mapping[str, Any]) -> float:
    if hf.get("rope_theta") is not None:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return 10000.0


def _check_rope_scaling(hf: Mapping[str, Any]) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise unsupported(key, params, "expected a dict or null")
        if params and all(isinstance(v, Mapping) for v in params.values()):
            raise unsupported(key, dict(params), "per-layer-type RoPE parameters are not "
                               "supported")
        kind = params.get("rope_type", params.get("type"))
        if kind not in (None, "default"):
            raise unsupported(
                f"{key}.rope_type", kind,
                "RoPE scaling is not supported by jaxtrain's Llama (only the default "
                "rotary embedding, rope_type 'default' or no scaling)")
    factor = hf.get("partial_rotary_factor")
    if factor not in (None, 1, 1.0):
        raise unsupported("partial_rotary_factor", factor, "only full rotary embedding (1.0)")


def _required(hf: Mapping[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{CONFIG} is missing the required key {key!r}")
    return hf[key]


def _qwen2_sliding_window(hf: Mapping[str, Any], num_layers: int) -> int:
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return 0
    window = int(hf["sliding_window"])
    types = hf.get("layer_types")
    if types is None:
        first = int(hf.get("max_window_layers", 0) or 0)
        types = ["sliding_attention" if i >= first else "full_attention"
                 for i in range(num_layers)]
    if all(t == "full_attention" for t in types):
        return 0
    if all(t == "sliding_attention" for t in types):
        return window
    raise unsupported("layer_types", list(types),
                       "jaxtrain applies one sliding window to all layers or none; this "
                       "checkpoint mixes full and sliding-window layers (max_window_layers="
                       f"{hf.get('max_window_layers')!r})")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from a transformers ``config.json`` dict (``llama``, ``qwen2``,
    ``mistral``). ``overrides`` set other :class:`LlamaConfig` fields (``dtype``,
    ``scan_layers``, ``remat_policy``, ``attention_impl``, ...) or replace converted ones.

    Raises ``ValueError`` naming the offending key and value for anything the model cannot
    represent exactly.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported("model_type", model_type,
                           f"supported model types are {sorted(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise unsupported("hidden_act", act, "jaxtrain's Llama MLP is SwiGLU (hidden_act 'silu')")
    if hf.get("mlp_bias"):
        raise unsupported("mlp_bias", hf["mlp_bias"], "jaxtrain's Llama MLP has no biases")
    _check_rope_scaling(hf)

    hidden = int(_required(hf, "hidden_size"))
    heads = int(_required(hf, "num_attention_heads"))
    num_layers = int(_required(hf, "num_hidden_layers"))
    head_dim = int(hf.get("head_dim") or 0)
    if head_dim and heads and head_dim * heads == hidden:
        head_dim = 0  # the default

    if model_type == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
        sliding_window = _qwen2_sliding_window(hf, num_layers)
    elif model_type == "mistral":
        attention_bias = False
        sliding_window = int(hf.get("sliding_window") or 0)
    else:
        if hf.get("attention_bias"):
            raise unsupported(
                "attention_bias", hf["attention_bias"],
                "Llama's attention_bias also biases o_proj, which jaxtrain's Llama lacks "
                "(its attention_bias is Qwen2's q/k/v-only bias)")
        attention_bias = False
        sliding_window = 0

    fields: dict[str, Any] = {
        "vocab_size": int(_required(hf, "vocab_size")),
        "hidden_size": hidden,
        "num_layers": num_layers,
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": head_dim,
        "intermediate_size": int(_required(hf, "intermediate_size")),
        "rope_theta": _rope_theta(hf),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": attention_bias,
        "sliding_window": sliding_window,
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }
    return LlamaConfig.from_dict({**fields, **overrides})


def config_to_hf(cfg: LlamaConfig, model_type: str = "llama") -> dict[str, Any]:
    """A transformers ``config.json`` dict for ``cfg`` as ``model_type`` (``llama``, ``qwen2``
    or ``mistral``). Raises ``ValueError`` if that architecture cannot represent ``cfg``."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; "
                         f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    if cfg.num_experts:
        raise ValueError(f"a mixture-of-experts model (num_experts={cfg.num_experts}) cannot be "
                         f"exported as {SUPPORTED_MODEL_TYPES[model_type]}")
    if model_type == "qwen2" and not cfg.attention_bias:
        raise ValueError("model_type='qwen2' always has q/k/v biases but cfg.attention_bias is "
                         "False; export as 'llama' (or 'mistral' with a sliding window)")
    if model_type != "qwen2" and cfg.attention_bias:
        raise ValueError(f"cfg.attention_bias=True (q/k/v biases) cannot be exported as "
                         f"{model_type!r}; use model_type='qwen2'")
    if model_type == "llama" and cfg.sliding_window:
        raise ValueError(f"cfg.sliding_window={cfg.sliding_window} cannot be exported as "
                         "'llama'; use model_type='mistral' (or 'qwen2' with attention_bias)")
    hf: dict[str, Any] = {
        "architectures": [SUPPORTED_MODEL_TYPES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": _EXPORT_MAX_POSITIONS,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers v4
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # v5
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",  # transformers v4
        "dtype": "float32",  # v5
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window or None
    else:
        hf.update(
            use_sliding_window=bool(cfg.sliding_window),
            sliding_window=cfg.sliding_window or None,
            max_window_layers=0 if cfg.sliding_window else cfg.num_layers,
            layer_types=[("sliding_attention" if cfg.sliding_window else "full_attention")
                         for _ in range(cfg.num_layers)],
        )
    return hf


# --------------------------------------------------------------------------------------------
# state dicts <-> parameter trees
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    hf: str  # name in the state dict (per-layer entries: after "model.layers.{i}.")
    path: tuple[str, ...]  # path in the Flax tree (per-layer entries: inside layers_{i})
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _entries(cfg: LlamaConfig) -> tuple[list[_Entry], list[_Entry]]:
    """(top-level entries, per-layer entries) for ``cfg``."""
    if cfg.num_experts:
        raise ValueError(f"a mixture-of-experts model (num_experts={cfg.num_experts}) has no "
                         "Llama/Qwen2/Mistral Hugging Face equivalent")
    d, v, f, dh = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_size
    top = [
        _Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, d), (v, d),
               same, same),
        _Entry("model.norm.weight", ("norm", "scale"), (d,), (d,), same, same),
    ]
    if not cfg.tie_embeddings:
        top.append(_Entry("lm_head.weight", ("lm_head", "kernel"), (v, d), (d, v),
                          transpose, transpose))

    def in_proj(name: str, n: int) -> list[_Entry]:
        out = [_Entry(f"self_attn.{name}.weight", ("self_attn", name, "kernel"), (n * dh, d),
                      (d, n, dh), lambda w: w.T.reshape(d, n, dh),
                      lambda k: k.reshape(d, n * dh).T)]
        if cfg.attention_bias:
            out.append(_Entry(f"self_attn.{name}.bias", ("self_attn", name, "bias"), (n * dh,),
                              (n, dh), lambda b: b.reshape(n, dh), lambda b: b.reshape(n * dh)))
        return out

    h, k = cfg.num_heads, cfg.num_kv_heads
    layer = [
        _Entry("input_layernorm.weight", ("input_layernorm", "scale"), (d,), (d,), same, same),
        *in_proj("q_proj", h), *in_proj("k_proj", k), *in_proj("v_proj", k),
        _Entry("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (d, h * dh),
               (h, dh, d), lambda w: w.T.reshape(h, dh, d), lambda o: o.reshape(h * dh, d).T),
        _Entry("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (d,),
               (d,), same, same),
        _Entry("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f, d), (d, f),
               transpose, transpose),
        _Entry("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f, d), (d, f),
               transpose, transpose),
        _Entry("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d, f), (f, d),
               transpose, transpose),
    ]
    return top, layer


def params_from_hf(state: Mapping[str, Any], cfg: LlamaConfig) -> Params:
    """The unboxed Flax parameter tree of :class:`Llama` (float32 numpy arrays) from a
    transformers state dict. The layout (``layers_{i}`` or stacked ``layers``) follows
    ``cfg.scan_layers``. Unstacked arrays may be (transposed) views of ``state``'s float32
    arrays: no copy of the weights is made. Raises ``ValueError`` listing missing / unexpected
    keys and shape mismatches (with the expected shapes)."""
    top, layer = _entries(cfg)
    expected: dict[str, tuple[_Entry, int | None]] = {e.hf: (e, None) for e in top}
    for i in range(cfg.num_layers):
        for e in layer:
            expected[f"model.layers.{i}.{e.hf}"] = (e, i)
    names = [n for n in state if not _IGNORED_KEY.search(n)]
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in names if n not in expected]
    if cfg.tie_embeddings and "lm_head.weight" in unexpected and "model.embed_tokens.weight" \
            in state and np.array_equal(np.asarray(state["lm_head.weight"]),
                                        np.asarray(state["model.embed_tokens.weight"])):
        unexpected.remove("lm_head.weight")  # a tied head stored twice
    shapes = []
    for n, (e, _) in expected.items():
        if n in state and tuple(np.shape(state[n])) != e.hf_shape:
            shapes.append(f"{n}: got {list(np.shape(state[n]))}, expected {list(e.hf_shape)}")
    if missing or unexpected or shapes:
        hint = ""
        if unexpected and any(n.endswith("o_proj.bias") or ".mlp." in n and n.endswith(".bias")
                              for n in unexpected):
            hint = " (o_proj / MLP biases are not supported)"
        raise mismatch_error("Hugging Face state dict", "the model config" + hint, missing,
                             unexpected, shapes)

    params: Params = {}

    def put(tree: Params, path: tuple[str, ...], value: np.ndarray) -> None:
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = value

    def get(name: str, e: _Entry) -> np.ndarray:
        return e.to_jax(np.asarray(state[name], dtype=np.float32))

    for e in top:
        put(params, e.path, get(e.hf, e))
    per_layer = [{e.path: get(f"model.layers.{i}.{e.hf}", e) for e in layer}
                 for i in range(cfg.num_layers)]
    if cfg.scan_layers:
        for e in layer:
            put(params, ("layers", *e.path), np.stack([p[e.path] for p in per_layer]))
    else:
        for i, p in enumerate(per_layer):
            for path, value in p.items():
                put(params, (f"layers_{i}", *path), value)
    return params


def params_to_hf(params: Any, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """The transformers state dict (float32, C-contiguous numpy) of a :class:`Llama` parameter
    tree: boxed or unboxed, jax or numpy arrays, ``layers_{i}`` or stacked ``layers`` layout
    (detected from the tree). Inverse of :func:`params_from_hf`."""
    import flax.linen as nn

    flat = flatten(nn.unbox(params))
    top, layer = _entries(cfg)
    stacked = any(p[0] == "layers" for p in flat)
    expected: dict[tuple[str, ...], tuple[int, ...]] = {e.path: e.shape for e in top}
    for e in layer:
        if stacked:
            expected[("layers", *e.path)] = (cfg.num_layers, *e.shape)
        else:
            for i in range(cfg.num_layers):
                expected[(f"layers_{i}", *e.path)] = e.shape
    missing = ["/".join(p) for p in expected if p not in flat]
    unexpected = ["/".join(p) for p in flat if p not in expected]
    shapes = [f"{'/'.join(p)}: got {list(np.shape(flat[p]))}, expected {list(s)}"
              for p, s in expected.items() if p in flat and tuple(np.shape(flat[p])) != s]
    if missing or unexpected or shapes:
        raise mismatch_error("jaxtrain parameter tree", "the model config", missing, unexpected,
                             shapes)

    state: dict[str, np.ndarray] = {}
    for e in top:
        state[e.hf] = f32(e.to_hf(to_numpy(flat[e.path])))
    layer_values = {e.path: (to_numpy(flat[("layers", *e.path)]) if stacked else None)
                    for e in layer}
    for i in range(cfg.num_layers):
        for e in layer:
            value = (layer_values[e.path][i] if stacked
                     else to_numpy(flat[(f"layers_{i}", *e.path)]))
            state[f"model.layers.{i}.{e.hf}"] = f32(e.to_hf(value))
    return state


# --------------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------------

def load_hf(path: str | os.PathLike[str], **overrides: Any) -> tuple[LlamaConfig, Params]:
    """``(config, params)`` from a local transformers checkpoint directory (``config.json`` +
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``). Weights are returned
    as float32 numpy arrays in the layout of ``config.scan_layers``; ``overrides`` are
    :class:`LlamaConfig` fields (``dtype='bfloat16'``, ``scan_layers=True``, ...)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path} does not exist (pass "
                                "a local directory; download with huggingface_hub first)")
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: {path} is not a transformers "
                                "checkpoint directory")
    with open(config_path) as f:
        hf = json.load(f)
    try:
        cfg = config_from_hf(hf, **overrides)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e
    state = read_state(path, "AutoModelForCausalLM")
    try:
        params = params_from_hf(state, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return cfg, params


def data_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.data`` settings the directory implies: ``tokenizer`` (the directory itself)
    when it holds tokenizer files, else nothing."""
    path = os.fspath(path)
    return {"tokenizer": path} if has_tokenizer_files(path) else {}


def save_hf(
    path: str | os.PathLike[str],
    params: Any,
    cfg: LlamaConfig,
    model_type: str = "llama",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: str = "float32",
) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (or numbered shards,
    ``model-00001-of-00003.safetensors`` ..., + ``model.safetensors.index.json`` when larger than
    ``max_shard_bytes``) to ``path``, the weights in ``dtype`` ('float32', 'bfloat16' or
    'float16'; config.json's ``torch_dtype`` / ``dtype`` say which),
    loadable with ``transformers.AutoModelForCausalLM.from_pretrained(path)``. ``params`` may be
    boxed or unboxed, jax or numpy. Stale weight files from an earlier save in ``path`` are
    removed. In a multi-process job call it from one process (after gathering is done)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0; got {max_shard_bytes}")
    hf = config_to_hf(cfg, model_type)
    state = cast_state(params_to_hf(params, cfg), dtype)
    hf.update(torch_dtype=dtype, dtype=dtype)
    path = os.fspath(path)
    write_state(path, state, max_shard_bytes)
    write_json(os.path.join(path, CONFIG), hf)


def transformers_outputs(path: str | os.PathLike[str], cfg: LlamaConfig, params: Any,
                         seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ours, transformers'): the float32 ``logits`` of this model (``cfg``, ``params``) and of
    ``transformers.AutoModelForCausalLM`` loaded from ``path`` (written by :func:`save_hf`), for
    the same random tokens [2, 16]: how an export checks its Hugging Face directory. Needs torch.
    """
    import jax
    import torch
    import transformers

    from jaxtrain.models.llama import Llama

    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    f32 = dataclasses.replace(cfg, dtype="float32", remat_policy="none", attention_impl=None)
    ours, _ = jax.jit(Llama(f32).apply)({"params": params}, tokens)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path),
                                                              dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    return {"logits": np.asarray(ours)}, {"logits": theirs}
