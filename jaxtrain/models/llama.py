"""A Llama-family causal decoder (Llama, Qwen2, Mistral; optionally mixture-of-experts).

token embedding -> N x [x + attn(RMSNorm(x)); x + mlp(RMSNorm(x))] -> RMSNorm -> head

* RoPE in Hugging Face's "rotate half" layout, so converted weights need no permutation;
* grouped-query attention through :func:`jaxtrain.models.attention.attention` (``attention_impl``:
  XLA, cuDNN, the Pallas GPU flash kernel or TPU Splash); packed rows attend only within their
  own segment, from segment ids (the flash kernels hold no T×T array);
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``, or a top-k mixture of SwiGLU experts
  (:mod:`jaxtrain.models.moe`);
* parameters in ``param_dtype`` (float32), compute in ``dtype`` (bfloat16 on accelerators);
* ``remat_policy`` picks what the backward pass recomputes; ``scan_layers`` runs the blocks with
  ``nn.scan`` (one compiled block: fast compiles for deep models; parameters gain a leading
  ``layers`` axis), otherwise they are unrolled as ``layers_{i}`` (faster steps on GPU).

Parameter tree (names follow Hugging Face's so :mod:`jaxtrain.hf.llama` is a rename)::

    embed_tokens/embedding                         [V, D]      (vocab, embed)
    layers_{i}/input_layernorm/scale               [D]
    layers_{i}/self_attn/{q,k,v}_proj/kernel       [D, H|K, Dh] (embed, heads|kv_heads, head_dim)
    layers_{i}/self_attn/{q,k,v}_proj/bias         [H|K, Dh]   (Qwen2 only)
    layers_{i}/self_attn/o_proj/kernel             [H, Dh, D]
    layers_{i}/post_attention_layernorm/scale      [D]
    layers_{i}/mlp/{gate,up}_proj/kernel           [D, F]      (embed, mlp)
    layers_{i}/mlp/down_proj/kernel                [F, D]
    norm/scale                                     [D]
    lm_head/kernel                                 [D, V]      (absent when tied)

With ``scan_layers`` the ``layers_{i}`` subtrees are stacked into one ``layers`` subtree
(:func:`unstack_layers` turns such a tree back into the unrolled layout).

As a text encoder (embedding models): :class:`LlamaEncoder` ``(tokens, mask) -> hidden [B, T,
D]`` (no output layer), causal as pretrained or bidirectional with ``causal=False``.

KV cache (incremental decoding, unrolled layers only): ``Llama(cfg).apply(..., cache=cache)``
with a cache from :func:`init_cache` writes the new tokens' keys and values at slots
``index .. index + T - 1`` and attends over the cache; see :class:`Llama`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtrain.errors import ConfigError
from jaxtrain.models.attention import attention, check_impl
from jaxtrain.models.layers import Dtype, dot_product_attention, partitioned
from jaxtrain.models.moe import IMPLS as MOE_IMPLS
from jaxtrain.models.moe import MoE
from jaxtrain.models.registry import CAUSAL_LM, ModelFamily

Array = jax.Array

# float16 wants train.loss_scale (jaxtrain/loss_scale.py); params stay float32 either way.
DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                            "float16": jnp.float16}

# What the backward pass may keep instead of recomputing (None = keep everything, no remat).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    # As dots_no_batch / attention_out, but what is kept waits in host memory ('pinned_host')
    # between the forward and the backward pass instead of in device memory.
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
    "offload_attention_out": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["attention_out"],
        offload_src="device", offload_dst="pinned_host"),
}

# Logical axis names of activations (see jaxtrain.mesh.DEFAULT_RULES).
ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of :class:`Llama`. Validated on construction."""

    vocab_size: int = 50304
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0 = hidden_size // num_heads
    intermediate_size: int = 688
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    sliding_window: int = 0  # attend to at most this many previous tokens (Mistral); 0 = all
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16' | 'float16' (+ loss scaling)
    remat_policy: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = False
    # jaxtrain.models.attention: 'auto' (None), 'xla', 'cudnn', 'pallas' (GPU), 'splash' (TPU)
    attention_impl: str | None = None
    offload_params: bool = False  # read by the trainer (params in host memory), not the model
    # Mixture of experts (num_experts = 0: dense SwiGLU MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    capacity_factor: float = 1.25  # expert capacity = ceil(k * tokens * factor / experts)
    moe_intermediate_size: int = 0  # 0 = intermediate_size
    # 'dropless': sorted grouped matmul, no token dropped; 'capacity': GShard dispatch
    moe_impl: str = "dropless"
    # False: bidirectional attention (a decoder used as a text encoder, as LLM2Vec); no KV cache
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "num_experts_per_tok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int; got {value!r}")
        for name in ("head_dim", "sliding_window", "num_experts", "moe_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LlamaConfig.{name} must be an int >= 0; got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if not self.head_dim and self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}), or set head_dim"
            )
        if self.head_size % 2:
            raise ValueError(f"LlamaConfig.head_dim (or hidden_size / num_heads) must be even "
                             f"for RoPE; got {self.head_size}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0; got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"LlamaConfig.dtype must be one of {sorted(DTYPES)}; "
                             f"got {self.dtype!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy must be one of {sorted(REMAT_POLICIES)}; "
                             f"got {self.remat_policy!r}")
        check_impl(self.attention_impl)
        if self.attention_impl == "pallas" and self.sliding_window:
            raise ConfigError(
                "model.attention_impl='pallas' (the Pallas GPU flash kernel) has no sliding "
                f"window, but model.sliding_window={self.sliding_window}: use 'cudnn' or 'xla' "
                "on GPU, 'splash' on TPU")
        if self.num_experts and not self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"LlamaConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                f"num_experts ({self.num_experts})"
            )
        if not self.capacity_factor > 0:
            raise ValueError(f"LlamaConfig.capacity_factor must be > 0; "
                             f"got {self.capacity_factor!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"model.moe_impl must be one of {list(MOE_IMPLS)} ('dropless': no "
                              f"token dropped; 'capacity': GShard dispatch with capacity_factor); "
                              f"got {self.moe_impl!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from a mapping; unknown keys raise ``ValueError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys {unknown}; valid keys: {valid}")
        return cls(**dict(d))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> Dtype:
        return DTYPES[self.dtype]

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count (all experts counted)."""
        d, f, h, k, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                          self.num_kv_heads, self.head_size)
        attn = d * (h + 2 * k) * dh + h * dh * d + (self.attention_bias * (h + 2 * k) * dh)
        if self.num_experts:
            mlp = 3 * d * (self.moe_intermediate_size or f) * self.num_experts
            mlp += d * self.num_experts
        else:
            mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        n = self.num_layers * per_layer + d
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), the formula used for MFU:

            6 * N_active + 12 * L * H * Dh * S_attended

        N_active = the matmul parameters a token passes through (embedding lookup excluded, the
        output head included; with MoE only the k routed experts and the router count). The
        second term is the attention matmuls QKᵀ and AV: 2 · 2 · S · H · Dh FLOPs per token and
        layer forward, × 3 for training, over the whole S = the sequence length (or the sliding
        window when shorter) — not halved for the causal mask, the convention of PaLM's MFU.
        """
        d, f, h, k, dh = (self.hidden_size, self.intermediate_size, self.num_heads,
                          self.num_kv_heads, self.head_size)
        attn = d * (h + 2 * k) * dh + h * dh * d
        if self.num_experts:
            mlp = 3 * d * (self.moe_intermediate_size or f) * self.num_experts_per_tok
            mlp += d * self.num_experts
        else:
            mlp = 3 * d * f
        active = self.num_layers * (attn + mlp) + d * self.vocab_size
        span = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        return 6.0 * active + 12.0 * self.num_layers * h * dh * span


def _dense_init(cfg: LlamaConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32 (as Hugging Face's)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding, Hugging Face layout ("rotate half").

    For head dim d and inverse frequencies w_j = theta^(-2j/d), j < d/2, with angle a = pos * w:
    ``x1, x2 = x[..., :d/2], x[..., d/2:]``; ``out = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]``.
    ``x``: [B, T, N, d]; ``positions``: [B, T].
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Projection(nn.Module):
    """``y = x · kernel (+ bias)`` contracting the last ``in_dims`` axes of x; the kernel is
    stored with its full shape ``[in..., out...]`` (no flattening), so its logical axis names
    ``axes`` hold when sharding rules are active during tracing."""

    features: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool
    dtype: Dtype
    kernel_init: Any
    in_dims: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[-self.in_dims:]
        kernel = self.param("kernel", partitioned(self.kernel_init, self.axes),
                            (*in_shape, *self.features), jnp.float32)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_dims)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros,
                                                  self.axes[self.in_dims:]),
                              self.features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def cache_attention_mask(valid: Array, index: Array, positions: Array, window: int) -> Array:
    """[B, 1, T, S] bool: which cache slots each of the T new queries attends to.

    The new tokens sit at slots ``index + i`` (i < T); ``valid`` [B, S] marks the slots that hold
    real tokens (the new ones already written). A key slot's position is the number of valid
    slots before it, ``key_pos = cumsum(valid) - 1`` (positions count real tokens from 0, so left
    padding shifts slots but not positions). Query i of row b attends to slot s iff

        valid[b, s]  and  s <= index + i  and  (window == 0 or positions[b, i] - key_pos[b, s]
        < window)

    or s == index + i (a padding query attends to itself alone: no empty softmax).
    """
    t, s = positions.shape[1], valid.shape[1]
    q_slot = index + jnp.arange(t, dtype=jnp.int32)  # [T]
    k_slot = jnp.arange(s, dtype=jnp.int32)  # [S]
    causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
    mask = valid[:, None, :] & causal[None]  # [B, T, S]
    if window:
        key_pos = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, S]
        mask &= (positions[:, :, None] - key_pos[:, None, :]) < window
    mask |= (k_slot[None, :] == q_slot[:, None])[None]
    return mask[:, None]


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. With ``cache`` (a dict holding the whole model's
    ``k``, ``v`` [L, B, S, K, Dh], the write slot ``index`` and the attention ``mask`` [B, 1, T,
    S] of :func:`cache_attention_mask`), the new keys and values are written into layer
    ``layer``'s slots ``index ..`` and the queries attend over that layer's cache; then it
    returns ``(out, cache with k and v updated)``."""

    cfg: LlamaConfig
    layer: int = 0  # this layer's index in a KV cache's leading axis

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
                 cache: dict[str, Array] | None = None):
        cfg = self.cfg
        dt, dh = cfg.compute_dtype, cfg.head_size
        init = _dense_init(cfg)

        def proj(name: str, heads: int, axis: str) -> Array:
            return Projection((heads, dh), ("embed", axis, "head_dim"), cfg.attention_bias,
                              dt, init, name=name)(x)

        q = proj("q_proj", cfg.num_heads, "heads")
        k = proj("k_proj", cfg.num_kv_heads, "kv_heads")
        v = proj("v_proj", cfg.num_kv_heads, "kv_heads")
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        if cache is None:
            # causal=False (a bidirectional text encoder): the window spans both sides
            w = cfg.sliding_window - 1
            window = (w, 0 if cfg.causal else w) if cfg.sliding_window else None
            out = attention(q, k, v, segment_ids=segment_ids, causal=cfg.causal, window=window,
                            impl=cfg.attention_impl)
        else:
            # Write this layer's new keys/values into the whole cache (one buffer: XLA can
            # update it in place), then attend over the layer's slots. XLA attention: cuDNN's
            # fused kernel takes no arbitrary mask.
            at = (self.layer, 0, cache["index"], 0, 0)
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype)[None], at)
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype)[None], at)
            cache = {**cache, "k": ck, "v": cv}
            out = dot_product_attention(
                q, ck[self.layer].astype(dt), cv[self.layer].astype(dt), mask=cache["mask"],
                implementation="xla")
        out = checkpoint_name(out, "attention_out")
        out = Projection((x.shape[-1],), ("heads", "head_dim", "embed"), False, dt, init,
                         in_dims=2, name="o_proj")(out)
        return out if cache is None else (out, cache)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dense = lambda n, axes, name: nn.Dense(  # noqa: E731
            n, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(_dense_init(cfg), axes), name=name)
        h = nn.silu(dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x))
        h = h * dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(h)


class DecoderBlock(nn.Module):
    """One pre-norm block. Returns (x, router stats) — the stats are {} for a dense block — or,
    with a KV ``cache`` (see :class:`Attention`), (x, stats, updated cache)."""

    cfg: LlamaConfig
    layer: int = 0  # this block's index in a KV cache's leading axis

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
                 cache: dict[str, Array] | None = None):
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ACT)
        h = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="input_layernorm")(x)
        attn = Attention(cfg, layer=self.layer, name="self_attn")(h, positions, segment_ids,
                                                                 cache)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="post_attention_layernorm")(x)
        if cfg.num_experts:
            h, stats = MoE(cfg.num_experts, cfg.num_experts_per_tok,
                           cfg.moe_intermediate_size or cfg.intermediate_size,
                           cfg.capacity_factor, cfg.initializer_range, cfg.compute_dtype,
                           cfg.moe_impl, name="mlp")(h)
        else:
            h, stats = SwiGLU(cfg, name="mlp")(h), {}
        x = nn.with_logical_constraint(x + h, ACT)
        return (x, stats) if cache is None else (x, stats, cache)


class Llama(nn.Module):
    """The decoder. ``__call__(tokens, positions=None, segment_ids=None, cache=None,
    last_logits_only=False)`` returns
    ``(logits [B, T, V] float32, aux)``; ``aux`` holds ``hidden`` (the final normed hidden
    states) and, with MoE layers, their router statistics stacked over the L layers:
    ``router_logits`` [L, B, T, C], ``expert_index`` [L, B, T, k], ``dropped_fraction`` [L]
    (see :class:`jaxtrain.models.moe.MoE`; :func:`jaxtrain.losses.router.router_losses` turns
    them into the router losses).

    KV cache (incremental decoding). ``cache`` is a dict from :func:`init_cache`::

        k, v   [L, B, S, K, Dh]  (compute dtype)  keys / values of the tokens seen so far
        index  int32 scalar                       the slot where the new tokens go
        valid  bool [B, S]                        slots holding real tokens (padding: False)

    The T new tokens are written at slots ``index .. index + T - 1`` (the caller keeps
    ``index + T <= S``: ``dynamic_update_slice`` would clamp, not fail); with ``segment_ids``
    only padding is read from them (0 = padding, any other value = a real token; packed
    segments are not supported with a cache), without them every new token is real. Each new
    query attends to the valid slots at or before its own slot, and with ``sliding_window``
    only to keys whose position is within the window of its position
    (:func:`cache_attention_mask`; a key's position is the count of valid slots before it).
    ``positions`` default to those counts too (0.. from a row's first real token), which is
    what a left-padded batch needs. ``aux["cache"]`` is the updated cache (index advanced by
    T). Only unrolled layers (``scan_layers=False``; :func:`unstack_layers` converts scanned
    parameters); remat is ignored. An MoE model with ``moe_impl='capacity'`` drops no token
    only when each expert's capacity covers the whole group: decode with
    ``dataclasses.replace(cfg, capacity_factor=num_experts / num_experts_per_tok)`` (capacity =
    T, the tokens of a row in this call); ``moe_impl='dropless'`` never drops one.

    ``last_logits_only=True`` computes the logits of the last position alone ([B, 1, V]; a
    prefill needs no others, and the output layer is most of its cost for a large vocabulary);
    ``aux["hidden"]`` stays [B, T, D].

    ``hidden_only=True`` skips the output layer and returns ``(hidden [B, T, D], aux)``, the
    final normed hidden states in the compute dtype (``aux`` without ``hidden``): a text
    encoder's output (:class:`LlamaEncoder`). A model initialised this way has no ``lm_head``.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: dict[str, Array] | None = None,
        last_logits_only: bool = False,
        hidden_only: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        cfg = self.cfg
        b, t = tokens.shape
        if cache is not None and not cfg.causal:
            raise ValueError("Llama: a KV cache needs causal attention, but this config has "
                             "causal=False (a bidirectional encoder): decode with causal=True.")
        if cache is not None:
            if cfg.scan_layers:
                raise ValueError(
                    "Llama: a KV cache needs unrolled layers, but this config has "
                    "scan_layers=True: decode with dataclasses.replace(cfg, scan_layers=False) "
                    "and the parameters converted by jaxtrain.models.llama.unstack_layers.")
            index = jnp.asarray(cache["index"], jnp.int32)
            new_valid = (jnp.ones((b, t), bool) if segment_ids is None
                         else jnp.asarray(segment_ids) != 0)
            valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, index))
            if positions is None:
                counted = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
                positions = jnp.maximum(
                    jax.lax.dynamic_slice_in_dim(counted, index, t, axis=1), 0)
            layer_cache = {"k": cache["k"], "v": cache["v"], "index": index,
                           "mask": cache_attention_mask(valid, index, positions,
                                                        cfg.sliding_window)}
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        segs = segment_ids if cache is None else None  # the cache reads only padding
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
            embedding_init=partitioned(_dense_init(cfg), ("vocab", "embed")), name="embed_tokens",
        )
        x = embed(tokens)
        x = nn.with_logical_constraint(x, ACT)

        policy = REMAT_POLICIES[cfg.remat_policy]
        block = DecoderBlock
        if cfg.remat_policy != "none" and cache is None:
            block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cache is not None:
            per_layer = []
            for i in range(cfg.num_layers):
                x, s, layer_cache = block(cfg, layer=i, name=f"layers_{i}")(
                    x, positions, None, layer_cache)
                per_layer.append(s)
            stats = jax.tree.map(lambda *s: jnp.stack(s), *per_layer) if per_layer[0] else {}
            stats["cache"] = {"k": layer_cache["k"], "v": layer_cache["v"],
                              "index": index + t, "valid": valid}
        elif cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, stats = scanned(cfg, name="layers")(x, positions, segs)  # stacked by scan
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                x, s = block(cfg, name=f"layers_{i}")(x, positions, segs)
                per_layer.append(s)
            stats = jax.tree.map(lambda *s: jnp.stack(s), *per_layer) if per_layer[0] else {}
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="norm")(x)
        if hidden_only:
            return x, stats
        head_in = x[:, -1:] if last_logits_only else x
        if cfg.tie_embeddings:
            logits = embed.attend(head_in)
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                kernel_init=partitioned(_dense_init(cfg), ("embed", "vocab")), name="lm_head",
            )(head_in)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return logits.astype(jnp.float32), {**stats, "hidden": x}


