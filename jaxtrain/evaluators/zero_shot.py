"""``zero_shot``: zero-shot image classification of a dual encoder from class-name prompts.

The set (:mod:`jaxtrain.data.zero_shot`, this evaluator's keys: ``name``, ``split``,
``templates``, ...) gives labelled images and, per class, one tokenised prompt per template
("a photo of a {}."). Each class's text embedding is the L2-normalised mean of its prompts'
embeddings (Radford et al. 2021); an image is assigned the class of highest cosine similarity.
Metrics: ``accuracy`` (top-1), ``top5_accuracy`` (more than 5 classes), ``chance`` (1 / C).
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from jaxtrain.data import pipeline, zero_shot
from jaxtrain.evaluator import Evaluator


def zero_shot_metrics(image_embeds: np.ndarray, labels: np.ndarray,
                      prompt_embeds: np.ndarray) -> dict[str, float]:
    """Zero-shot classification accuracy.

    Args:
      image_embeds: ``[N, D]`` L2-normalised image embeddings.
      labels: ``[N]`` int class ids.
      prompt_embeds: ``[C, M, D]`` L2-normalised embeddings of M templates for C classes.

    Returns ``accuracy`` (top-1), ``top5_accuracy`` when C > 5, and ``chance`` (1 / C).
    """
    classes = np.asarray(prompt_embeds, np.float64).mean(axis=1)
    classes /= np.maximum(np.linalg.norm(classes, axis=-1, keepdims=True), 1e-12)
    scores = np.asarray(image_embeds, np.float64) @ classes.T  # [N, C]
    labels = np.asarray(labels)
    out = {"accuracy": float(np.mean(np.argmax(scores, axis=1) == labels)),
           "chance": 1.0 / classes.shape[0]}
    if classes.shape[0] > 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        out["top5_accuracy"] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    return out


class ZeroShotEvaluator(Evaluator):
    type = "zero_shot"
    requires = ("encode", "data_config", "model_config", "tokenizer")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return zero_shot.default_config()

    @classmethod
    def config_rules(cls, prefix: str):
        return zero_shot.config_rules(prefix)

    @functools.cached_property
    def labelled_set(self):
        """The images and tokenised class prompts, read once per run (None = disabled)."""
        m = self.task.model_config
        return zero_shot.zero_shot_set(
            self.config, self.task.data_config, image_size=m.image_size,
            text_max_len=m.text_max_len, seed=self.task.config.seed,
            tokenizer=self.task.tokenizer, prefix=f"evals.{self.name}.")

    def prepare(self, *, batch_size, process_index, process_count):
        """Read the labelled set now (its checks run); a disabled evaluator (no labelled set
        for this data) has nothing to check."""
        if self.labelled_set is not None:
            super().prepare(batch_size=batch_size, process_index=process_index,
                            process_count=process_count)

    def batches(self, *, batch_size, process_index, process_count):
        """The labelled images, then the class prompts ([classes, templates, T])."""
        kw = dict(batch_size=batch_size, process_index=process_index,
                  process_count=process_count)
        labelled = self.labelled_set
        if labelled is None:
            return
        for b in labelled.batches(**kw):
            yield {"image": b["image"], "label": b["label"], "valid": b["valid"]}
        prompts = pipeline.ArrayRows({"prompt": labelled.prompts,
                                      "class": np.arange(len(labelled.prompts))})
        yield from pipeline.eval_batches(prompts, **kw)

    def step(self, params, batch, frozen):
        if "image" in batch:
            return {"image": self.task.encode(params, "image", batch["image"]),
                    "label": batch["label"]}
        prompts = batch["prompt"]  # [rows, templates, T]
        flat = self.task.encode(params, "text", prompts.reshape(-1, prompts.shape[-1]))
        return {"prompt": flat.reshape(*prompts.shape[:2], -1), "class": batch["class"]}

    def metrics(self, outputs) -> dict[str, float]:
        if "image" not in outputs:  # disabled (name 'none'): no batches
            return {}
        order = np.argsort(outputs["class"])  # hosts interleave rows
        return zero_shot_metrics(outputs["image"], outputs["label"], outputs["prompt"][order])
