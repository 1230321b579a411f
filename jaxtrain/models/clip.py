"""CLIP: a two-tower (vision transformer + causal text transformer) contrastive model.

Module and parameter names follow Hugging Face's ``CLIPModel`` where practical so that its
weights can be converted (``encoder.layers.0`` becomes ``encoder/layers_0``, torch ``weight``
becomes ``kernel`` / ``scale`` / ``embedding``). Parameter tree::

    vision_model/embeddings/{patch_embedding, class_embedding, position_embedding}
    vision_model/pre_layrnorm          (sic: Hugging Face's spelling)
    vision_model/encoder/layers_{i}/{layer_norm1, self_attn, layer_norm2, mlp}
    vision_model/post_layernorm
    text_model/embeddings/{token_embedding, position_embedding}
    text_model/encoder/layers_{i}/...
    text_model/final_layer_norm
    visual_projection, text_projection, logit_scale

Text is padded with id 0. The text tower pools one token per sequence, chosen by
``ClipConfig.text_pooling`` (see :func:`pooling_positions`):

* ``'last'`` (default): the last non-pad token, ``index = sum(tokens != 0) - 1``;
* ``'eos'``: the first occurrence of ``eos_token_id`` (Hugging Face CLIP with a real EOS id);
* ``'argmax'``: the highest token id (Hugging Face CLIP with the legacy ``eos_token_id == 2``,
  e.g. ``openai/clip-vit-base-patch32``, whose ``<|endoftext|>`` is the highest id).

The text tower ignores padding in attention: it is causal, so the pooled position never attends
to the padding after it, and (right-)padded rows give exactly the pooled output of Hugging
Face's model run with the padding ``attention_mask``.
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
    default_embed_init,
    get_activation,
    l2_normalize,
    layer_norm,
    partitioned,
)
from jaxtrain.models.registry import DUAL_ENCODER, ModelFamily

Array = jax.Array

# float16 wants train.loss_scale (jaxtrain/loss_scale.py); params stay float32 either way.
DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                            "float16": jnp.float16}
PAD_ID = 0
TEXT_POOLINGS = ("last", "eos", "argmax")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Hyper-parameters of :class:`CLIP`. Validated on construction."""

    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp_ratio: float = 4.0
    vocab_size: int = 64
    text_max_len: int = 16
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_mlp_ratio: float = 4.0
    embed_dim: int = 128
    init_temperature: float = 0.07  # logit_scale initialised to log(1 / init_temperature)
    max_logit_scale: float = 100.0  # exp(logit_scale) is clipped to this (as in CLIP)
    logit_bias_init: float | None = None  # a learnable `logit_bias` (SigLIP: -10); None = none
    activation: str = "gelu"  # or 'quick_gelu'
    dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16' | 'float16' (+ loss scaling)
    remat: bool = False
    attention_impl: str | None = None  # jax.nn.dot_product_attention: 'xla', 'cudnn', None
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm (Hugging Face's layer_norm_eps)
    text_pooling: str = "last"  # pooled text token: 'last' | 'eos' | 'argmax' (pooling_positions)
    eos_token_id: int | None = None  # the EOS id that text_pooling='eos' pools at
    offload_params: bool = False  # read by the trainer (params in host memory), not the model

    def __post_init__(self) -> None:
        positive = (
            "image_size", "patch_size", "channels", "vision_width", "vision_layers",
            "vision_heads", "vocab_size", "text_max_len", "text_width", "text_layers",
            "text_heads", "embed_dim",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ClipConfig.{name} must be a positive int; got {value!r}")
        numbers = ("vision_mlp_ratio", "text_mlp_ratio", "init_temperature", "max_logit_scale",
                   "layer_norm_eps")
        for name in numbers:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"ClipConfig.{name} must be a positive number; got {value!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"ClipConfig.image_size ({self.image_size}) must be divisible by "
                f"patch_size ({self.patch_size})"
            )
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads != 0:
                raise ValueError(
                    f"ClipConfig.{tower}_width ({width}) must be divisible by "
                    f"{tower}_heads ({heads})"
                )
        if self.logit_bias_init is not None and not isinstance(self.logit_bias_init, int | float):
            raise ValueError(
                f"ClipConfig.logit_bias_init must be a number or None; got {self.logit_bias_init!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"ClipConfig.dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}"
            )
        get_activation(self.activation)
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(
                f"ClipConfig.text_pooling must be one of {list(TEXT_POOLINGS)}; "
                f"got {self.text_pooling!r}"
            )
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
            raise ValueError(f"ClipConfig.eos_token_id must be an int >= 0 or None; got {eos!r}")
        if self.text_pooling == "eos" and eos is None:
            raise ValueError(
                "ClipConfig.text_pooling='eos' needs eos_token_id (the tokenizer's EOS id)"
            )
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(
                f"ClipConfig.attention_impl must be None, 'xla' or 'cudnn'; "
                f"got {self.attention_impl!r}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipConfig:
        """Builds a config from a mapping; unknown keys raise ``ValueError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown ClipConfig keys {unknown}; valid keys: {valid}")
        return cls(**dict(d))

    @property
    def compute_dtype(self) -> Dtype:
        """The jnp dtype for ``dtype``."""
        return DTYPES[self.dtype]

    @property
    def num_patches(self) -> int:
        """Number of image patches (excluding the class token)."""
        return (self.image_size // self.patch_size) ** 2


def _encoder(cfg: ClipConfig, tower: str) -> Encoder:
    width = getattr(cfg, f"{tower}_width")
    heads = getattr(cfg, f"{tower}_heads")
    return Encoder(
        num_layers=getattr(cfg, f"{tower}_layers"),
        num_heads=heads,
        head_dim=width // heads,
        mlp_hidden=int(round(width * getattr(cfg, f"{tower}_mlp_ratio"))),
        dtype=cfg.compute_dtype,
        activation=cfg.activation,
        attention_impl=cfg.attention_impl,
        remat=cfg.remat,
        layer_norm_eps=cfg.layer_norm_eps,
        name="encoder",
    )


class VisionEmbeddings(nn.Module):
    """Patch embedding (conv, stride = patch) + class token + learned position embedding."""

    config: ClipConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        width = cfg.vision_width
        x = nn.Conv(
            features=width,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, "patch", "embed")),
            name="patch_embedding",
        )(images.astype(dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, width)  # [B, num_patches, width]
        cls = self.param(
            "class_embedding",
            partitioned(nn.initializers.normal(stddev=width**-0.5), ("embed",)),
            (width,),
            jnp.float32,
        )
        cls = jnp.broadcast_to(cls.astype(dtype), (batch, 1, width))
        x = jnp.concatenate([cls, x], axis=1)
        pos = nn.Embed(
            num_embeddings=cfg.num_patches + 1,
            features=width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(default_embed_init, ("pos", "embed")),
            name="position_embedding",
        )(jnp.arange(cfg.num_patches + 1))
        return x + pos[None]


class VisionTransformer(nn.Module):
    """CLIP vision tower; returns the post-LayerNorm class-token features ``[B, width]``."""

    config: ClipConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [B, *{expected}] (NHWC); got {images.shape}")
        dtype = cfg.compute_dtype
        x = VisionEmbeddings(cfg, name="embeddings")(images)
        x = layer_norm("pre_layrnorm", dtype, epsilon=cfg.layer_norm_eps)(x)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        x = _encoder(cfg, "vision")(x)
        return layer_norm("post_layernorm", dtype, epsilon=cfg.layer_norm_eps)(x[:, 0])


class TextEmbeddings(nn.Module):
    """Token embedding + learned position embedding."""

    config: ClipConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        x = nn.Embed(
            num_embeddings=cfg.vocab_size,
            features=cfg.text_width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(default_embed_init, ("vocab", "embed")),
            name="token_embedding",
        )(tokens)
        pos = nn.Embed(
            num_embeddings=cfg.text_max_len,
            features=cfg.text_width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(nn.initializers.normal(stddev=0.01), ("pos", "embed")),
            name="position_embedding",
        )(jnp.arange(tokens.shape[1]))
        return x + pos[None]


def eos_positions(tokens: Array) -> Array:
    """Index of the EOS (last non-pad) token per row: ``sum(tokens != 0) - 1``, floored at 0."""
    return jnp.maximum(jnp.sum(tokens != PAD_ID, axis=-1) - 1, 0).astype(jnp.int32)


def pooling_positions(
    tokens: Array, text_pooling: str = "last", eos_token_id: int | None = None
) -> Array:
    """Index ``[B]`` of the pooled token of each row of ``tokens`` ``[B, T]``.

    ``'last'``: :func:`eos_positions` (last non-pad token). ``'eos'``: the first occurrence of
    ``eos_token_id`` (0 if absent), as Hugging Face's ``CLIPTextModel``. ``'argmax'``: the first
    position of the highest id, as Hugging Face's ``CLIPTextModel`` when ``eos_token_id == 2``.
    """
    if text_pooling == "last":
        return eos_positions(tokens)
    if text_pooling == "argmax":
        return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
    if text_pooling == "eos":
        if eos_token_id is None:
            raise ValueError("text_pooling='eos' needs eos_token_id")
        return jnp.argmax(tokens == eos_token_id, axis=-1).astype(jnp.int32)
    raise ValueError(f"text_pooling must be one of {list(TEXT_POOLINGS)}; got {text_pooling!r}")


class TextTransformer(nn.Module):
    """CLIP text tower (causal); returns final-LayerNorm features at the pooled token
    ``[B, width]`` (``eos_index``, or else ``config.text_pooling``'s position)."""

    config: ClipConfig

    @nn.compact
    def __call__(self, tokens: Array, eos_index: Array | None = None) -> Array:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, T]; got {tokens.shape}")
        if tokens.shape[1] > cfg.text_max_len:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds text_max_len ({cfg.text_max_len})"
            )
        x = TextEmbeddings(cfg, name="embeddings")(tokens)
        x = _encoder(cfg, "text")(x, causal=True)
        x = layer_norm("final_layer_norm", cfg.compute_dtype, epsilon=cfg.layer_norm_eps)(x)
        if eos_index is None:
            eos_index = pooling_positions(tokens, cfg.text_pooling, cfg.eos_token_id)
        return jnp.take_along_axis(x, eos_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]