def init_params(cfg: LlamaConfig, rng: Array, seq_len: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of a fresh model."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return Llama(cfg).init(rng, tokens)["params"]


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype: Any = None) -> dict[str, Array]:
    """An empty KV cache for ``batch`` rows of ``length`` slots (see :class:`Llama`):
    ``k``, ``v`` zeros [L, batch, length, K, Dh] in ``dtype`` (default: the compute dtype),
    ``index`` 0, ``valid`` all False."""
    dtype = cfg.compute_dtype if dtype is None else dtype
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_size)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, length), bool)}


def unstack_layers(params: Mapping[str, Any], num_layers: int | None = None) -> dict[str, Any]:
    """Scanned parameters (``layers/...`` with a leading axis of size L) in the unrolled layout
    (``layers_{i}/...`` = ``layers/...[i]``); a tree without ``layers`` is returned as is.
    Works on numpy (views, nothing copied) and jax arrays."""
    if "layers" not in params:
        return dict(params)
    stacked = params["layers"]
    n = num_layers or jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


class LlamaEncoder(Llama):
    """The decoder as a text encoder (embedding models): ``__call__(tokens [B, T], mask [B, T]
    bool = None)`` -> the final normed hidden states [B, T, D] (compute dtype), no output layer
    (its parameters are :class:`Llama`'s without ``lm_head``). ``cfg.causal`` picks causal
    (last-token pooling, as E5-Mistral) or bidirectional (as LLM2Vec) attention.

    Padding (``mask`` False) may sit on either side. It is passed as segment ids (real tokens 1,
    padding 0): a real token attends only to real tokens (before it, when causal), exactly what
    ``transformers.AutoModel`` (LlamaModel, Qwen2Model, MistralModel) computes with that
    ``attention_mask``; padded positions hold values that mean nothing. Positions are
    ``0..T-1`` whatever the padding, as AutoModel without ``position_ids``; RoPE scores depend
    only on position differences, so a left-padded row gives the same real-token states as
    unpadded (to float rounding)."""

    def __call__(self, tokens: Array, mask: Array | None = None) -> Array:  # type: ignore[override]
        segments = None if mask is None else jnp.asarray(mask).astype(jnp.int32)
        hidden, _ = super().__call__(tokens, segment_ids=segments, hidden_only=True)
        return hidden


