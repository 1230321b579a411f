"""Hugging Face ``BertModel`` checkpoints <-> :class:`jaxtrain.models.bert.Bert`.

Reads a local directory holding ``config.json`` (``model_type`` ``bert``) and
``model.safetensors`` (or an index + shards) written by ``BertModel`` or any ``BertForX``
(whose encoder weights carry a ``bert.`` prefix; their heads, ``cls.*`` / ``classifier.*``, are
ignored): BERT, MiniLM, bge, e5 and the sentence-transformers checkpoints built on them. Writes
a directory ``transformers.BertModel.from_pretrained`` (and ``AutoModel``) loads.

Name mapping (``i`` = layer; D = hidden, H = heads, Dh = D / H, F = intermediate; torch
``Linear`` weights are ``[out, in]``, Flax kernels ``[in, ...out]``)::

    Hugging Face                                    jaxtrain
    embeddings.word_embeddings.weight [V, D]        embeddings/word_embeddings/embedding
    embeddings.position_embeddings.weight [P, D]    embeddings/position_embeddings/embedding
    embeddings.token_type_embeddings.weight         embeddings/token_type_embeddings/embedding
    embeddings.LayerNorm.{weight, bias}             embeddings/layer_norm/{scale, bias}
    per layer, P = "encoder.layer.{i}", Q = "layers_{i}":
    P.attention.self.{query,key,value}.weight [H*Dh, D]  Q/self_attn/{q,k,v}_proj/kernel [D, H, Dh]
    P.attention.self.{query,key,value}.bias [H*Dh]       Q/self_attn/{q,k,v}_proj/bias [H, Dh]
    P.attention.output.dense.weight [D, H*Dh]            Q/self_attn/out_proj/kernel [H, Dh, D]
    P.attention.output.dense.bias [D]                    Q/self_attn/out_proj/bias
    P.attention.output.LayerNorm.{weight, bias}          Q/attention_norm/{scale, bias}
    P.intermediate.dense.{weight [F, D], bias}           Q/intermediate/{kernel [D, F], bias}
    P.output.dense.{weight [D, F], bias}                 Q/output/{kernel [F, D], bias}
    P.output.LayerNorm.{weight, bias}                    Q/output_norm/{scale, bias}
    pooler.dense.{weight, bias}                          pooler/{kernel, bias} (add_pooler)

Old TensorFlow-converted checkpoints' ``LayerNorm.gamma`` / ``.beta`` are read as ``weight`` /
``bias``; the ``embeddings.position_ids`` buffer is ignored. Config: ``vocab_size``,
``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``,
``max_position_embeddings``, ``type_vocab_size``, ``layer_norm_eps``, ``hidden_act``,
``initializer_range``; ``add_pooler`` is whether the weights hold a pooler. Not supported
(``ValueError``): ``position_embedding_type`` other than ``absolute``, ``is_decoder``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
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
    to_numpy,
    unsupported,
    write_json,
    write_state,
)
from jaxtrain.models.bert import ACTIVATIONS, BertConfig
from jaxtrain.tokenizer_files import has_tokenizer_files

Params = dict[str, Any]
MODEL_TYPES = ("bert",)
# Heads of BertForX checkpoints (and buffers) that the encoder does not use.
_IGNORED_PREFIXES = ("cls.", "classifier.", "qa_outputs.", "embeddings.position_ids")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
    """A :class:`BertConfig` from a transformers ``config.json`` dict; ``overrides`` set other
    fields (``dtype``, ``remat``, ``add_pooler``, ...). ValueError for what Bert cannot
    represent."""
    if hf.get("model_type") not in MODEL_TYPES:
        raise unsupported("model_type", hf.get("model_type"), f"this converter reads "
                          f"{list(MODEL_TYPES)} (BertModel) directories")
    kind = hf.get("position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise unsupported("position_embedding_type", kind, "only absolute position "
                          "embeddings are supported")
    if hf.get("is_decoder"):
        raise unsupported("is_decoder", True, "Bert is a bidirectional encoder")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise unsupported("hidden_act", act, f"supported: {sorted(ACTIVATIONS)}")
    fields = {
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": int(hf["num_attention_heads"]),
        "intermediate_size": int(hf["intermediate_size"]),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 512)),
        "type_vocab_size": int(hf.get("type_vocab_size", 2)),
        "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
        "hidden_act": act,
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }
    return BertConfig.from_dict({**fields, **overrides})


def config_to_hf(cfg: BertConfig, dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``config.json`` dict (``BertModel``) for ``cfg``."""
    return {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.initializer_range, "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
        "torch_dtype": dtype, "dtype": dtype,
    }


