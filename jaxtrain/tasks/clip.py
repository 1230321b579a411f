"""Contrastive dual-encoder training (CLIP / SigLIP, image–text and text–text retrieval).

One task, chosen by config:
* ``contrastive.mode``: what the queries and positives are — ``i2t`` (image -> text), ``t2i``,
  ``t2t`` (query/positive text pairs), ``i2i``; ``contrastive.num_negatives`` hard negatives
  per row (of the positive's modality) join the candidates.
* ``contrastive.unified_encoder`` (t2t / i2i): queries, positives and negatives go through the
  one tower in a single concatenated forward pass.
* ``contrastive.loss``: ``infonce`` (symmetric InfoNCE, learnable temperature) or ``siglip``
  (pairwise sigmoid, learnable temperature and bias); ``contrastive.local_loss`` computes it
  under ``jax.shard_map`` (each device scores its queries against all gathered keys).
  Negatives always come from the whole global batch.
* ``train.use_gradient_cache``: embed ``train.gradient_cache_chunk_size`` rows at a time and
  back-propagate chunk by chunk (:mod:`jaxtrain.grad_cache`): batches larger than memory,
  exact gradients.
* ``distill.teacher``: a frozen teacher dual encoder (a jaxtrain CLIP workdir or a Hugging Face
  CLIP directory); loss = ``alpha · distill_KL + (1 − alpha) · contrastive``.
* ``init_from``: start from a Hugging Face ``CLIPModel`` directory (its weights, tokenizer and
  image preprocessing) or a jaxtrain CLIP workdir.
* ``model.name``: any ``DUAL_ENCODER`` family: ``clip``, ``siglip``, or ``embedder`` (towers from
  the registry, :mod:`jaxtrain.models.embedder`: its token rows are -1 padded, eos-ended for
  last-token pooling, and on built-in data its tower's offline tokenizer is used);
  ``contrastive.query_prefix`` / ``positive_prefix`` go before every query / positive and
  negative text (training rows and :meth:`ClipTask.tokenize_texts` alike).

Evaluators (``config.evals``): ``retrieval`` (recall@1/5/10 in both directions and mean rank on
the held-out pairs) and ``zero_shot`` (classification accuracy on a labelled image set); see
:mod:`jaxtrain.evaluators`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from jaxtrain.config import ConfigError, base_config
from jaxtrain.data import pair_config, pair_rows
from jaxtrain.data.pair_config import PAIR_MODES
from jaxtrain.data.shapes import MIN_IMAGE_SIZE, CaptionTokenizer
from jaxtrain.data.tokenizers import BUILTIN_TOKENIZER, SHAPES_WORDPIECE
from jaxtrain.evaluators import eval_config
from jaxtrain.grad_cache import gradient_cache
from jaxtrain.losses import contrastive
from jaxtrain.models.layers import l2_normalize
from jaxtrain.models.registry import DUAL_ENCODER, get_model, model_schema
from jaxtrain.task import Task
from jaxtrain.weights import load_pretrained

LOSSES = ("infonce", "siglip")
SIGLIP_DEFAULTS = {"logit_bias_init": -10.0, "init_temperature": 0.1}  # Zhai et al. 2023
# The `embedder` family's text towers on the built-in shapes data with data.tokenizer='': the
# offline tokenizer each reads (the caption vocabulary is the CLIP tower's).
SHAPES_TOKENIZERS = {"bert": SHAPES_WORDPIECE, "llama": BUILTIN_TOKENIZER}


def normalize_images(images: jax.Array, mean, std, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 images ``[..., 3]`` -> ``((x / 255 - mean) / std)`` per channel, in float32, then
    cast to ``dtype``: ``transformers``' ``CLIPImageProcessor`` rescale + normalise, done on the
    accelerator inside the jitted step (XLA fuses it into the first layer's input), so rows
    cross the host, the worker hop and the host-to-device copy as uint8 (4x less than float32).
    Equals :func:`jaxtrain.data.images.normalize` to float32 rounding (``x / 255`` is rounded
    from float32 here, from float64 there: <= 1 ulp before the division by ``std``)."""
    x = images.astype(jnp.float32) * jnp.float32(1 / 255)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


