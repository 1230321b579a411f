"""A BERT-family text encoder (Hugging Face ``BertModel`` layout: BERT, MiniLM, bge, e5).

    x = LayerNorm(word_emb[tokens] + pos_emb[0..T-1] + type_emb[token_type_ids])
    N x post-LN layers:  x = LN(x + attn(x, mask));  x = LN(x + W2 act(W1 x + b1) + b2)
    pooler (optional):   pooled = tanh(W_p x[:, 0] + b_p)

Attention is bidirectional: every real token attends to every real token of its row (``mask``
[B, T], True = real token; padding keys are masked out). Positions are ``0..T-1`` whatever the
padding, as ``BertModel`` without ``position_ids`` (BERT tokenizers pad on the right, so a row's
real tokens sit at positions 0..n-1).

Parameter tree (see :mod:`jaxtrain.hf.bert` for the Hugging Face names)::

    embeddings/word_embeddings/embedding          [V, D]      (vocab, embed)
    embeddings/position_embeddings/embedding      [P, D]      (pos, embed)
    embeddings/token_type_embeddings/embedding    [Tt, D]     (None, embed)
    embeddings/layer_norm/{scale, bias}           [D]
    layers_{i}/self_attn/{q,k,v}_proj/kernel      [D, H, Dh]  (embed, heads, kv)
    layers_{i}/self_attn/{q,k,v}_proj/bias        [H, Dh]
    layers_{i}/self_attn/out_proj/kernel          [H, Dh, D]; bias [D]
    layers_{i}/attention_norm/{scale, bias}       [D]
    layers_{i}/intermediate/{kernel [D, F], bias [F]}
    layers_{i}/output/{kernel [F, D], bias [D]}
    layers_{i}/output_norm/{scale, bias}          [D]
    pooler/{kernel [D, D], bias [D]}              (only with add_pooler)

The pooler is kept so that checkpoints round-trip; embedding models pool the hidden states
themselves (CLS / mean, :mod:`jaxtrain.models.pooling`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.models.layers import (
    ACTIVATION_AXES,
    Dtype,
    MultiHeadAttention,
    layer_norm,
    partitioned,
)
from jaxtrain.models.registry import TEXT_ENCODER, ModelFamily

Array = jax.Array

DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                            "float16": jnp.float16}

# Hugging Face's ACT2FN names for the MLP activation.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of :class:`Bert`. Validated on construction."""

    vocab_size: int = 30522
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # one of ACTIVATIONS (Hugging Face's names)
    initializer_range: float = 0.02
    add_pooler: bool = False  # the pooler Dense + tanh (BertModel's; kept for round trips)
    dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16' | 'float16'
    remat: bool = False  # recompute each layer's activations in the backward pass
    attention_impl: str | None = None  # jax.nn.dot_product_attention: 'xla', 'cudnn', None
    offload_params: bool = False  # read by the trainer (params in host memory), not the model

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int; got {value!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"BertConfig.{name} must be a positive number; got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {sorted(ACTIVATIONS)}; "
                             f"got {self.hidden_act!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"BertConfig.dtype must be one of {sorted(DTYPES)}; "
                             f"got {self.dtype!r}")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError("BertConfig.attention_impl must be None, 'xla' or 'cudnn'; "
                             f"got {self.attention_impl!r}")
        for name in ("add_pooler", "remat", "offload_params"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BertConfig.{name} must be a bool; got "
                                 f"{getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """Builds a config from a mapping; unknown keys raise ``ValueError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown BertConfig keys {unknown}; valid keys: {valid}")
        return cls(**dict(d))

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> Dtype:
        return DTYPES[self.dtype]

    def num_params(self) -> int:
        """Parameter count (embeddings and the pooler included)."""
        d, f = self.hidden_size, self.intermediate_size
        embed = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
        layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        return embed + self.num_layers * layer + self.add_pooler * (d * d + d)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), the formula used for MFU:

            6 * L * (4 D^2 + 2 D F) + 12 * L * D * S

        The first term is the layers' matmul parameters (q, k, v, output projections and the
        MLP; embedding lookups and the pooler excluded), the second the attention matmuls QKᵀ
        and AV (2 · 2 · S · D FLOPs per token and layer forward, over all S = seq_len keys:
        attention is bidirectional)."""
        d, f, n = self.hidden_size, self.intermediate_size, self.num_layers
        return 6.0 * n * (4 * d * d + 2 * d * f) + 12.0 * n * d * seq_len


def _init(cfg: BertConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


class BertEmbeddings(nn.Module):
    """``LayerNorm(word[tokens] + position[0..T-1] + token_type[token_type_ids])``."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens: Array, token_type_ids: Array) -> Array:
        cfg = self.cfg
        t = tokens.shape[1]
        if t > cfg.max_position_embeddings:
            raise ValueError(f"Bert: {t} tokens per row, but max_position_embeddings is "
                             f"{cfg.max_position_embeddings}: truncate the text (data.seq_len).")

        def embed(n: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
            return nn.Embed(n, cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                            embedding_init=partitioned(_init(cfg), axes), name=name)

        x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(tokens)
        x = x + embed(cfg.max_position_embeddings, ("pos", "embed"),
                      "position_embeddings")(jnp.arange(t))[None]
        x = x + embed(cfg.type_vocab_size, (None, "embed"),
                      "token_type_embeddings")(token_type_ids)
        x = layer_norm("layer_norm", jnp.float32, epsilon=cfg.layer_norm_eps)(x)
        return x.astype(cfg.compute_dtype)


class BertLayer(nn.Module):
    """One post-LN layer: ``x = LN(x + attn(x)); x = LN(x + mlp(x))``."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        cfg = self.cfg
        dt = cfg.compute_dtype
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        h = MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.head_size, dtype=dt,
                               attention_impl=cfg.attention_impl, name="self_attn")(x, mask)
        x = layer_norm("attention_norm", dt, epsilon=cfg.layer_norm_eps)(x + h)

        def dense(n: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(n, dtype=dt, param_dtype=jnp.float32,
                            kernel_init=partitioned(_init(cfg), axes),
                            bias_init=partitioned(nn.initializers.zeros, axes[1:]), name=name)

        h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, ("embed", "mlp"),
                                              "intermediate")(x))
        h = dense(cfg.hidden_size, ("mlp", "embed"), "output")(h)
        x = layer_norm("output_norm", dt, epsilon=cfg.layer_norm_eps)(x + h)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class Bert(nn.Module):
    """The encoder. ``__call__(tokens [B, T] int, mask [B, T] bool = None (all real),
    token_type_ids [B, T] = None (zeros), return_pooled=False)`` returns the final hidden states
    [B, T, D] in float32 (with ``return_pooled``: ``(hidden, pooled [B, D])``, the pooler's
    ``tanh(W x[:, 0] + b)`` — or ``x[:, 0]`` when the config has no pooler). Token ids must be
    valid (>= 0) at every position, padding included: embedder rows padded with -1 are clamped
    by the caller (``tokens = max(tokens, 0)``, ``mask = tokens >= 0``)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None,
                 token_type_ids: Array | None = None, return_pooled: bool = False):
        cfg = self.cfg
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(tokens.shape, jnp.int32)
        x = BertEmbeddings(cfg, name="embeddings")(tokens, token_type_ids)
        layer = nn.remat(BertLayer) if cfg.remat else BertLayer
        mask = jnp.asarray(mask, bool)
        for i in range(cfg.num_layers):
            x = layer(cfg, name=f"layers_{i}")(x, mask)
        x = x.astype(jnp.float32)
        pooled = x[:, 0]
        if cfg.add_pooler:
            pooled = jnp.tanh(nn.Dense(
                cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                kernel_init=partitioned(_init(cfg), ("embed", "embed_out")),
                bias_init=partitioned(nn.initializers.zeros, ("embed_out",)), name="pooler",
            )(pooled))
        return (x, pooled) if return_pooled else x


