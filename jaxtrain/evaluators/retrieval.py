"""``retrieval``: recall@k and mean rank of held-out query/positive pairs, both directions.

Each query is ranked against every positive of the held-out set by cosine similarity (and the
other way round); recall@k is the fraction whose own pair is in the top k, mean rank the mean
1-based rank of it (:func:`jaxtrain.metrics.retrieval.retrieval_metrics`). Direction names
follow the task's mode (``i2t`` / ``t2i``, or ``q2p`` / ``p2q`` for text–text and image–image).
Also ``loss`` (the run's contrastive loss over the whole set as one batch), ``mean_recall@1``
and ``chance_recall@1`` (1 / pairs).
"""

from __future__ import annotations

import ml_collections

from jaxtrain.evaluator import HeldoutEvaluator
from jaxtrain.metrics.retrieval import retrieval_metrics


class RetrievalEvaluator(HeldoutEvaluator):
    type = "retrieval"
    requires = ("heldout_batches", "pair_outputs", "pair_loss", "retrieval_names")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = super().default_config()  # source: '' = the held-out pairs of `data.*`
        c.ks = (1, 5, 10)  # recall@k for each k
        return c

    @classmethod
    def config_rules(cls, prefix: str):
        return [(prefix + "ks", lambda v: len(v) > 0 and all(k >= 1 for k in v),
                 "must be a non-empty list of ranks >= 1")]

    def step(self, params, batch, frozen):
        return self.task.pair_outputs(params, batch)

    def metrics(self, outputs) -> dict[str, float]:
        q, p = outputs["query"], outputs["positive"]
        metrics = retrieval_metrics(q, p, ks=tuple(self.config.ks),
                                    names=self.task.retrieval_names)
        metrics["loss"] = self.task.pair_loss(outputs)
        metrics["chance_recall@1"] = 1.0 / len(q)
        return {k: float(v) for k, v in metrics.items()}
