"""``preference``: DPO metrics of a policy against its reference on held-out preference pairs.

The run's own preference loss (``dpo.loss_type``, ``beta``, label smoothing) over all pairs,
with its reward metrics (``rewards/accuracy``, margins, ...), plus ``policy_prefers_chosen``:
how often the policy alone gives the chosen answer the higher log-probability, and ``kl``
(mean per-token KL to the reference) when the task measures it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxtrain.evaluator import HeldoutEvaluator
from jaxtrain.losses.preference import preference_loss


class PreferenceEvaluator(HeldoutEvaluator):
    type = "preference"
    requires = ("heldout_batches", "compare")

    def step(self, params, batch, frozen):
        return self.task.compare(params, batch, frozen)

    def metrics(self, outputs) -> dict[str, float]:
        d = self.task.config.dpo
        o = {k: jnp.asarray(v) for k, v in outputs.items()}
        loss, metrics = preference_loss(o["pc"], o["pr"], o["rc"], o["rr"], beta=d.beta,
                                        loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        out = {k: float(v) for k, v in metrics.items()}
        out["loss"] = float(loss)
        out["policy_prefers_chosen"] = float(np.mean(np.asarray(o["pc"] > o["pr"])))
        if "kl" in outputs:
            out["kl"] = float(np.sum(outputs["kl"]) / max(float(np.sum(outputs["tokens"])), 1.0))
        return out