def init_params(cfg: BertConfig, rng: Array, seq_len: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of a fresh model."""
    tokens = jnp.zeros((1, min(seq_len, cfg.max_position_embeddings)), jnp.int32)
    return Bert(cfg).init(rng, tokens, return_pooled=True)["params"]


def inference_inputs(cfg: BertConfig, batch_size: int,
                     seq_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """``tokens``: int32 [batch_size, seq_len] (default max_position_embeddings), padded with
    -1 (a real token is >= 0)."""
    t = seq_len or cfg.max_position_embeddings
    if t > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {t} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}.")
    return {"tokens": jax.ShapeDtypeStruct((batch_size, t), jnp.int32)}


def inference(cfg: BertConfig, params: Any, inputs: dict[str, Array]) -> dict[str, Array]:
    """``hidden`` float32 [B, T, D] (the last layer's states) and ``cls`` [B, D] (the pooler's
    output with ``add_pooler``, else the first position's hidden state) of ``tokens`` padded
    with -1 (mask = tokens >= 0, token types 0)."""
    tokens = inputs["tokens"]
    hidden, cls = Bert(cfg).apply({"params": params}, jnp.maximum(tokens, 0), tokens >= 0,
                                  return_pooled=True)
    return {"hidden": hidden, "cls": cls}


FAMILY = ModelFamily(
    name="bert",
    kind=TEXT_ENCODER,
    title="BERT encoder",
    config_cls=BertConfig,
    module=Bert,
    init=init_params,
    inference_inputs=inference_inputs,
    inference=inference,
    runtime_fields=("dtype", "remat", "attention_impl", "offload_params"),
    flops_per_token=BertConfig.flops_per_token,
    hf_module="jaxtrain.hf.bert",
    hf_model_types=("bert",),
    data_keys=("tokenizer",),
)
