"""Llama-family decoders as text encoders: Hugging Face base-model directories (``LlamaModel``,
``Qwen2Model``, ``MistralModel``, which ``transformers.AutoModel`` and sentence-transformers
load) <-> :class:`jaxtrain.models.llama.LlamaEncoder` parameters (a :class:`Llama` tree without
``lm_head``).

Reads both layouts: a base model's state dict (``embed_tokens.weight``, ``layers.{i}...``,
``norm.weight``: E5-Mistral, gte-Qwen2 and other embedding checkpoints) and a causal LM's
(``model.`` prefixed, its ``lm_head`` ignored). The name and config mapping is
:mod:`jaxtrain.hf.llama`'s. Writes a base-model directory (``architectures: [LlamaModel]`` or
Qwen2Model / MistralModel, keys without the ``model.`` prefix, no head).

    cfg, params = load_hf("/ckpt/e5-mistral-7b-instruct", dtype="bfloat16")
    hidden = LlamaEncoder(cfg).apply({"params": params}, tokens, mask)
    save_hf("/tmp/enc", params, cfg, model_type="mistral")   # AutoModel.from_pretrained loads it
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtrain.hf import llama as hf_llama
from jaxtrain.hf.files import (
    CONFIG,
    DEFAULT_MAX_SHARD_BYTES,
    cast_state,
    read_state,
    write_json,
    write_state,
)
from jaxtrain.models.llama import LlamaConfig

Params = dict[str, Any]
BASE_ARCHITECTURES = {"llama": "LlamaModel", "qwen2": "Qwen2Model", "mistral": "MistralModel"}
_PREFIX = "model."


def _headless(cfg: LlamaConfig) -> LlamaConfig:
    # hf.llama's mapping without lm_head: a tied config expects none
    return dataclasses.replace(cfg, tie_embeddings=True)


def causal_lm_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A base model's or causal LM's state dict in the causal LM's names (``model.`` prefixed)
    without ``lm_head``."""
    if not any(k.startswith(_PREFIX) for k in state):
        state = {_PREFIX + k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


def params_from_hf(state: Mapping[str, Any], cfg: LlamaConfig) -> Params:
    """The :class:`LlamaEncoder` tree (float32 numpy; no ``lm_head``) of a base-model or causal
    LM state dict; ValueError listing missing / unexpected keys."""
    return hf_llama.params_from_hf(causal_lm_state(state), _headless(cfg))


def params_to_hf(params: Any, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """The base model's state dict (no ``model.`` prefix) of an encoder tree (an ``lm_head`` in
    ``params`` is dropped)."""
    import flax.linen as nn

    params = {k: v for k, v in nn.unbox(params).items() if k != "lm_head"}
    state = hf_llama.params_to_hf(params, _headless(cfg))
    return {k[len(_PREFIX):]: v for k, v in state.items()}


def load_hf(path: str | os.PathLike[str], **overrides: Any) -> tuple[LlamaConfig, Params]:
    """``(config, encoder params)`` of a local base-model or causal-LM directory (llama, qwen2,
    mistral); ``overrides`` are :class:`LlamaConfig` fields (``causal=False``, ``dtype``, ...)."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist: {path} is not a transformers "
                                "checkpoint directory")
    with open(file) as f:
        hf = json.load(f)
    try:
        cfg = hf_llama.config_from_hf(hf, **overrides)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    try:
        params = params_from_hf(read_state(path, "AutoModel"), cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return cfg, params


def data_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"tokenizer": path}`` when the directory holds tokenizer files, else {}."""
    return hf_llama.data_settings(path)


def config_to_hf(cfg: LlamaConfig, model_type: str = "llama",
                 dtype: str = "float32") -> dict[str, Any]:
    """The base model's ``config.json`` dict (``architectures``: LlamaModel / Qwen2Model /
    MistralModel). ValueError if ``model_type`` cannot represent ``cfg``."""
    hf = hf_llama.config_to_hf(cfg, model_type)
    hf.update(architectures=[BASE_ARCHITECTURES[model_type]], torch_dtype=dtype, dtype=dtype)
    return hf


def save_hf(path: str | os.PathLike[str], params: Any, cfg: LlamaConfig,
            model_type: str = "llama", tokenizer: Any = None, dtype: str = "float32",
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes a base-model directory (``config.json`` + safetensors in ``dtype``) that
    ``transformers.AutoModel.from_pretrained`` loads, and ``tokenizer`` (an object with
    ``save_pretrained`` or a tokenizer directory) when given. ``cfg.causal`` is not written:
    transformers' decoders are causal (a bidirectional model's hidden states differ there)."""
    from jaxtrain.hf.bert import save_tokenizer

    path = os.fspath(path)
    hf = config_to_hf(cfg, model_type, dtype)
    write_state(path, cast_state(params_to_hf(params, cfg), dtype), max_shard_bytes)
    write_json(os.path.join(path, CONFIG), hf)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)


def transformers_hidden(path: str | os.PathLike[str], tokens: np.ndarray,
                        mask: np.ndarray) -> np.ndarray:
    """``transformers.AutoModel``'s ``last_hidden_state`` (float32 numpy) of the directory
    ``path`` for ``tokens`` with ``attention_mask=mask``. Needs torch."""
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(os.fspath(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                    attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long))
    return out.last_hidden_state.numpy()
