"""SigLIP: a two-tower contrastive model trained with the pairwise sigmoid loss (Zhai et al.
2023), laid out as Hugging Face's ``SiglipModel`` so its weights convert
(:mod:`jaxtrain.hf.siglip`).

How it differs from CLIP (:mod:`jaxtrain.models.clip`):

* vision tower: patch conv (with bias) + learned positions, **no class token, no pre-LayerNorm**;
  after the encoder and ``post_layernorm`` the patches are pooled by a **multihead attention
  pooling head** ("MAP"): one learned query ``probe`` attends to every patch, then
  ``h + mlp(layernorm(h))``. Its output ``[B, vision_width]`` is the image embedding (no
  projection).
* text tower: **bidirectional** (no causal mask), learned positions, ``final_layer_norm``; the
  pooled state is the **last position's** (``T - 1``, whatever token is there: SigLIP pads every
  text to its full length), then ``head``, a Dense with bias ``text_width -> vision_width``.
* scalars ``logit_scale`` and ``logit_bias``; the pair logits are
  ``exp(logit_scale) * <img, txt> / (|img| |txt|) + logit_bias`` (unclipped: ``max_logit_scale``
  is None by default), the logits :func:`jaxtrain.losses.contrastive.siglip_loss` uses.
* activation ``gelu_pytorch_tanh`` (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``),
  LayerNorm epsilon 1e-6.

Parameter tree (``i`` = layer)::

    vision_model/embeddings/{patch_embedding/{kernel, bias}, position_embedding/embedding}
    vision_model/encoder/layers_{i}/{layer_norm1, self_attn, layer_norm2, mlp}
    vision_model/post_layernorm
    vision_model/head/{probe, attention/{q_proj, k_proj, v_proj, out_proj}, layernorm, mlp}
    text_model/embeddings/{token_embedding, position_embedding}
    text_model/encoder/layers_{i}/...
    text_model/final_layer_norm, text_model/head
    logit_scale, logit_bias

:class:`SiglipVision` is the vision tower alone (``images [B, H, W, C] -> pooled [B,
vision_width]``, parameters = ``vision_model``'s subtree), an image tower for other dual
encoders; :class:`SiglipText` the text tower (``hidden`` gives its ``[B, T, text_width]`` states).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.models.layers import (
    ACTIVATION_AXES,
    Dtype,
    Encoder,
    Mlp,
    default_embed_init,
    default_kernel_init,
    dot_product_attention,
    get_activation,
    l2_normalize,
    layer_norm,
    partitioned,
)
from jaxtrain.models.registry import DUAL_ENCODER, ModelFamily

Array = jax.Array

DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                            "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """Hyper-parameters of :class:`Siglip` (defaults: a tiny model for the built-in captions).
    Validated on construction (``ValueError`` naming the field)."""

    # vision tower
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    vision_width: int = 64  # also the embedding width (the text head maps to it)
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp_dim: int = 256  # Hugging Face's vision_config.intermediate_size
    # text tower
    vocab_size: int = 64
    text_max_len: int = 16  # max_position_embeddings: texts are padded to this length
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_mlp_dim: int = 256
    # the loss's scalars
    init_temperature: float = 0.1  # logit_scale initialised to log(1 / init_temperature)
    logit_bias_init: float = -10.0
    max_logit_scale: float | None = None  # None: exp(logit_scale) unclipped, as SigLIP
    activation: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    # how to run it
    dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16' | 'float16' (+ loss scaling)
    remat: bool = False
    attention_impl: str | None = None  # jax.nn.dot_product_attention: 'xla', 'cudnn', None
    offload_params: bool = False  # read by the trainer (params in host memory), not the model

    def __post_init__(self) -> None:
        positive = (
            "image_size", "patch_size", "channels", "vision_width", "vision_layers",
            "vision_heads", "vision_mlp_dim", "vocab_size", "text_max_len", "text_width",
            "text_layers", "text_heads", "text_mlp_dim",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SiglipConfig.{name} must be a positive int; got {value!r}")
        for name in ("init_temperature", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"SiglipConfig.{name} must be a positive number; got {value!r}")
        top = self.max_logit_scale
        if top is not None and (isinstance(top, bool) or not isinstance(top, int | float)
                                or not top > 0):
            raise ValueError(f"SiglipConfig.max_logit_scale must be a positive number or None "
                             f"(unclipped); got {top!r}")
        bias = self.logit_bias_init
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise ValueError(f"SiglipConfig.logit_bias_init must be a number (SigLIP: -10); "
                             f"got {bias!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"SiglipConfig.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads != 0:
                raise ValueError(f"SiglipConfig.{tower}_width ({width}) must be divisible by "
                                 f"{tower}_heads ({heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"SiglipConfig.dtype must be one of {sorted(DTYPES)}; "
                             f"got {self.dtype!r}")
        try:
            get_activation(self.activation)
        except ValueError as e:
            raise ValueError(f"SiglipConfig.activation: {e}") from None
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"SiglipConfig.attention_impl must be None, 'xla' or 'cudnn'; "
                             f"got {self.attention_impl!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiglipConfig:
        """Builds a config from a mapping; unknown keys raise ``ValueError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown SiglipConfig keys {unknown}; valid keys: {valid}")
        return cls(**dict(d))

    @property
    def compute_dtype(self) -> Dtype:
        """The jnp dtype for ``dtype``."""
        return DTYPES[self.dtype]

    @property
    def num_patches(self) -> int:
        """Number of image patches (= vision positions: there is no class token)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def embed_dim(self) -> int:
        """Width of both embeddings: the vision tower's (the text ``head`` maps to it)."""
        return self.vision_width


