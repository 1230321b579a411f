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

Eval: recall@1/5/10 in both directions and mean rank on the held-out pairs, and zero-shot
classification accuracy on a labelled image set (``data.zero_shot``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from jaxtrain.config import ConfigError, base_config
from jaxtrain.data import pairs, pipeline
from jaxtrain.data.shapes import PAIR_MODES, CaptionTokenizer
from jaxtrain.grad_cache import gradient_cache
from jaxtrain.losses import contrastive
from jaxtrain.metrics.retrieval import retrieval_metrics
from jaxtrain.models.clip import CLIP, ClipConfig, l2_normalize
from jaxtrain.tasks.base import Task

LOSSES = ("infonce", "siglip")
# ClipConfig fields that say how to run a model rather than what it is: kept from the config
# when the model's shape comes from elsewhere (init_from, a teacher).
RUNTIME_FIELDS = ("dtype", "remat", "attention_impl")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
SIGLIP_DEFAULTS = {"logit_bias_init": -10.0, "init_temperature": 0.1}  # Zhai et al. 2023


def model_config(d: dict) -> ClipConfig:
    try:
        return ClipConfig.from_dict(d)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(
        os.path.join(path, "checkpoints"))


def load_weights(path: str, what: str) -> tuple[ClipConfig, Any, dict]:
    """(model config, params as numpy, data settings the weights imply) from a Hugging Face
    CLIP directory or a jaxtrain CLIP workdir. `what` names the config key, for errors."""
    if not os.path.exists(path):
        raise ConfigError(
            f"{what} {path!r} does not exist: give a jaxtrain CLIP workdir (runs/clip is what "
            "`python -m jaxtrain.main --config=configs/clip.py` writes) or a Hugging Face CLIP "
            "directory (config.json + model.safetensors).")
    if _is_hf_dir(path):
        from jaxtrain.hf import clip as hf_clip

        cfg, params = hf_clip.load_hf(path)
        data = {}
        if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            data["tokenizer"] = path
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            data.update(hf_clip.image_preprocessing_from_hf(path))
        return cfg, params, data
    from jaxtrain.checkpoint import read_params

    try:
        saved, params = read_params(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {path!r}: {e}") from None
    if saved.get("task") != ClipTask.name:
        raise ConfigError(f"{what} {path!r} holds a {saved.get('task')!r} run, not a CLIP "
                          "dual encoder (task 'clip').")
    saved_data = saved.get("data", {})
    data = {k: saved_data[k] for k in ("tokenizer", "image_mean", "image_std") if k in saved_data}
    return model_config(saved["model"]), params, data


class ClipTask(Task):
    name = "clip"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = base_config()
        c.task = cls.name
        model = dataclasses.asdict(ClipConfig(vocab_size=CaptionTokenizer().vocab_size))
        model["attention_impl"] = config_dict.placeholder(str)
        model["logit_bias_init"] = config_dict.placeholder(float)
        model["eos_token_id"] = config_dict.placeholder(int)
        c.model = ml_collections.ConfigDict(model)
        c.init_from = ""  # a Hugging Face CLIP directory or a jaxtrain CLIP workdir
        c.data = pairs.default_data_config()
        c.contrastive = ml_collections.ConfigDict(dict(
            mode="i2t",  # 'i2t' | 't2i' | 't2t' | 'i2i': the query / positive modalities
            loss="infonce",  # 'infonce' | 'siglip'
            symmetric=True,  # infonce: also the positive -> query direction
            num_negatives=0,  # hard negatives per row, from the data
            unified_encoder=False,  # t2t / i2i: one forward pass over queries + positives
            local_loss=False,  # jax.shard_map loss: each device scores only its own queries
        ))
        c.train.use_gradient_cache = False
        c.train.gradient_cache_chunk_size = 0  # rows embedded at a time (divides the batch)
        c.distill = ml_collections.ConfigDict(dict(teacher="", alpha=0.5, temperature=1.0))
        c.eval.batch_size = 128
        return c

    @classmethod
    def config_rules(cls):
        return [
            *pairs.data_config_rules(),
            ("contrastive.mode", lambda v: v in pairs.MODES, f"must be one of {pairs.MODES}"),
            ("contrastive.loss", lambda v: v in LOSSES, f"must be one of {LOSSES}"),
            ("contrastive.num_negatives", lambda v: v >= 0, "must be >= 0"),
            ("train.gradient_cache_chunk_size", lambda v: v >= 0,
             "must be >= 0 (rows per chunk; 0 = the whole batch)"),
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
        model = config.model.to_dict()
        data_overrides: dict = {}
        self._init_weights = None
        if config.init_from:
            shape_cfg, self._init_weights, data_overrides = load_weights(
                config.init_from, "init_from")
            model = {**dataclasses.asdict(shape_cfg), **{k: model[k] for k in RUNTIME_FIELDS}}
        if c.loss == "siglip" and model.get("logit_bias_init") is None:
            # SigLIP's learnable bias (and its starting temperature, unless one is set).
            model["logit_bias_init"] = SIGLIP_DEFAULTS["logit_bias_init"]
            if model["init_temperature"] == ClipConfig.init_temperature:
                model["init_temperature"] = SIGLIP_DEFAULTS["init_temperature"]
        self.data_config = self._data_config(data_overrides)
        self.tokenizer = pairs.load_text_tokenizer(self.data_config)
        if self.data_config.tokenizer and model["text_pooling"] == "last" and \
                self.tokenizer.eos_id != 2:
            # A Hugging Face tokenizer pads with its own id (often its EOS), not 0: pool at the
            # first EOS, as transformers' CLIP does (and so the model exports to its format).
            model.update(text_pooling="eos", eos_token_id=self.tokenizer.eos_id)
        self.model_config = model_config(model)
        self.model = CLIP(self.model_config)
        self._check_vocab()

        self.teacher_config = None
        self._teacher_weights = None
        if config.distill.teacher:
            t_cfg, self._teacher_weights, t_data = load_weights(config.distill.teacher,
                                                                "distill.teacher")
            runtime = {k: getattr(self.model_config, k) for k in RUNTIME_FIELDS}
            self.teacher_config = dataclasses.replace(t_cfg, **runtime)
            self._check_teacher(t_data)
            self.teacher = CLIP(self.teacher_config)

    # ------------------------------------------------------------------ config checks

    def _data_config(self, overrides: dict) -> ml_collections.ConfigDict:
        """`config.data` with what pretrained weights imply (their tokenizer, their image
        normalisation) filled in where the config leaves the default."""
        d = ml_collections.ConfigDict(self.config.data.to_dict())
        defaults = pairs.default_data_config()
        for key, value in overrides.items():
            if key in d and d[key] == defaults[key] and value != d[key]:
                logging.info("data.%s = %r (from %s)", key, value, self.config.init_from)
                d[key] = value
        return d

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
        m = self.model_config
        images = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
        tokens = jnp.zeros((1, m.text_max_len), jnp.int32)
        return self.model.init(rng, images, tokens)["params"]

    def init_frozen(self, rng: jax.Array) -> Any:
        if self.teacher_config is None:
            return {}
        t = self.teacher_config
        images = jnp.zeros((1, t.image_size, t.image_size, t.channels), jnp.float32)
        tokens = jnp.zeros((1, t.text_max_len), jnp.int32)
        return {"teacher": self.teacher.init(rng, images, tokens)["params"]}

    def pretrained(self) -> dict[str, Any]:
        weights = {}
        if self._init_weights is not None:
            weights["params"] = self._init_weights
        if self._teacher_weights is not None:
            weights["frozen"] = {"teacher": self._teacher_weights}
        return weights

    def _encode(self, model: CLIP, params, modality: str, x: jax.Array) -> jax.Array:
        """L2-normalised embeddings of images [N, H, W, C] or token ids [N, T]."""
        method = CLIP.encode_image if modality == "image" else CLIP.encode_text
        return l2_normalize(model.apply({"params": params}, x, method=method))

    def _embed(self, model: CLIP, params, batch: dict) -> dict[str, jax.Array]:
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
        return self.model.apply({"params": params}, method=CLIP.scalars)

    def _loss(self, params, embeds, teacher, frozen, mesh=None):
        """The loss of a batch's embeddings (contrastive, mixed with distillation)."""
        c, m = self.config.contrastive, self.model_config
        s = self._scalars(params)
        q, p, negs = embeds["query"], embeds["positive"], embeds.get("negatives")
        sharded = {} if mesh is None else {"mesh": mesh}
        if c.loss == "siglip":
            fn = contrastive.sharded_siglip_loss if mesh is not None else contrastive.siglip_loss
            loss, metrics = fn(q, p, s["logit_scale"], s["logit_bias"], hard_negatives=negs,
                               max_logit_scale=m.max_logit_scale, **sharded)
        else:
            fn = contrastive.sharded_info_nce_loss if mesh is not None else \
                contrastive.info_nce_loss
            loss, metrics = fn(q, p, s["logit_scale"], m.max_logit_scale, hard_negatives=negs,
                               symmetric=c.symmetric, **sharded)
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
            chunk = t.gradient_cache_chunk_size or self.config.train.batch_size
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
                    image_size=m.image_size, text_max_len=m.text_max_len)

    def train_iterator(self, *, seed, batch_size, process_index, process_count):
        return pairs.train_iterator(
            self.data_config, seed=seed, batch_size=batch_size, process_index=process_index,
            process_count=process_count, **self._data_kwargs())

    def eval_batches(self, *, batch_size, process_index, process_count):
        """The held-out pairs (retrieval), then the zero-shot set's images and class prompts."""
        kw = dict(batch_size=batch_size, process_index=process_index,
                  process_count=process_count)
        yield from pairs.eval_batches(self.data_config, seed=self.config.seed, **kw,
                                      **self._data_kwargs())
        zero_shot = self._zero_shot_set()
        if zero_shot is None:
            return
        for b in zero_shot.batches(**kw):
            yield {"zs_image": b["image"], "zs_label": b["label"], "valid": b["valid"]}
        prompts = pipeline.ArrayRows({"zs_prompt": zero_shot.prompts,
                                      "zs_class": np.arange(len(zero_shot.prompts))})
        yield from pipeline.eval_batches(prompts, **kw)

    @functools.cache  # noqa: B019 (one per task; the set is read and its prompts tokenised once)
    def _zero_shot_set(self):
        return pairs.zero_shot_set(self.data_config, image_size=self.model_config.image_size,
                                   text_max_len=self.model_config.text_max_len,
                                   seed=self.config.seed)

    def eval_step(self, params, batch, frozen):
        out = {}
        if "query" in batch:
            embeds = self._embed(self.model, params, {k: batch[k] for k in ("query", "positive")})
            out.update(embeds)
            rows = embeds["query"].shape[0]
            out.update({k: jnp.broadcast_to(v, (rows,)) for k, v in self._scalars(params).items()})
        if "zs_image" in batch:
            out["zs_image"] = self._encode(self.model, params, "image", batch["zs_image"])
            out["zs_label"] = batch["zs_label"]
        if "zs_prompt" in batch:
            prompts = batch["zs_prompt"]  # [rows, templates, T]
            flat = self._encode(self.model, params, "text", prompts.reshape(-1, prompts.shape[-1]))
            out["zs_prompt"] = flat.reshape(*prompts.shape[:2], -1)
            out["zs_class"] = batch["zs_class"]
        return out

    def eval_metrics(self, outputs) -> dict[str, float]:
        c, m = self.config.contrastive, self.model_config
        metrics: dict[str, float] = {}
        if "query" in outputs:
            q, p = outputs["query"], outputs["positive"]
            names = {"i2t": ("i2t", "t2i"), "t2i": ("t2i", "i2t")}.get(c.mode, ("q2p", "p2q"))
            metrics.update(retrieval_metrics(q, p, ks=(1, 5, 10), names=names))
            scale = outputs["logit_scale"][0]
            if c.loss == "siglip":
                loss, _ = contrastive.siglip_loss(q, p, scale, outputs["logit_bias"][0],
                                                  max_logit_scale=m.max_logit_scale)
            else:
                loss, _ = contrastive.info_nce_loss(q, p, scale, m.max_logit_scale,
                                                    symmetric=c.symmetric)
            metrics["loss"] = float(loss)
            metrics["chance_recall@1"] = 1.0 / len(q)
        if "zs_image" in outputs:
            order = np.argsort(outputs["zs_class"])  # hosts interleave rows
            metrics.update(zero_shot_metrics(outputs["zs_image"], outputs["zs_label"],
                                             outputs["zs_prompt"][order]))
        return {k: float(np.asarray(v)) for k, v in metrics.items()}

    # ------------------------------------------------------------------ export

    def inference_inputs(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        m = self.model_config
        return {
            "image": jax.ShapeDtypeStruct((batch_size, m.image_size, m.image_size, m.channels),
                                          jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, m.text_max_len), jnp.int32),
        }

    def inference(self, params, frozen, inputs):
        """L2-normalised ``image_embeds`` / ``text_embeds`` of preprocessed images, token ids."""
        out = self.model.apply({"params": params}, inputs["image"], inputs["text"])
        return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"]}


def zero_shot_metrics(image_embeds: np.ndarray, labels: np.ndarray,
                      prompt_embeds: np.ndarray) -> dict[str, float]:
    """Zero-shot classification (Radford et al. 2021): each class's text embedding is the
    L2-normalised mean of its prompts' embeddings (one per template); an image is assigned the
    class of highest cosine similarity.

    Args:
      image_embeds: ``[N, D]`` L2-normalised image embeddings.
      labels: ``[N]`` int class ids.
      prompt_embeds: ``[C, M, D]`` L2-normalised embeddings of M templates for C classes.

    Returns ``zero_shot/accuracy`` (top-1), ``zero_shot/top5_accuracy`` when C > 5, and
    ``zero_shot/chance`` (1 / C).
    """
    classes = np.asarray(prompt_embeds, np.float64).mean(axis=1)
    classes /= np.maximum(np.linalg.norm(classes, axis=-1, keepdims=True), 1e-12)
    scores = np.asarray(image_embeds, np.float64) @ classes.T  # [N, C]
    labels = np.asarray(labels)
    out = {"zero_shot/accuracy": float(np.mean(np.argmax(scores, axis=1) == labels)),
           "zero_shot/chance": 1.0 / classes.shape[0]}
    if classes.shape[0] > 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        out["zero_shot/top5_accuracy"] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    return out