class CLIP(nn.Module):
    """CLIP two-tower model.

    ``__call__(images, tokens)`` returns ``image_embeds`` / ``text_embeds`` (L2-normalised,
    ``[B, embed_dim]``) and ``logit_scale`` (the raw log-scale parameter; the loss computes
    ``min(exp(logit_scale), max_logit_scale)``), plus ``logit_bias`` when the config has
    ``logit_bias_init`` (SigLIP). All outputs are float32.
    """

    config: ClipConfig

    def setup(self) -> None:
        cfg = self.config
        self.vision_model = VisionTransformer(cfg)
        self.text_model = TextTransformer(cfg)
        self.visual_projection = self._projection()
        self.text_projection = self._projection()
        self.logit_scale = self.param(
            "logit_scale",
            partitioned(nn.initializers.constant(math.log(1.0 / cfg.init_temperature)), ()),
            (),
            jnp.float32,
        )
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias",
                partitioned(nn.initializers.constant(cfg.logit_bias_init), ()),
                (),
                jnp.float32,
            )

    def _projection(self) -> nn.Dense:
        return nn.Dense(
            self.config.embed_dim,
            use_bias=False,
            dtype=self.config.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", None)),
        )

    def encode_image(self, images: Array) -> Array:
        """Images ``[B, H, W, C]`` float -> unnormalised image embeddings ``[B, embed_dim]``."""
        return self.visual_projection(self.vision_model(images)).astype(jnp.float32)

    def encode_text(self, tokens: Array, eos_index: Array | None = None) -> Array:
        """Tokens ``[B, T]`` int (pad 0) -> unnormalised text embeddings ``[B, embed_dim]``.

        ``eos_index`` ([B] int) overrides the pooling position, which otherwise follows
        ``config.text_pooling`` (default: the last non-pad token, ``sum(tokens != 0) - 1``).
        """
        return self.text_projection(self.text_model(tokens, eos_index)).astype(jnp.float32)

    def scalars(self) -> dict[str, Array]:
        """The loss's learnable scalars: ``logit_scale`` (+ ``logit_bias`` if configured)."""
        out = {"logit_scale": jnp.asarray(self.logit_scale, jnp.float32)}
        if self.config.logit_bias_init is not None:
            out["logit_bias"] = jnp.asarray(self.logit_bias, jnp.float32)
        return out

    def __call__(self, images: Array, tokens: Array) -> dict[str, Array]:
        return {
            "image_embeds": l2_normalize(self.encode_image(images)),
            "text_embeds": l2_normalize(self.encode_text(tokens)),
            **self.scalars(),
        }