def hidden_states(cfg: LlamaConfig, params: Any, tokens: Array,
                  mask: Array | None = None) -> Array:
    """:class:`LlamaEncoder`'s final hidden states [B, T, D] of ``tokens`` with padding
    ``mask`` (True = real token), for ``params`` of :class:`Llama` (an ``lm_head`` is ignored)."""
    params = {k: v for k, v in params.items() if k != "lm_head"}
    return LlamaEncoder(cfg).apply({"params": params}, tokens, mask)


def inference_inputs(cfg: LlamaConfig, batch_size: int,
                     seq_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """``tokens``: int32 [batch_size, seq_len]."""
    if seq_len is None:
        raise ValueError("A language model's inference inputs need seq_len (tokens per row).")
    return {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)}


def inference(cfg: LlamaConfig, params: Any, inputs: dict[str, Array]) -> dict[str, Array]:
    """``logits`` float32 [B, T, V] of plain causal rows (positions 0..T-1, one document per
    row)."""
    logits, _ = Llama(cfg).apply({"params": params}, inputs["tokens"])
    return {"logits": logits}


FAMILY = ModelFamily(
    name="llama",
    kind=CAUSAL_LM,
    title="language model",
    config_cls=LlamaConfig,
    module=Llama,
    init=init_params,
    inference_inputs=inference_inputs,
    inference=inference,
    runtime_fields=("dtype", "remat_policy", "scan_layers", "attention_impl", "capacity_factor",
                    "moe_impl", "offload_params"),
    flops_per_token=LlamaConfig.flops_per_token,
    hf_module="jaxtrain.hf.llama",
    hf_model_types=("llama", "qwen2", "mistral"),
    data_keys=("tokenizer",),
)