class ClipTask(Task):
    name = "clip"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = base_config()
        c.task = cls.name
        model = get_model("clip").default_config()  # model.name: any dual encoder family
        model["vocab_size"] = CaptionTokenizer().vocab_size
        model["attention_impl"] = config_dict.placeholder(str)
        model["logit_bias_init"] = config_dict.placeholder(float)
        model["eos_token_id"] = config_dict.placeholder(int)
        c.model = ml_collections.ConfigDict(model)
        c.init_from = ""  # a Hugging Face CLIP directory or a jaxtrain CLIP workdir
        c.data = pair_config.default_data_config()
        c.contrastive = ml_collections.ConfigDict(dict(
            mode="i2t",  # 'i2t' | 't2i' | 't2t' | 'i2i': the query / positive modalities
            loss="infonce",  # 'infonce' | 'siglip'
            symmetric=True,  # infonce: also the positive -> query direction
            num_negatives=0,  # hard negatives per row, from the data
            unified_encoder=False,  # t2t / i2i: one forward pass over queries + positives
            local_loss=False,  # jax.shard_map loss: each device scores only its own queries
            query_prefix="",  # put before every query text (e.g. 'query: ', an instruction)
            positive_prefix="",  # put before every positive and negative text ('passage: ')
        ))
        c.train.use_gradient_cache = False
        c.train.gradient_cache_chunk_size = 0  # rows embedded at a time (divides the batch)
        c.distill = ml_collections.ConfigDict(dict(teacher="", alpha=0.5, temperature=1.0))
        c.eval.batch_size = 128
        c.evals.retrieval = eval_config("retrieval")  # eval/retrieval/i2t/recall@1, ...
        c.evals.zero_shot = eval_config("zero_shot")  # eval/zero_shot/accuracy
        return c

    @classmethod
    def schema(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The defaults, with the `model` keys of the family `model.name` names."""
        c = cls.default_config()
        model = model_schema(c.model, config.model, DUAL_ENCODER)
        family_schema = getattr(get_model(model["name"]).config_cls, "schema", None)
        if family_schema is not None:  # nested tower blocks (embedder: model.text, model.image)
            model = family_schema(config.model.to_dict())
        c.model = ml_collections.ConfigDict(model)
        return c

    @classmethod
    def config_rules(cls):
        return [
            *pair_config.data_config_rules(),
            ("contrastive.mode", lambda v: v in PAIR_MODES, f"must be one of {tuple(PAIR_MODES)}"),
            ("contrastive.loss", lambda v: v in LOSSES, f"must be one of {LOSSES}"),
            ("contrastive.num_negatives", lambda v: v >= 0, "must be >= 0"),
            ("train.gradient_cache_chunk_size", lambda v: v >= 0,
             "must be >= 0 (rows per chunk; 0 = the whole microbatch)"),
            ("distill.alpha", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
            ("distill.temperature", lambda v: v > 0, "must be > 0"),
        ]

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        c = config.contrastive
        self.query_modality, self.positive_modality = PAIR_MODES[c.mode]
        if c.unified_encoder and self.query_modality != self.positive_modality:
            raise ConfigError(
                f"contrastive.unified_encoder needs queries and positives of one modality "
                f"(mode 't2t' or 'i2i'); mode {c.mode!r} pairs {self.query_modality} with "
                f"{self.positive_modality}, which go through different towers.")
        self.family = get_model(config.model.name, kind=DUAL_ENCODER)
        model = config.model.to_dict()
        data_overrides: dict = {}
        self._init_weights = None
        if config.init_from:  # the weights give the model its shape; the config how to run it
            shape_cfg, self._init_weights, data_overrides = load_pretrained(
                config.init_from, self.family, "init_from")
            model = {**dataclasses.asdict(shape_cfg),
                     **{k: model[k] for k in self.family.runtime_fields}}
        if c.loss == "siglip" and model.get("logit_bias_init") is None:
            # SigLIP's learnable bias (and its starting temperature, unless one is set).
            model["logit_bias_init"] = SIGLIP_DEFAULTS["logit_bias_init"]
            if model["init_temperature"] == self.family.config_cls.init_temperature:
                model["init_temperature"] = SIGLIP_DEFAULTS["init_temperature"]
        self.data_config = self._data_config(data_overrides)
        self._builtin_tokenizer(model)
        self.tokenizer = pair_rows.load_text_tokenizer(self.data_config,
                                                       **self._text_rows(model))
        if self.data_config.tokenizer and model.get("text_pooling") == "last" and \
                self.tokenizer.eos_id != 2:
            # A Hugging Face tokenizer pads with its own id (often its EOS), not 0: pool at the
            # first EOS, as transformers' CLIP does (and so the model exports to its format).
            model.update(text_pooling="eos", eos_token_id=self.tokenizer.eos_id)
        self.model_config = self.family.config(model)
        self.model = self.family.module(self.model_config)
        if "image" in (self.query_modality, self.positive_modality) and \
                not self.model_config.image_size:
            raise ConfigError(
                f"contrastive.mode {c.mode!r} embeds images, but the model has no image tower "
                "(model.image_tower='none'): set model.image_tower ('clip' or 'siglip') and "
                "model.image, or use mode 't2t'.")
        self._check_vocab()
        self._check_gradient_cache()
        self._train_part: tuple | None = None  # (seed, build_rows of the training part)

        self.teacher_config = None
        self._teacher_weights = None
        if config.distill.teacher:
            t_cfg, self._teacher_weights, t_data = load_pretrained(
                config.distill.teacher, self.family, "distill.teacher")
            runtime = {k: getattr(self.model_config, k) for k in self.family.runtime_fields}
            self.teacher_config = dataclasses.replace(t_cfg, **runtime)
            self._check_teacher(t_data)
            self.teacher = self.family.module(self.teacher_config)

    # ------------------------------------------------------------------ config checks

    def _data_config(self, overrides: dict) -> ml_collections.ConfigDict:
        """`config.data` with what pretrained weights imply (their tokenizer, their image
        normalisation) filled in where the config leaves the default."""
        d = ml_collections.ConfigDict(self.config.data.to_dict())
        defaults = pair_config.default_data_config()
        for key, value in overrides.items():
            if key in d and d[key] == defaults[key] and value != d[key]:
                logging.info("data.%s = %r (from %s)", key, value, self.config.init_from)
                d[key] = value
        return d

    def _builtin_tokenizer(self, model: dict) -> None:
        """The built-in shapes data with ``data.tokenizer=''`` and a text tower that cannot read
        the caption vocabulary's ids: that tower's offline tokenizer (:data:`SHAPES_TOKENIZERS`:
        BERT WordPiece of the caption words, GPT-2 BPE for decoders)."""
        d = self.data_config
        name = SHAPES_TOKENIZERS.get(model.get("text_tower", ""))
        if name and d.tokenizer == "" and d.name == pair_config.SHAPES:
            logging.info("data.tokenizer = %r (the %s tower on built-in data)", name,
                         model["text_tower"])
            d.tokenizer = name

    def _text_rows(self, model: dict) -> dict:
        """How the family wants its token rows (``TextTokenizer``'s ``pad_with``,
        ``append_eos``): ``config_cls.text_rows(model)`` where the family defines it (the
        ``embedder``: -1 padding, an eos for last-token pooling), else the tokenizer's own."""
        text_rows = getattr(self.family.config_cls, "text_rows", None)
        return dict(text_rows(model)) if text_rows is not None else {}

    @property
    def prefixes(self) -> dict[str, str]:
        """role -> the instruction prefix of its texts (negatives take the positive's)."""
        c = self.config.contrastive
        return {"query": c.query_prefix, "positive": c.positive_prefix,
                "negatives": c.positive_prefix}

    def tokenize_texts(self, texts, role: str) -> np.ndarray:
        """int32 ``[N, text_max_len]`` token rows of ``texts`` as the training rows of ``role``
        have them ('query': ``contrastive.query_prefix`` first; 'positive': ``positive_prefix``):
        the same tokenizer, padding and eos. Feed them to :meth:`encode` (modality 'text')."""
        if role not in ("query", "positive"):
            raise ValueError(f"tokenize_texts: role must be 'query' or 'positive'; got {role!r}.")
        prefix, max_len = self.prefixes[role], self.model_config.text_max_len
        rows = [self.tokenizer.encode(prefix + text, max_len) for text in texts]
        return np.stack(rows) if rows else np.zeros((0, max_len), np.int32)

    @property
    def microbatch(self) -> int:
        """Rows the gradient function sees at once: the batch over `train.accum_steps`."""
        return self.config.train.batch_size // self.config.train.accum_steps

    def _check_gradient_cache(self) -> None:
        chunk, micro = self.config.train.gradient_cache_chunk_size, self.microbatch
        if self.config.train.use_gradient_cache and chunk and micro % chunk:
            raise ConfigError(
                f"train.gradient_cache_chunk_size ({chunk}) must divide the microbatch, "
                f"train.batch_size / train.accum_steps = {micro}: choose a divisor of {micro} "
                "(0 = the whole microbatch).")

    def _check_vocab(self) -> None:
        size = self.tokenizer.vocab_size
        if not self.data_config.tokenizer:
            shortest = CaptionTokenizer().min_max_len
            if self.model_config.text_max_len < shortest:
                raise ConfigError(
                    f"model.text_max_len ({self.model_config.text_max_len}) is shorter than the "
                    f"longest built-in caption ({shortest} tokens): set it >= {shortest}.")
        if size > self.model_config.vocab_size:
            raise ConfigError(
                f"The tokenizer ({self.data_config.tokenizer or 'built-in captions'}) has {size} "
                f"tokens but model.vocab_size is {self.model_config.vocab_size}: set "
                f"model.vocab_size >= {size}.")

    def _check_teacher(self, teacher_data: dict) -> None:
        t, s, path = self.teacher_config, self.model_config, self.config.distill.teacher
        problems = []
        if (t.image_size, t.channels) != (s.image_size, s.channels):
            problems.append(f"image size {t.image_size}x{t.channels}ch vs the student's "
                            f"{s.image_size}x{s.channels}ch")
        if t.text_max_len < s.text_max_len:
            problems.append(f"text_max_len {t.text_max_len} < the student's {s.text_max_len}")
        tok = teacher_data.get("tokenizer")
        if tok is not None and tok != self.data_config.tokenizer:
            problems.append(f"tokenizer {tok or 'built-in captions'!r} vs the student's "
                            f"{self.data_config.tokenizer or 'built-in captions'!r}")
        if self.tokenizer.vocab_size > t.vocab_size:
            problems.append(f"vocab_size {t.vocab_size} is smaller than the data's tokenizer")
        if problems:
            raise ConfigError(
                f"distill.teacher {path!r} cannot score this student's inputs: "
                + "; ".join(problems) + ". The teacher must read the same images and tokens "
                "(train the teacher with the same data settings, or change the student's).")

    # ------------------------------------------------------------------ model

    def init_params(self, rng: jax.Array) -> Any:
        return self.family.init(self.model_config, rng)

    def init_frozen(self, rng: jax.Array) -> Any:
        if self.teacher_config is None:
            return {}
        return {"teacher": self.family.init(self.teacher_config, rng)}

    def pretrained(self) -> dict[str, Any]:
        weights = {}
        if self._init_weights is not None:
            weights["params"] = self._init_weights
        if self._teacher_weights is not None:
            weights["frozen"] = {"teacher": self._teacher_weights}
        return weights

    def _encode(self, model: nn.Module, params, modality: str, x: jax.Array) -> jax.Array:
        """L2-normalised embeddings of images [N, H, W, C] or token ids [N, T]. uint8 images
        (the data's rows) are normalised here, on device (:func:`normalize_images` with
        ``data.image_mean`` / ``image_std``, cast to the tower's compute dtype); float images
        are taken as already normalised (export, inference, generated data)."""
        if modality == "image" and x.dtype == jnp.uint8:
            d = self.data_config
            dtype = getattr(getattr(model, "config", None), "compute_dtype", jnp.float32)
            x = normalize_images(x, d.image_mean, d.image_std, dtype)
        method = "encode_image" if modality == "image" else "encode_text"
        return l2_normalize(model.apply({"params": params}, x, method=method))

    def _embed(self, model: nn.Module, params, batch: dict) -> dict[str, jax.Array]:
        """{"query": [B, D], "positive": [B, D], "negatives": [B, N, D] (if any)}."""
        q_mod, p_mod = self.query_modality, self.positive_modality
        negatives = batch.get("negatives")
        if self.config.contrastive.unified_encoder:
            parts = [batch["query"], batch["positive"]]
            if negatives is not None:
                parts.append(negatives.reshape(-1, *negatives.shape[2:]))
            out = self._encode(model, params, q_mod, jnp.concatenate(parts))
            rows = batch["query"].shape[0]
            embeds = {"query": out[:rows], "positive": out[rows:2 * rows]}
            if negatives is not None:
                embeds["negatives"] = out[2 * rows:].reshape(*negatives.shape[:2], -1)
            return embeds
        embeds = {"query": self._encode(model, params, q_mod, batch["query"]),
                  "positive": self._encode(model, params, p_mod, batch["positive"])}
        if negatives is not None:
            flat = self._encode(model, params, p_mod, negatives.reshape(-1, *negatives.shape[2:]))
            embeds["negatives"] = flat.reshape(*negatives.shape[:2], -1)
        return embeds

    def _teacher_embed(self, batch: dict, frozen) -> dict[str, jax.Array] | None:
        if self.teacher_config is None:
            return None
        teacher = jax.lax.stop_gradient(frozen["teacher"])
        return {"query": self._encode(self.teacher, teacher, self.query_modality,
                                      batch["query"]),
                "positive": self._encode(self.teacher, teacher, self.positive_modality,
                                         batch["positive"])}

    def _scalars(self, params) -> dict[str, jax.Array]:
        return self.model.apply({"params": params}, method="scalars")

    def _contrastive(self, q, p, scalars, negatives=None, mesh=None):
        """The configured contrastive loss (`contrastive.loss`, `local_loss`): the one place
        that selects it. `scalars`: the model's logit scale (and SigLIP's bias)."""
        c, m = self.config.contrastive, self.model_config
        sharded = {} if mesh is None else {"mesh": mesh}
        if c.loss == "siglip":
            fn = contrastive.sharded_siglip_loss if mesh is not None else contrastive.siglip_loss
            return fn(q, p, scalars["logit_scale"], scalars["logit_bias"],
                      hard_negatives=negatives, max_logit_scale=m.max_logit_scale, **sharded)
        fn = contrastive.sharded_info_nce_loss if mesh is not None else \
            contrastive.info_nce_loss
        return fn(q, p, scalars["logit_scale"], m.max_logit_scale, hard_negatives=negatives,
                  symmetric=c.symmetric, **sharded)

    def _loss(self, params, embeds, teacher, frozen, mesh=None):
        """The loss of a batch's embeddings (contrastive, mixed with distillation)."""
        m = self.model_config
        s = self._scalars(params)
        q, p = embeds["query"], embeds["positive"]
        loss, metrics = self._contrastive(q, p, s, embeds.get("negatives"), mesh)
        if teacher is not None:
            d = self.config.distill
            t_scale = frozen["teacher"]["logit_scale"]
            kl, kl_metrics = contrastive.embedding_distillation_loss(
                q, p, teacher["query"], teacher["positive"], s["logit_scale"],
                jax.lax.stop_gradient(t_scale), temperature=d.temperature,
                max_logit_scale=m.max_logit_scale)
            metrics["contrastive_loss"] = loss
            metrics.update({f"distill/{k}": v for k, v in kl_metrics.items()})
            loss = d.alpha * kl + (1.0 - d.alpha) * loss
        metrics["loss"] = loss
        return loss, metrics

    def loss_fn(self, params, batch, rng, frozen):
        embeds = self._embed(self.model, params, batch)
        return self._loss(params, embeds, self._teacher_embed(batch, frozen), frozen)

    def grad_fn(self, mesh, full_params=None):
        """The gradient cache and/or the shard_map loss when configured; else the default."""
        c, t = self.config.contrastive, self.config.train
        if not (t.use_gradient_cache or c.local_loss):
            return None
        full = full_params or (lambda params, frozen, rng: params)
        loss_mesh = mesh if c.local_loss else None

        def embed_fn(params, batch, rng, frozen):
            return self._embed(self.model, full(params, frozen, rng), batch)

        def loss_fn(params, embeds, teacher, rng, frozen):
            return self._loss(full(params, frozen, rng), embeds, teacher, frozen, loss_mesh)

        if t.use_gradient_cache:
            chunk = t.gradient_cache_chunk_size or self.microbatch
            return gradient_cache(embed_fn, loss_fn, chunk, mesh=mesh,
                                  aux_fn=self._teacher_embed if self.teacher_config else None)

        def plain(params, batch, rng, frozen):
            def total(p):
                embeds = embed_fn(p, batch, rng, frozen)
                return loss_fn(p, embeds, self._teacher_embed(batch, frozen), rng, frozen)

            (loss, metrics), grads = jax.value_and_grad(total, has_aux=True)(params)
            return loss, metrics, grads

        return plain

    # ------------------------------------------------------------------ data

    def _data_kwargs(self) -> dict:
        m = self.model_config
        return dict(mode=self.config.contrastive.mode,
                    num_negatives=self.config.contrastive.num_negatives,
                    # a model without an image tower (image_size 0) reads no images; the
                    # built-in data still renders them at the smallest size
                    image_size=m.image_size or MIN_IMAGE_SIZE, text_max_len=m.text_max_len,
                    tokenizer=self.tokenizer, prefixes=self.prefixes)

    def _train_rows(self, seed: int) -> tuple:
        """The training part's (raw rows, preparer) for `seed` (loaded and checked once)."""
        if self._train_part is None or self._train_part[0] != seed:
            built = pair_rows.build_rows(self.data_config, which="train", seed=seed,
                                         **self._data_kwargs())
            self._train_part = (seed, built)
        return self._train_part[1]

    def num_train_examples(self) -> int:
        """Training pairs per epoch, over all hosts: the training part's rows after the
        hold-out, ``data.max_train_examples`` and bad rows dropped."""
        return len(self._train_rows(self.config.seed)[0])

    def train_iterator(self, *, seed, batch_size, process_index, process_count):
        return pair_rows.train_iterator(
            self.data_config, seed=seed, batch_size=batch_size, process_index=process_index,
            process_count=process_count, built=self._train_rows(seed), **self._data_kwargs())

    def heldout_batches(self, *, batch_size, process_index, process_count, source=""):
        """The held-out pairs (`data.*`), or every pair of the dataset `source`."""
        d = self.data_config
        if source:
            d = ml_collections.ConfigDict(d.to_dict())
            d.name, d.eval_split = source, d.split  # its `data.split`, read whole
        return pair_rows.eval_batches(d, seed=self.config.seed, batch_size=batch_size,
                                      process_index=process_index,
                                      process_count=process_count, **self._data_kwargs())

    def encode(self, params, modality: str, x: jax.Array) -> jax.Array:
        """L2-normalised embeddings of images [N, H, W, C] or token ids [N, T]."""
        return self._encode(self.model, params, modality, x)

    def pair_outputs(self, params, batch) -> dict[str, jax.Array]:
        """Per pair: query and positive embeddings, and the model's logit scale (and bias)."""
        embeds = self._embed(self.model, params, {k: batch[k] for k in ("query", "positive")})
        rows = embeds["query"].shape[0]
        return {**embeds, **{k: jnp.broadcast_to(v, (rows,))
                             for k, v in self._scalars(params).items()}}

    @property
    def retrieval_names(self) -> tuple[str, str]:
        """The two retrieval directions' names: query->positive first."""
        return {"i2t": ("i2t", "t2i"), "t2i": ("t2i", "i2t")}.get(self.config.contrastive.mode,
                                                                  ("q2p", "p2q"))

    def pair_loss(self, outputs) -> float:
        """The run's contrastive loss over all the pairs of `outputs` as one batch."""
        scalars = {k: outputs[k][0] for k in ("logit_scale", "logit_bias") if k in outputs}
        return float(self._contrastive(outputs["query"], outputs["positive"], scalars)[0])

    # ------------------------------------------------------------------ export

    def inference_inputs(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """``image`` float32 [B, H, W, C] (preprocessed) and ``text`` int32 [B, text_max_len]."""
        return self.family.inference_inputs(self.model_config, batch_size)

    def inference(self, params, frozen, inputs):
        """L2-normalised ``image_embeds`` / ``text_embeds`` of preprocessed images, token ids."""
        return self.family.inference(self.model_config, params, inputs)
