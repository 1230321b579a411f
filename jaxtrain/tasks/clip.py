"""Contrastive image–text training of a CLIP two-tower model on the built-in shapes data.

The loss is symmetric InfoNCE over the global batch: under the jitted step the batch is one
array sharded over the data axes, so every image is scored against the captions of every device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from jaxtrain.config import base_config
from jaxtrain.data import pipeline
from jaxtrain.data.shapes import NUM_COMBOS, CaptionTokenizer, ShapesSource
from jaxtrain.losses.contrastive import clip_loss
from jaxtrain.metrics.retrieval import retrieval_metrics
from jaxtrain.models.clip import CLIP, ClipConfig
from jaxtrain.tasks.base import Task

_TOKENIZER = CaptionTokenizer()


class ClipTask(Task):
    name = "clip"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = base_config()
        c.task = cls.name
        model = dataclasses.asdict(ClipConfig(vocab_size=_TOKENIZER.vocab_size))
        model["attention_impl"] = config_dict.placeholder(str)
        c.model = ml_collections.ConfigDict(model)
        c.data = ml_collections.ConfigDict()
        c.data.name = "shapes"  # the built-in generated image–caption set
        c.data.train_examples = 50_000
        c.data.eval_examples = NUM_COMBOS  # one held-out example of every combination
        c.eval.batch_size = 128
        return c

    @classmethod
    def config_rules(cls):
        return [
            ("data.name", lambda v: v == "shapes", "must be 'shapes' (the built-in data)"),
            ("data.train_examples", lambda v: v > 0, "must be > 0"),
            ("data.eval_examples", lambda v: 0 < v <= NUM_COMBOS,
             f"must be in [1, {NUM_COMBOS}] (distinct combinations in the held-out split)"),
            ("model.vocab_size", lambda v: v >= _TOKENIZER.vocab_size,
             f"must be >= {_TOKENIZER.vocab_size}, the caption vocabulary"),
            ("model.text_max_len", lambda v: v >= _TOKENIZER.min_max_len,
             f"must be >= {_TOKENIZER.min_max_len}, the longest encoded caption"),
        ]

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model_config = ClipConfig.from_dict(config.model.to_dict())
        self.model = CLIP(self.model_config)

    def _source(self, split: str) -> ShapesSource:
        m, d = self.model_config, self.config.data
        train = split == "train"
        return ShapesSource(
            d.train_examples if train else d.eval_examples,
            image_size=m.image_size,
            max_text_len=m.text_max_len,
            seed=self.config.seed if train else self.config.seed + 1_000_003,
            unique_combos=not train,
        )

    def init_params(self, rng: jax.Array) -> Any:
        m = self.model_config
        images = jnp.zeros((1, m.image_size, m.image_size, m.channels), jnp.float32)
        tokens = jnp.zeros((1, m.text_max_len), jnp.int32)
        return self.model.init(rng, images, tokens)["params"]

    def loss_fn(self, params, batch, rng, frozen):
        out = self.model.apply({"params": params}, batch["image"], batch["text"])
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"],
                         self.model_config.max_logit_scale)

    def train_iterator(self, *, seed, batch_size, process_index, process_count):
        return pipeline.train_iterator(
            self._source("train"), batch_size=batch_size, seed=seed,
            process_index=process_index, process_count=process_count,
        )

    def eval_batches(self, *, batch_size, process_index, process_count):
        return pipeline.eval_batches(
            self._source("eval"), batch_size=batch_size,
            process_index=process_index, process_count=process_count,
        )

    def eval_step(self, params, batch, frozen):
        out = self.model.apply({"params": params}, batch["image"], batch["text"])
        scale = jnp.broadcast_to(out["logit_scale"], out["image_embeds"].shape[:1])
        return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"],
                "logit_scale": scale}

    def eval_metrics(self, outputs) -> dict[str, float]:
        img, txt = outputs["image_embeds"], outputs["text_embeds"]
        loss, _ = clip_loss(img, txt, outputs["logit_scale"][0], self.model_config.max_logit_scale)
        metrics = retrieval_metrics(img, txt, ks=(1, 5))
        metrics["loss"] = float(loss)
        metrics["chance_recall@1"] = 1.0 / len(img)
        return {k: float(np.asarray(v)) for k, v in metrics.items()}

    def inference_inputs(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        m = self.model_config
        return {
            "image": jax.ShapeDtypeStruct((batch_size, m.image_size, m.image_size, m.channels),
                                          jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, m.text_max_len), jnp.int32),
        }

    def inference(self, params, frozen, inputs):
        """L2-normalised ``image_embeds`` and ``text_embeds`` of preprocessed images and token ids."""
        out = self.model.apply({"params": params}, inputs["image"], inputs["text"])
        return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"]}