def _mapping(cfg: BertConfig) -> dict[str, tuple[tuple[str, ...], Any, Any]]:
    """{HF name: (our path, hf -> ours, ours -> hf)} for every tensor of ``cfg``'s model."""
    d, h = cfg.hidden_size, cfg.num_heads
    dh = d // h
    same = (lambda x: x, lambda x: x)
    tr = (lambda x: x.T, lambda x: x.T)
    out: dict[str, tuple[tuple[str, ...], Any, Any]] = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        out[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), *same)

    def norm(hf: str, ours: tuple[str, ...]) -> None:
        out[f"{hf}.weight"] = ((*ours, "scale"), *same)
        out[f"{hf}.bias"] = ((*ours, "bias"), *same)

    norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
    for i in range(cfg.num_layers):
        p, q = f"encoder.layer.{i}", f"layers_{i}"
        for hf_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{p}.attention.self.{hf_name}.weight"] = (
                (q, "self_attn", ours, "kernel"), lambda w: w.T.reshape(d, h, dh),
                lambda k: k.reshape(d, h * dh).T)
            out[f"{p}.attention.self.{hf_name}.bias"] = (
                (q, "self_attn", ours, "bias"), lambda b: b.reshape(h, dh),
                lambda b: b.reshape(h * dh))
        out[f"{p}.attention.output.dense.weight"] = (
            (q, "self_attn", "out_proj", "kernel"), lambda w: w.T.reshape(h, dh, d),
            lambda k: k.reshape(h * dh, d).T)
        out[f"{p}.attention.output.dense.bias"] = ((q, "self_attn", "out_proj", "bias"), *same)
        norm(f"{p}.attention.output.LayerNorm", (q, "attention_norm"))
        out[f"{p}.intermediate.dense.weight"] = ((q, "intermediate", "kernel"), *tr)
        out[f"{p}.intermediate.dense.bias"] = ((q, "intermediate", "bias"), *same)
        out[f"{p}.output.dense.weight"] = ((q, "output", "kernel"), *tr)
        out[f"{p}.output.dense.bias"] = ((q, "output", "bias"), *same)
        norm(f"{p}.output.LayerNorm", (q, "output_norm"))
    if cfg.add_pooler:
        out["pooler.dense.weight"] = (("pooler", "kernel"), *tr)
        out["pooler.dense.bias"] = (("pooler", "bias"), *same)
    return out


def _encoder_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's tensors of a BertModel / BertForX state dict, under BertModel's names:
    ``bert.`` stripped, heads and buffers dropped, ``gamma`` / ``beta`` renamed."""
    prefixed = any(k.startswith("bert.") for k in state)
    out = {}
    for name, value in state.items():
        if prefixed:
            if not name.startswith("bert."):
                continue  # a task head (cls.*, classifier.*, ...)
            name = name[len("bert."):]
        if name.startswith(_IGNORED_PREFIXES):
            continue
        if name.endswith(".gamma"):
            name = name[:-len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[:-len("beta")] + "bias"
        out[name] = value
    return out


def params_from_hf(state: Mapping[str, Any], cfg: BertConfig) -> Params:
    """The unboxed Flax parameter tree of :class:`~jaxtrain.models.bert.Bert` (float32 numpy)
    from a (BertModel or BertForX) state dict. ValueError listing missing / unexpected keys."""
    state = _encoder_state(state)
    mapping = _mapping(cfg)
    missing = [n for n in mapping if n not in state]
    unexpected = [n for n in state if n not in mapping]
    params: Params = {}
    shapes = []
    for name, (path, to_jax, _) in mapping.items():
        if name not in state:
            continue
        try:
            value = f32(to_jax(np.asarray(state[name], np.float32)))
        except ValueError:
            shapes.append(f"{name}: got {list(np.shape(state[name]))}")
            continue
        tree = params
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = value
    if missing or unexpected or shapes:
        raise mismatch_error("Hugging Face BERT state dict", "the model config", missing,
                             unexpected, shapes)
    _check_shapes(params, cfg)
    return params


def _check_shapes(params: Params, cfg: BertConfig) -> None:
    """ValueError unless ``params`` (unboxed) has exactly the paths and shapes of ``cfg``'s."""
    import flax.linen as nn
    import jax

    from jaxtrain.models.bert import init_params

    want = flatten(jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0)))))
    got = flatten(params)
    missing = ["/".join(p) for p in want if p not in got]
    unexpected = ["/".join(p) for p in got if p not in want]
    shapes = [f"{'/'.join(p)}: got {list(np.shape(got[p]))}, expected {list(want[p].shape)}"
              for p in want if p in got and tuple(np.shape(got[p])) != tuple(want[p].shape)]
    if missing or unexpected or shapes:
        raise mismatch_error("BERT parameter tree", "the model config", missing, unexpected,
                             shapes)