def _encoder(cfg: SiglipConfig, tower: str) -> Encoder:
    width, heads = getattr(cfg, f"{tower}_width"), getattr(cfg, f"{tower}_heads")
    return Encoder(
        num_layers=getattr(cfg, f"{tower}_layers"),
        num_heads=heads,
        head_dim=width // heads,
        mlp_hidden=getattr(cfg, f"{tower}_mlp_dim"),
        dtype=cfg.compute_dtype,
        activation=cfg.activation,
        attention_impl=cfg.attention_impl,
        remat=cfg.remat,
        layer_norm_eps=cfg.layer_norm_eps,
        name="encoder",
    )


class VisionEmbeddings(nn.Module):
    """Patch embedding (conv with bias, stride = patch) + learned position embedding."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        x = nn.Conv(
            features=cfg.vision_width,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, "patch", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(images.astype(dtype))
        x = x.reshape(x.shape[0], -1, cfg.vision_width)  # [B, num_patches, width], row-major
        pos = nn.Embed(
            num_embeddings=cfg.num_patches,
            features=cfg.vision_width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(nn.initializers.normal(stddev=cfg.vision_width**-0.5),
                                       ("pos", "embed")),
            name="position_embedding",
        )(jnp.arange(cfg.num_patches))
        return x + pos[None]


class AttentionPoolingHead(nn.Module):
    """Multihead attention pooling ("MAP"): a learned ``probe`` [1, 1, D] is the one query of a
    multi-head attention over the tokens ``x`` [B, L, D] (``q = probe Wq + bq``, ``k = x Wk +
    bk``, ``v = x Wv + bv``, softmax over L, ``out_proj``), giving ``h`` [B, D]; returns
    ``h + mlp(layernorm(h))``. Hugging Face's ``SiglipMultiheadAttentionPoolingHead``."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype, width, heads = cfg.compute_dtype, cfg.vision_width, cfg.vision_heads
        probe = self.param("probe", partitioned(nn.initializers.normal(stddev=width**-0.5),
                                                (None, None, "embed")),
                           (1, 1, width), jnp.float32)
        query = jnp.broadcast_to(probe.astype(dtype), (x.shape[0], 1, width))
        h = CrossAttention(heads, width // heads, dtype=dtype, attention_impl=cfg.attention_impl,
                           name="attention")(query, x)
        y = layer_norm("layernorm", dtype, epsilon=cfg.layer_norm_eps)(h)
        h = h + Mlp(hidden=cfg.vision_mlp_dim, dtype=dtype, activation=cfg.activation,
                    name="mlp")(y)
        return h[:, 0]


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``q_in`` [B, S, D] over ``kv_in`` [B, L, D] (projections
    named as :class:`jaxtrain.models.layers.MultiHeadAttention`'s)."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, q_in: Array, kv_in: Array) -> Array:
        def proj(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                features=(self.num_heads, self.head_dim), axis=-1, dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=partitioned(default_kernel_init, ("embed", "heads", "kv")),
                bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")), name=name)

        out = dot_product_attention(proj("q_proj")(q_in), proj("k_proj")(kv_in),
                                    proj("v_proj")(kv_in), implementation=self.attention_impl)
        return nn.DenseGeneral(
            features=q_in.shape[-1], axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(default_kernel_init, ("heads", "kv", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="out_proj")(out)


class SiglipVision(nn.Module):
    """SigLIP vision tower: images ``[B, H, W, C]`` (NHWC, preprocessed) -> the attention-pooled
    features ``[B, vision_width]`` (SigLIP's image embedding, before normalisation)."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [B, *{expected}] (NHWC); got {images.shape}")
        x = VisionEmbeddings(cfg, name="embeddings")(images)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        x = _encoder(cfg, "vision")(x)
        x = layer_norm("post_layernorm", cfg.compute_dtype, epsilon=cfg.layer_norm_eps)(x)
        return AttentionPoolingHead(cfg, name="head")(x)


class TextEmbeddings(nn.Module):
    """Token embedding + learned position embedding (positions ``0 .. T-1``)."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.config

        def embed(n: int, axis: str, name: str) -> nn.Embed:
            return nn.Embed(num_embeddings=n, features=cfg.text_width, dtype=cfg.compute_dtype,
                            param_dtype=jnp.float32,
                            embedding_init=partitioned(default_embed_init, (axis, "embed")),
                            name=name)

        x = embed(cfg.vocab_size, "vocab", "token_embedding")(tokens)
        return x + embed(cfg.text_max_len, "pos", "position_embedding")(
            jnp.arange(tokens.shape[1]))[None]


class SiglipText(nn.Module):
    """SigLIP text tower (bidirectional). ``__call__(tokens, mask=None)``: the last position's
    final-LayerNorm state through ``head`` -> ``[B, vision_width]``; ``hidden(tokens, mask)``:
    the final-LayerNorm states ``[B, T, text_width]``. ``mask`` [B, T] (True = real token)
    hides padding from attention, as Hugging Face's ``attention_mask``; SigLIP itself runs
    without one (texts padded to full length)."""

    config: SiglipConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = cfg.compute_dtype
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = _encoder(cfg, "text")
        self.final_layer_norm = layer_norm("final_layer_norm", dtype,
                                           epsilon=cfg.layer_norm_eps)
        self.head = nn.Dense(
            cfg.vision_width, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", None)),
            bias_init=partitioned(nn.initializers.zeros, (None,)))

    def hidden(self, tokens: Array, mask: Array | None = None) -> Array:
        """Final-LayerNorm states ``[B, T, text_width]`` of ``tokens`` [B, T] int."""
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, T]; got {tokens.shape}")
        if tokens.shape[1] > cfg.text_max_len:
            raise ValueError(f"token length {tokens.shape[1]} exceeds text_max_len "
                             f"({cfg.text_max_len})")
        x = nn.with_logical_constraint(self.embeddings(tokens), ACTIVATION_AXES)
        return self.final_layer_norm(self.encoder(x, mask))

    def __call__(self, tokens: Array, mask: Array | None = None) -> Array:
        return self.head(self.hidden(tokens, mask)[:, -1])


class Siglip(nn.Module):
    """SigLIP two-tower model (the ``DUAL_ENCODER`` contract, as :class:`jaxtrain.models.clip.
    CLIP`).

    ``__call__(images, tokens)`` returns ``image_embeds`` / ``text_embeds`` (L2-normalised,
    ``[B, vision_width]``) and the raw scalars ``logit_scale`` (log of t) and ``logit_bias``
    (b): ``logits_ij = t <image_i, text_j> + b``. All outputs are float32.
    """

    config: SiglipConfig

    def setup(self) -> None:
        cfg = self.config
        self.vision_model = SiglipVision(cfg)
        self.text_model = SiglipText(cfg)
        self.logit_scale = self.param(
            "logit_scale",
            partitioned(nn.initializers.constant(math.log(1.0 / cfg.init_temperature)), ()),
            (), jnp.float32)
        self.logit_bias = self.param(
            "logit_bias", partitioned(nn.initializers.constant(cfg.logit_bias_init), ()),
            (), jnp.float32)

    def encode_image(self, images: Array) -> Array:
        """Images ``[B, H, W, C]`` float -> unnormalised image embeddings ``[B, vision_width]``."""
        return self.vision_model(images).astype(jnp.float32)

    def encode_text(self, tokens: Array, mask: Array | None = None) -> Array:
        """Tokens ``[B, T]`` int -> unnormalised text embeddings ``[B, vision_width]``, pooled
        at position ``T - 1`` (pad texts to ``text_max_len``, as SigLIP was trained).
        ``mask`` [B, T] bool: optional padding mask for attention (see :class:`SiglipText`)."""
        return self.text_model(tokens, mask).astype(jnp.float32)

    def scalars(self) -> dict[str, Array]:
        """The loss's learnable scalars ``logit_scale`` and ``logit_bias``."""
        return {"logit_scale": jnp.asarray(self.logit_scale, jnp.float32),
                "logit_bias": jnp.asarray(self.logit_bias, jnp.float32)}

    def __call__(self, images: Array, tokens: Array) -> dict[str, Array]:
        return {
            "image_embeds": l2_normalize(self.encode_image(images)),
            "text_embeds": l2_normalize(self.encode_text(tokens)),
            **self.scalars(),
        }


def init_params(cfg: SiglipConfig, rng: Array) -> Any:
    """Boxed (logically partitioned) parameters of a fresh model."""
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    tokens = jnp.zeros((1, cfg.text_max_len), jnp.int32)
    return Siglip(cfg).init(rng, images, tokens)["params"]


def init_vision_params(cfg: SiglipConfig, rng: Array) -> Any:
    """Boxed parameters of a fresh :class:`SiglipVision` (the ``vision_model`` subtree)."""
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return SiglipVision(cfg).init(rng, images)["params"]


def inference_inputs(cfg: SiglipConfig, batch_size: int,
                     seq_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """``image`` float32 [B, image_size, image_size, channels] (preprocessed) and ``text`` int32
    [B, text_max_len] (token ids padded to the full length); the text length is the model's."""
    if seq_len is not None:
        raise ValueError(f"SigLIP's inputs have no sequence length to set (seq_len={seq_len}): "
                         f"the text is model.text_max_len = {cfg.text_max_len} tokens.")
    return {
        "image": jax.ShapeDtypeStruct((batch_size, cfg.image_size, cfg.image_size, cfg.channels),
                                      jnp.float32),
        "text": jax.ShapeDtypeStruct((batch_size, cfg.text_max_len), jnp.int32),
    }


def inference(cfg: SiglipConfig, params: Any, inputs: dict[str, Array]) -> dict[str, Array]:
    """L2-normalised ``image_embeds`` / ``text_embeds`` [B, vision_width] of ``image``, ``text``."""
    out = Siglip(cfg).apply({"params": params}, inputs["image"], inputs["text"])
    return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"]}


FAMILY = ModelFamily(
    name="siglip",
    kind=DUAL_ENCODER,
    title="SigLIP",
    config_cls=SiglipConfig,
    module=Siglip,
    init=init_params,
    inference_inputs=inference_inputs,
    inference=inference,
    runtime_fields=("dtype", "remat", "attention_impl", "offload_params"),
    hf_module="jaxtrain.hf.siglip",
    hf_model_types=("siglip",),
    data_keys=("tokenizer", "image_mean", "image_std"),
)