def init_params(cfg: ClipConfig, rng: Array) -> Any:
    """Boxed (logically partitioned) parameters of a fresh model."""
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    tokens = jnp.zeros((1, cfg.text_max_len), jnp.int32)
    return CLIP(cfg).init(rng, images, tokens)["params"]


def inference_inputs(cfg: ClipConfig, batch_size: int,
                     seq_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """``image`` float32 [B, image_size, image_size, channels] (preprocessed) and ``text`` int32
    [B, text_max_len] (token ids, padded with 0); the text length is the model's."""
    if seq_len is not None:
        raise ValueError(f"CLIP's inputs have no sequence length to set (seq_len={seq_len}): "
                         f"the text is model.text_max_len = {cfg.text_max_len} tokens.")
    return {
        "image": jax.ShapeDtypeStruct((batch_size, cfg.image_size, cfg.image_size, cfg.channels),
                                      jnp.float32),
        "text": jax.ShapeDtypeStruct((batch_size, cfg.text_max_len), jnp.int32),
    }


def inference(cfg: ClipConfig, params: Any, inputs: dict[str, Array]) -> dict[str, Array]:
    """L2-normalised ``image_embeds`` / ``text_embeds`` [B, embed_dim] of ``image``, ``text``."""
    out = CLIP(cfg).apply({"params": params}, inputs["image"], inputs["text"])
    return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"]}


FAMILY = ModelFamily(
    name="clip",
    kind=DUAL_ENCODER,
    title="CLIP",
    config_cls=ClipConfig,
    module=CLIP,
    init=init_params,
    inference_inputs=inference_inputs,
    inference=inference,
    runtime_fields=("dtype", "remat", "attention_impl", "offload_params"),
    hf_module="jaxtrain.hf.clip",
    hf_model_types=("clip",),
    data_keys=("tokenizer", "image_mean", "image_std"),
)