def params_to_hf(params: Any, cfg: BertConfig) -> dict[str, np.ndarray]:
    """The ``BertModel`` state dict (float32 numpy) of a Bert parameter tree (boxed or not).
    Inverse of :func:`params_from_hf`."""
    import flax.linen as nn

    params = nn.unbox(params)
    _check_shapes(params, cfg)
    flat = flatten(params)
    return {name: f32(to_hf(to_numpy(flat[path])))
            for name, (path, _, to_hf) in _mapping(cfg).items()}


def load_hf(path: str | os.PathLike[str], **overrides: Any) -> tuple[BertConfig, Params]:
    """``(config, params)`` of a local BertModel / BertForX directory; ``overrides`` are
    :class:`BertConfig` fields (``dtype``, ``remat``, ...). ``add_pooler`` follows the weights."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist: {path} is not a transformers "
                                "checkpoint directory")
    with open(file) as f:
        hf = json.load(f)
    state = read_state(path, "BertModel")
    pooler = "pooler.dense.weight" in _encoder_state(state)
    try:
        cfg = config_from_hf(hf, **{"add_pooler": pooler, **overrides})
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    if cfg.add_pooler and not pooler:
        raise ValueError(f"{path}: add_pooler=True, but the weights hold no pooler")
    if pooler and not cfg.add_pooler:
        state = {k: v for k, v in state.items() if "pooler.dense." not in k}
    try:
        params = params_from_hf(state, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return cfg, params


def data_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"tokenizer": path}`` when the directory holds tokenizer files, else {}."""
    path = os.fspath(path)
    return {"tokenizer": path} if has_tokenizer_files(path) else {}


def save_hf(path: str | os.PathLike[str], params: Any, cfg: BertConfig, tokenizer: Any = None,
            dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes ``config.json`` (``BertModel``) and ``model.safetensors`` (weights in ``dtype``)
    to ``path``, and ``tokenizer`` (a transformers tokenizer, or a directory holding one) when
    given. Without a pooler in ``params`` transformers initialises its pooler randomly on load
    (it warns); the hidden states do not depend on it."""
    path = os.fspath(path)
    write_state(path, cast_state(params_to_hf(params, cfg), dtype), max_shard_bytes)
    write_json(os.path.join(path, CONFIG), config_to_hf(cfg, dtype))
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)


def save_tokenizer(tokenizer: Any, path: str) -> None:
    """``tokenizer`` (an object with ``save_pretrained``, or a directory / hub name) saved in
    ``path``."""
    if isinstance(tokenizer, str | os.PathLike):
        from jaxtrain.tokenizer_files import load_pretrained_tokenizer

        tokenizer = load_pretrained_tokenizer(tokenizer)
    tokenizer.save_pretrained(path)


def transformers_outputs(path: str | os.PathLike[str], cfg: BertConfig, params: Any,
                         seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ours, transformers'): ``hidden`` [2, 16, D] of this model and of ``BertModel`` loaded
    from ``path``, for the same random tokens with the second row right-padded (its last 5
    positions masked; compared on real positions only, padding zeroed). Needs torch."""
    import jax
    import torch
    import transformers

    from jaxtrain.models.bert import Bert

    t = min(16, cfg.max_position_embeddings)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (2, t)).astype(np.int32)
    mask = np.ones((2, t), bool)
    mask[1, t - min(5, t - 1):] = False
    f32cfg = dataclasses.replace(cfg, dtype="float32", remat=False, attention_impl=None)
    ours = np.asarray(jax.jit(Bert(f32cfg).apply)({"params": params}, tokens, mask))
    model = transformers.BertModel.from_pretrained(os.fspath(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask, dtype=torch.long)
                       ).last_hidden_state.numpy()
    keep = mask[..., None]
    return {"hidden": np.where(keep, ours, 0.0)}, {"hidden": np.where(keep, theirs, 0.0)}
