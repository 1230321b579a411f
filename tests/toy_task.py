"""A tiny regression task for engine tests: loss is a per-example mean, so gradient
accumulation must equal the full batch exactly."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtrain import Evaluator, Task, base_config, eval_config, register_evaluator, register_task
from jaxtrain.data import pipeline


class Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        x = nn.tanh(x)
        return nn.Dense(1, kernel_init=nn.with_logical_partitioning(init, ("mlp", None)))(x)[:, 0]


class Source:
    def __init__(self, n, dim, seed, nan=False):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, dim)).astype(np.float32)
        self.y = (np.sin(self.x @ rng.normal(size=dim))).astype(np.float32)
        if nan:
            self.x[:] = np.nan

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


@register_task
class RegressionTask(Task):
    name = "toy_regression"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = base_config()
        c.task = cls.name
        c.model = ml_collections.ConfigDict(dict(dim=8, hidden=16))
        c.data = ml_collections.ConfigDict(dict(examples=512, nan=False))
        c.train.batch_size = 32
        c.train.steps = 8
        c.train.log_every = 2
        c.train.progress_bar = False
        c.eval.every = 4
        c.eval.batch_size = 64
        c.checkpoint.every = 4
        c.optim.lr = 1e-2
        c.optim.schedule = "constant"
        c.evals.val = eval_config("toy_mse")
        return c

    def __init__(self, config):
        super().__init__(config)
        self.model = Mlp(config.model.hidden)

    def init_params(self, rng):
        return self.model.init(rng, jnp.zeros((1, self.config.model.dim)))["params"]

    def loss_fn(self, params, batch, rng, frozen):
        pred = self.model.apply({"params": params}, batch["x"])
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"mse": loss}

    def _source(self, split):
        d = self.config.data
        return Source(d.examples if split == "train" else 100, self.config.model.dim,
                      self.config.seed + (split == "eval"), nan=d.nan and split == "train")

    def num_train_examples(self):
        return self.config.data.examples

    def train_iterator(self, *, seed, batch_size, process_index, process_count):
        return pipeline.train_iterator(self._source("train"), batch_size=batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count)

    def heldout_batches(self, *, batch_size, process_index, process_count, source=""):
        return pipeline.eval_batches(self._source("eval"), batch_size=batch_size,
                                     process_index=process_index, process_count=process_count)

    def predict(self, params, x):
        return self.model.apply({"params": params}, x)


@register_evaluator
class MseEvaluator(Evaluator):
    """Mean squared error of the held-out rows (a toy evaluator, registered publicly)."""

    type = "toy_mse"
    requires = ("heldout_batches", "predict")

    def batches(self, *, batch_size, process_index, process_count):
        return self.task.heldout_batches(batch_size=batch_size, process_index=process_index,
                                         process_count=process_count)

    def step(self, params, batch, frozen):
        return {"se": (self.task.predict(params, batch["x"]) - batch["y"]) ** 2}

    def metrics(self, outputs):
        return {"loss": float(np.mean(outputs["se"]))}


def config(**overrides) -> ml_collections.ConfigDict:
    c = RegressionTask.default_config()
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        target = c
        for part in section.split("__") if section else []:
            target = target[part]
        target[name] = value
    return c
