"""``perplexity``: a language model's mean next-token loss and perplexity on held-out rows.

    loss = Σ_rows Σ_t m_t · (−log p(x_{t+1} | x_≤t)) / Σ m_t,     perplexity = exp(loss)

over the loss-masked tokens ``m`` of every row (the row's own mask: prompts of chat rows are
not scored). Metrics: ``loss``, ``perplexity``, ``tokens`` (scored tokens).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxtrain.evaluator import Evaluator


class PerplexityEvaluator(Evaluator):
    type = "perplexity"
    requires = ("heldout_batches", "token_nll")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        # source: '' = the task's held-out split (data.eval_source or the held-out part of
        # data.source); else a local file/directory or hub dataset, read whole.
        return ml_collections.ConfigDict(dict(source=""))

    def batches(self, *, batch_size, process_index, process_count):
        return self.task.heldout_batches(batch_size=batch_size, process_index=process_index,
                                         process_count=process_count, source=self.config.source)

    def step(self, params, batch, frozen):
        return self.task.token_nll(params, batch)

    def metrics(self, outputs) -> dict[str, float]:
        tokens = float(np.sum(outputs["tokens"]))
        loss = float(np.sum(outputs["nll"])) / max(tokens, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": tokens}
