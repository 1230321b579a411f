"""Generic pre-LayerNorm transformer building blocks (Flax Linen).

Every parameter is created through ``nn.with_logical_partitioning`` so that
``nn.get_partition_spec(jax.eval_shape(model.init, ...))`` yields ``PartitionSpec``s over
logical axis names. The logical names used for parameters are:

* ``'embed'`` -- model width, ``'mlp'`` -- MLP hidden width,
* ``'heads'`` / ``'kv'`` -- attention heads / per-head width,
* ``'vocab'`` -- token vocabulary, ``'pos'`` -- position, ``'patch'`` -- conv input channels,
* ``'norm'`` -- LayerNorm scale and bias, and ``None`` (never sharded).

Activations are constrained at block boundaries to ``('batch', 'length', 'embed')``; this is a
no-op unless logical axis rules are active.

Parameters are stored in ``param_dtype`` (float32 by default); computation runs in ``dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

ACTIVATION_AXES = ("batch", "length", "embed")


def dot_product_attention(q: Array, k: Array, v: Array, **kwargs: Any) -> Array:
    """``jax.nn.dot_product_attention(q, k, v, **kwargs)``. float16 on XLA:CPU runs in float32
    and is cast back: jax's float16 path asks for a float16 x float16 -> float32 dot, which
    XLA:CPU cannot compile (its logits and softmax are float32 anyway). Accelerators: as is."""
    if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        up = (t.astype(jnp.float32) for t in (q, k, v))
        return jax.nn.dot_product_attention(*up, **kwargs).astype(jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, **kwargs)

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # Exact (erf) GELU, as Hugging Face's ``"gelu"``.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # OpenAI CLIP's QuickGELU: x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # tanh-approximated GELU, as Hugging Face's ``"gelu_pytorch_tanh"`` (SigLIP):
    # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

default_kernel_init = nn.initializers.xavier_uniform()
default_embed_init = nn.initializers.normal(stddev=0.02)


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation function called ``name`` (a key of ``_ACTIVATIONS``)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; valid activations: {sorted(_ACTIVATIONS)}"
        ) from None


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` along the last axis."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def partitioned(init_fn: Callable[..., Array], names: tuple[str | None, ...]) -> Callable:
    """Shorthand for ``nn.with_logical_partitioning(init_fn, names)``."""
    return nn.with_logical_partitioning(init_fn, names)


def layer_norm(
    name: str, dtype: Dtype, param_dtype: Dtype = jnp.float32, epsilon: float = 1e-5
) -> nn.LayerNorm:
    """A LayerNorm whose scale and bias carry the logical axis ``('norm',)``."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def padding_to_attention_mask(mask: Array) -> Array:
    """Turns a key-padding mask ``[B, T]`` (True = real token) into ``[B, 1, 1, T]``.

    4-D masks are returned unchanged (as bool). Any other rank raises ``ValueError``.
    """
    mask = jnp.asarray(mask, dtype=jnp.bool_)
    if mask.ndim == 2:
        return mask[:, None, None, :]
    if mask.ndim == 4:
        return mask
    raise ValueError(
        f"attention mask must be a padding mask [B, T] or a 4-D mask [B, 1|N, T, T]; "
        f"got shape {mask.shape}"
    )


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention via ``jax.nn.dot_product_attention``.

    Projections are named like Hugging Face's CLIP (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``). ``attention_impl`` is forwarded as ``implementation`` ('xla', 'cudnn' or
    None for automatic choice).
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False) -> Array:
        """Self-attention over ``x`` [B, T, D].

        Args:
          x: inputs ``[B, T, D]``.
          mask: optional bool mask, ``[B, 1, T, T]`` (True = attend) or a padding mask
            ``[B, T]`` (True = real token) that is broadcast over heads and queries.
          causal: whether to apply a causal (lower-triangular) mask as well.

        Returns:
          ``[B, T, D]`` in ``dtype``.
        """
        features = x.shape[-1]

        def proj(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                features=(self.num_heads, self.head_dim),
                axis=-1,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(default_kernel_init, ("embed", "heads", "kv")),
                bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )

        q = proj("q_proj")(x)  # [B, T, N, H]
        k = proj("k_proj")(x)
        v = proj("v_proj")(x)
        if mask is not None:
            mask = padding_to_attention_mask(mask)
        out = dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, implementation=self.attention_impl
        )
        return nn.DenseGeneral(
            features=features,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(default_kernel_init, ("heads", "kv", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="out_proj",
        )(out)


class Mlp(nn.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))`` with hidden width ``hidden``."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = get_activation(self.activation)
        features = x.shape[-1]
        h = nn.Dense(
            self.hidden,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(default_kernel_init, ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(x)
        h = act(h)
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(default_kernel_init, ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(h)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``."""

    num_heads: int
    head_dim: int
    mlp_hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu"
    attention_impl: str | None = None
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False) -> Array:
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        eps = self.layer_norm_eps
        h = layer_norm("layer_norm1", self.dtype, self.param_dtype, epsilon=eps)(x)
        h = MultiHeadAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
            name="self_attn",
        )(h, mask=mask, causal=causal)
        x = x + h
        h = layer_norm("layer_norm2", self.dtype, self.param_dtype, epsilon=eps)(x)
        h = Mlp(
            hidden=self.mlp_hidden,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            activation=self.activation,
            name="mlp",
        )(h)
        x = x + h
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class Encoder(nn.Module):
    """A stack of ``num_layers`` :class:`EncoderBlock`\\ s named ``layers_{i}``.

    With ``remat=True`` each block is wrapped in ``nn.remat`` (activations recomputed in the
    backward pass); parameters and outputs are identical either way.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu"
    attention_impl: str | None = None
    remat: bool = False
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, causal: bool = False) -> Array:
        # ``causal`` is a Python bool: static under remat (argnum 0 is the module itself).
        block_cls = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
        for i in range(self.num_layers):
            x = block_cls(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                mlp_hidden=self.mlp_hidden,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                activation=self.activation,
                attention_impl=self.attention_impl,
                layer_norm_eps=self.layer_norm_eps,
                name=f"layers_{i}",
            )(x, mask, causal)
        return x
