"""Embedder: a dual encoder composed of towers from the registry (family ``embedder``).

The text tower (and, for t2t, the single tower) is a CLIP or SigLIP text transformer
(``'clip'``, ``'siglip'``),
a BERT-family encoder (``'bert'``, :mod:`jaxtrain.models.bert`) or a Llama-family decoder
(``'llama'``, :mod:`jaxtrain.models.llama`: Llama, Qwen2, Mistral) run causally or
bidirectionally (``causal``); the image tower is none, a CLIP ViT or a SigLIP ViT. A text is
embedded as

    h = tower(tokens, mask)                 [B, T, D]   (mask = tokens >= 0)
    e = pool(h, mask, pooling)              [B, D]      (cls | mean | last_token)
    e = e · W_text                          [B, E]      (only with embed_dim > 0)

and an image as ``e = image_tower(images) · W_image``; the task L2-normalises both
(``normalize``: what an exported model does). Token rows are padded with **-1** (any side):
``mask = tokens >= 0``, ``tokens = max(tokens, 0)``, unambiguous for any tokenizer (Hugging
Face decoders often pad with their eos id). With ``pooling='last_token'`` the task appends the
tokenizer's eos to every text (:meth:`EmbedderConfig.text_rows`).

Parameter tree (each tower's subtree exactly its family's own, so Hugging Face weights load
into it and :mod:`jaxtrain.export` writes it back)::

    text/...                      the text tower (bert: embeddings, layers_i; llama:
                                  embed_tokens, layers_i, norm (no lm_head); clip: CLIPModel's
                                  text_model; siglip: SiglipModel's text_model, its head
                                  applied after pooling)
    text_projection/kernel        [D, E]   (embed_dim > 0)
    image/...                     the image tower (clip: vision_model; siglip: vision_model)
    image_projection/kernel       [Dv, E]  (embed_dim > 0 and an image tower)
    logit_scale                   ()       log(1 / init_temperature)
    logit_bias                    ()       (logit_bias_init set: the SigLIP loss)

The tower configs are dicts of the tower family's own config fields (``text``, ``image``),
validated by its config class; the runtime fields (dtype, remat, attention_impl) are the
embedder's and are handed to the towers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.models import bert, clip, llama, siglip
from jaxtrain.models.layers import Encoder, l2_normalize, layer_norm, partitioned
from jaxtrain.models.pooling import POOLINGS, pool
from jaxtrain.models.registry import DUAL_ENCODER, ModelFamily

Array = jax.Array

TEXT_TOWERS: dict[str, type] = {"clip": clip.ClipConfig, "bert": bert.BertConfig,
                                "llama": llama.LlamaConfig, "siglip": siglip.SiglipConfig}
IMAGE_TOWERS: dict[str, type | None] = {"none": None, "clip": clip.ClipConfig,
                                        "siglip": siglip.SiglipConfig}
AUTO = "auto"  # text_tower: the family of an init_from Hugging Face directory (hf/embedder.py)
RUNTIME = ("dtype", "remat", "attention_impl", "offload_params")


def _tower_runtime(cls: type, runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The embedder's runtime fields a tower config class has (llama: ``remat`` ->
    ``remat_policy='full'``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in runtime.items() if k in names}
    if "remat_policy" in names and runtime.get("remat"):
        out["remat_policy"] = "full"
    return out


def tower_defaults(tower: str, image: bool = False) -> dict[str, Any]:
    """Every config field of a tower family with its default (a config file's ``model.text`` /
    ``model.image`` block, so each key can be overridden on the command line)."""
    table = IMAGE_TOWERS if image else TEXT_TOWERS
    cls = table.get(tower)
    if cls is None:
        return {}
    return {k: v for k, v in dataclasses.asdict(cls()).items() if k not in RUNTIME}


@dataclasses.dataclass(frozen=True, eq=False)
class EmbedderConfig:
    """Hyper-parameters of :class:`Embedder`. Validated on construction."""

    # 'clip' | 'bert' | 'llama' | 'siglip' ('auto': from init_from's config.json)
    text_tower: str = "bert"
    text: dict = dataclasses.field(default_factory=dict)  # the tower family's config fields
    image_tower: str = "none"  # 'none' | 'clip' | 'siglip'
    image: dict = dataclasses.field(default_factory=dict)  # the image tower's config fields
    pooling: str = "mean"  # 'cls' | 'mean' | 'last_token' (jaxtrain.models.pooling)
    causal: bool = True  # llama tower: causal attention (as pretrained); False = bidirectional
    text_max_len: int = 32  # tokens per text row (the tower's positions must cover it)
    embed_dim: int = 0  # > 0: a linear projection (no bias) to this width; 0 = none
    normalize: bool = True  # exported embeddings are L2-normalised (training always is)
    init_temperature: float = 0.07  # logit_scale initialised to log(1 / init_temperature)
    max_logit_scale: float = 100.0  # exp(logit_scale) is clipped to this
    logit_bias_init: float | None = None  # a learnable logit_bias (the SigLIP loss)
    dtype: str = "float32"  # compute dtype of the towers
    remat: bool = False
    attention_impl: str | None = None
    offload_params: bool = False  # read by the trainer (params in host memory), not the model

    def __post_init__(self) -> None:
        if self.text_tower == AUTO:
            raise ValueError(
                "EmbedderConfig.text_tower='auto' picks the tower from a Hugging Face directory: "
                "set init_from to one (its config.json's model_type), or name the tower "
                f"({sorted(TEXT_TOWERS)}).")
        if self.text_tower not in TEXT_TOWERS:
            raise ValueError(f"EmbedderConfig.text_tower must be one of "
                             f"{sorted(TEXT_TOWERS) + [AUTO]}; got {self.text_tower!r}")
        if self.image_tower not in IMAGE_TOWERS:
            raise ValueError(f"EmbedderConfig.image_tower must be one of {list(IMAGE_TOWERS)}; "
                             f"got {self.image_tower!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EmbedderConfig.pooling must be one of {list(POOLINGS)}; "
                             f"got {self.pooling!r}")
        for name in ("text_max_len", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (
                    name == "text_max_len"):
                raise ValueError(f"EmbedderConfig.{name} must be an int >= "
                                 f"{int(name == 'text_max_len')}; got {value!r}")
        for name in ("init_temperature", "max_logit_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EmbedderConfig.{name} must be > 0; got {getattr(self, name)!r}")
        for name in ("causal", "normalize", "remat", "offload_params"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EmbedderConfig.{name} must be a bool; got "
                                 f"{getattr(self, name)!r}")
        self.text_config  # noqa: B018  (validate the towers now)
        self.image_config  # noqa: B018
        if self.text_tower == "bert" and self.text_max_len > \
                self.text_config.max_position_embeddings:
            raise ValueError(f"EmbedderConfig.text_max_len ({self.text_max_len}) exceeds the bert "
                             f"tower's max_position_embeddings "
                             f"({self.text_config.max_position_embeddings})")
        if self.text_tower in ("clip", "siglip") and \
                self.text_max_len > self.text_config.text_max_len:
            raise ValueError(f"EmbedderConfig.text_max_len ({self.text_max_len}) exceeds the "
                             f"{self.text_tower} tower's text_max_len "
                             f"({self.text_config.text_max_len})")
        if self.pooling == "cls" and (self.text_tower == "clip" or (
                self.text_tower == "llama" and self.causal)):
            raise ValueError(
                f"EmbedderConfig.pooling='cls' with a causal {self.text_tower} tower: its first "
                "position sees only the first token. Use pooling='last_token' (or 'mean'), or "
                "causal=False (llama) for a bidirectional tower.")
        if self.image_tower != "none" and not self.embed_dim and \
                self.text_width != self.image_width:
            raise ValueError(
                f"EmbedderConfig: the text tower's width ({self.text_width}) differs from the "
                f"image tower's ({self.image_width}) and embed_dim is 0 (no projection): set "
                "embed_dim > 0 to project both to one width.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbedderConfig:
        """Builds a config from a mapping; unknown keys raise ``ValueError``."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown EmbedderConfig keys {unknown}; valid keys: {valid}")
        d = dict(d)
        for key in ("text", "image"):
            if key in d:
                d[key] = dict(d[key] or {})
        return cls(**d)

    @staticmethod
    def text_rows(model: Mapping[str, Any]) -> dict[str, Any]:
        """How the task must build token rows for ``model`` (a ``config.model`` dict):
        ``TextTokenizer``'s ``pad_with=-1`` and, for last-token pooling, ``append_eos``."""
        return {"pad_with": -1, "append_eos": model.get("pooling") == "last_token"}

    @classmethod
    def schema(cls, model: Mapping[str, Any]) -> dict[str, Any]:
        """The ``config.model`` keys of ``model``'s towers: the embedder's defaults with
        ``text`` / ``image`` holding every field of the towers it names."""
        out = {"name": "embedder", **dataclasses.asdict(cls())}
        out["text"] = tower_defaults(model.get("text_tower", cls.text_tower))
        out["image"] = tower_defaults(model.get("image_tower", cls.image_tower), image=True)
        return out

    def _tower(self, cls: type | None, fields: Mapping[str, Any], what: str) -> Any:
        if cls is None:
            return None
        runtime = {k: getattr(self, k) for k in RUNTIME}
        extra = _tower_runtime(cls, runtime)
        if what == "text" and cls is llama.LlamaConfig:
            if "causal" in {f.name for f in dataclasses.fields(cls)}:
                extra["causal"] = self.causal
            elif not self.causal:
                raise ValueError("EmbedderConfig.causal=False: this LlamaConfig has no "
                                 "bidirectional mode (no `causal` field).")
        tower = self.text_tower if what == "text" else self.image_tower
        try:
            return cls.from_dict({**dict(fields), **extra})
        except ValueError as e:
            raise ValueError(f"EmbedderConfig.{what} (the {tower} tower): {e}") from None

    @property
    def text_config(self) -> Any:
        """The text tower's config (its family's config class)."""
        return self._tower(TEXT_TOWERS[self.text_tower], self.text, "text")

    @property
    def image_config(self) -> Any:
        """The image tower's config, or None (``image_tower='none'``)."""
        return self._tower(IMAGE_TOWERS[self.image_tower], self.image, "image")

    @property
    def text_width(self) -> int:
        t = self.text_config
        return {"clip": lambda: t.text_width, "siglip": lambda: t.vision_width}.get(
            self.text_tower, lambda: t.hidden_size)()

    @property
    def image_width(self) -> int:
        return 0 if self.image_config is None else self.image_config.vision_width

    @property
    def output_dim(self) -> int:
        """Width of the embeddings."""
        return self.embed_dim or self.text_width

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def image_size(self) -> int:
        return 0 if self.image_config is None else self.image_config.image_size

    @property
    def channels(self) -> int:
        return 3 if self.image_config is None else self.image_config.channels

    @property
    def compute_dtype(self) -> Any:
        return clip.DTYPES[self.dtype]


