"""``perplexity``: a language model's mean next-token loss and perplexity on held-out rows.

    loss = Σ_rows Σ_t m_t · (−log p(x_{t+1} | x_≤t)) / Σ m_t,     perplexity = exp(loss)

over the loss-masked tokens ``m`` of every row (the row's own mask: prompts of chat rows are
not scored). Metrics: ``loss``, ``perplexity``, ``tokens`` (scored tokens).
"""

from __future__ import annotations

import numpy as np

from jaxtrain.evaluator import HeldoutEvaluator


class PerplexityEvaluator(HeldoutEvaluator):
    type = "perplexity"
    requires = ("heldout_batches", "token_nll")

    def step(self, params, batch, frozen):
        return self.task.token_nll(params, batch)

    def metrics(self, outputs) -> dict[str, float]:
        tokens = float(np.sum(outputs["tokens"]))
        loss = float(np.sum(outputs["nll"])) / max(tokens, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": tokens}