class ClipTextHidden(nn.Module):
    """CLIP's text tower without its pooling: the final-LayerNorm states [B, T, D] (parameter
    tree as :class:`jaxtrain.models.clip.TextTransformer`, CLIPModel's ``text_model``), causal,
    with the padding ``mask`` hidden from attention."""

    config: clip.ClipConfig

    @nn.compact
    def __call__(self, tokens: Array, mask: Array) -> Array:
        cfg = self.config
        x = clip.TextEmbeddings(cfg, name="embeddings")(tokens)
        x = Encoder(num_layers=cfg.text_layers, num_heads=cfg.text_heads,
                    head_dim=cfg.text_width // cfg.text_heads,
                    mlp_hidden=int(round(cfg.text_width * cfg.text_mlp_ratio)),
                    dtype=cfg.compute_dtype, activation=cfg.activation,
                    attention_impl=cfg.attention_impl, remat=cfg.remat,
                    layer_norm_eps=cfg.layer_norm_eps, name="encoder")(x, mask, causal=True)
        return layer_norm("final_layer_norm", cfg.compute_dtype,
                          epsilon=cfg.layer_norm_eps)(x)


class Embedder(nn.Module):
    """The ``DUAL_ENCODER`` contract (as :class:`jaxtrain.models.clip.CLIP`): ``encode_text``
    (token rows padded with -1 -> unnormalised ``[B, E]``), ``encode_image``, ``scalars`` and
    ``__call__(images, tokens)`` -> normalised ``image_embeds`` / ``text_embeds`` + scalars
    (``images`` may be None without an image tower)."""

    config: EmbedderConfig

    def setup(self) -> None:
        cfg = self.config
        t = cfg.text_config
        if cfg.text_tower == "bert":
            self.text = bert.Bert(t)
        elif cfg.text_tower == "llama":
            self.text = llama.LlamaEncoder(t)
        elif cfg.text_tower == "siglip":
            self.text = siglip.SiglipText(t)
        else:
            self.text = ClipTextHidden(t)
        if cfg.embed_dim:
            self.text_projection = self._projection()
        if cfg.image_tower != "none":
            i = cfg.image_config
            self.image = (siglip.SiglipVision(i) if cfg.image_tower == "siglip"
                          else clip.VisionTransformer(i))
            if cfg.embed_dim:
                self.image_projection = self._projection()
        self.logit_scale = self.param(
            "logit_scale",
            partitioned(nn.initializers.constant(math.log(1.0 / cfg.init_temperature)), ()),
            (), jnp.float32)
        if cfg.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", partitioned(nn.initializers.constant(cfg.logit_bias_init), ()),
                (), jnp.float32)

    def _projection(self) -> nn.Dense:
        return nn.Dense(self.config.embed_dim, use_bias=False, dtype=self.config.compute_dtype,
                        param_dtype=jnp.float32,
                        kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", None)))

    def text_hidden(self, tokens: Array) -> tuple[Array, Array]:
        """(hidden [B, T, D], mask [B, T]) of token rows padded with -1."""
        mask = tokens >= 0
        ids = jnp.maximum(tokens, 0).astype(jnp.int32)
        if self.config.text_tower == "siglip":
            return self.text.hidden(ids, mask), mask
        return self.text(ids, mask), mask

    def encode_text(self, tokens: Array) -> Array:
        """Token rows ``[B, T]`` (padded with -1) -> unnormalised embeddings ``[B, E]``."""
        if tokens.shape[1] > self.config.text_max_len:
            raise ValueError(f"token length {tokens.shape[1]} exceeds the embedder's "
                             f"text_max_len ({self.config.text_max_len})")
        hidden, mask = self.text_hidden(tokens)
        e = pool(hidden, mask, self.config.pooling)
        if self.config.text_tower == "siglip":  # SigLIP's text head (Dense) after pooling
            e = self.text.head(e)
        if self.config.embed_dim:
            e = self.text_projection(e)
        return e.astype(jnp.float32)

    def encode_image(self, images: Array) -> Array:
        """Images ``[B, H, W, C]`` -> unnormalised embeddings ``[B, E]``."""
        if self.config.image_tower == "none":
            raise ValueError("This embedder has no image tower (model.image_tower='none'): "
                             "set model.image_tower to 'clip' or 'siglip' for image modes.")
        e = self.image(images)
        if self.config.embed_dim:
            e = self.image_projection(e)
        return e.astype(jnp.float32)

    def scalars(self) -> dict[str, Array]:
        """The loss's learnable scalars: ``logit_scale`` (+ ``logit_bias`` if configured)."""
        out = {"logit_scale": jnp.asarray(self.logit_scale, jnp.float32)}
        if self.config.logit_bias_init is not None:
            out["logit_bias"] = jnp.asarray(self.logit_bias, jnp.float32)
        return out

    def __call__(self, images: Array | None, tokens: Array) -> dict[str, Array]:
        out = {"text_embeds": l2_normalize(self.encode_text(tokens)), **self.scalars()}
        if images is not None:
            out["image_embeds"] = l2_normalize(self.encode_image(images))
        return out


def init_params(cfg: EmbedderConfig, rng: Array) -> Any:
    """Boxed (logically partitioned) parameters of a fresh model."""
    tokens = jnp.zeros((1, cfg.text_max_len), jnp.int32)
    images = None
    if cfg.image_tower != "none":
        images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return Embedder(cfg).init(rng, images, tokens)["params"]


def inference_inputs(cfg: EmbedderConfig, batch_size: int,
                     seq_len: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """``text`` int32 [B, seq_len or text_max_len] (padded with -1) and, with an image tower,
    ``image`` float32 [B, S, S, C] (preprocessed)."""
    t = seq_len or cfg.text_max_len
    out = {"text": jax.ShapeDtypeStruct((batch_size, t), jnp.int32)}
    if cfg.image_tower != "none":
        out["image"] = jax.ShapeDtypeStruct(
            (batch_size, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return out


def inference(cfg: EmbedderConfig, params: Any, inputs: dict[str, Array]) -> dict[str, Array]:
    """``text_embeds`` [B, E] (and ``image_embeds``), L2-normalised when ``cfg.normalize``."""
    model = Embedder(cfg)
    norm = l2_normalize if cfg.normalize else (lambda x: x)
    out = {"text_embeds": norm(model.apply({"params": params}, inputs["text"],
                                           method="encode_text"))}
    if "image" in inputs:
        out["image_embeds"] = norm(model.apply({"params": params}, inputs["image"],
                                               method="encode_image"))
    return out


FAMILY = ModelFamily(
    name="embedder",
    kind=DUAL_ENCODER,
    title="embedder",
    config_cls=EmbedderConfig,
    module=Embedder,
    init=init_params,
    inference_inputs=inference_inputs,
    inference=inference,
    # With init_from a Hugging Face directory gives the towers; the run's config how to use them.
    runtime_fields=RUNTIME + ("pooling", "causal", "text_max_len", "embed_dim", "normalize",
                              "init_temperature", "max_logit_scale", "logit_bias_init"),
    hf_module="jaxtrain.hf.embedder",
    hf_towers=("bert", "llama", "clip", "siglip"),
    data_keys=("tokenizer", "image_mean", "image_std"),
)
