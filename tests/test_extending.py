"""Extending jaxtrain through its public registries only: a new model family trained by the
built-in LM task, and a new evaluator type, both named from the config."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxtrain
from jaxtrain import ConfigError, HeldoutEvaluator, ModelFamily

from .test_lm_task import load_config


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    vocab_size: int = 50304
    dim: int = 16

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BigramConfig keys {sorted(unknown)}")
        return cls(**d)


class Bigram(nn.Module):
    """Next token from the current one alone: logits = E[x] W."""

    cfg: BigramConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        init = nn.initializers.normal(0.02)
        emb = self.param("embed", nn.with_logical_partitioning(init, ("vocab", "embed")),
                         (self.cfg.vocab_size, self.cfg.dim))
        out = self.param("out", nn.with_logical_partitioning(init, ("embed", "vocab")),
                         (self.cfg.dim, self.cfg.vocab_size))
        hidden = emb[tokens]
        return hidden @ out, {"hidden": hidden}


def _init(cfg, rng):
    return Bigram(cfg).init(rng, jnp.zeros((1, 4), jnp.int32))["params"]


BIGRAM = ModelFamily(
    name="toy_bigram", kind="causal_lm", title="bigram language model", config_cls=BigramConfig,
    module=Bigram, init=_init,
    inference_inputs=lambda cfg, batch_size, seq_len=None: {
        "tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)},
    inference=lambda cfg, params, inputs: {
        "logits": Bigram(cfg).apply({"params": params}, inputs["tokens"])[0]},
    flops_per_token=lambda cfg, seq_len: 6.0 * cfg.dim * cfg.vocab_size,
)


class BitsPerToken(HeldoutEvaluator):
    """Held-out cross-entropy in bits (or another `base`) per scored token."""

    type = "toy_bits_per_token"
    requires = ("heldout_batches", "token_nll")

    @classmethod
    def default_config(cls):
        c = super().default_config()  # source: '' = the task's held-out rows
        c.base = 2.0
        return c

    @classmethod
    def config_rules(cls, prefix):
        return [(prefix + "base", lambda v: v > 1, "must be > 1")]

    def step(self, params, batch, frozen):
        return self.task.token_nll(params, batch)

    def metrics(self, outputs):
        nats = float(np.sum(outputs["nll"])) / float(np.sum(outputs["tokens"]))
        return {"bits": nats / math.log(self.config.base)}


@pytest.fixture(scope="module")
def registered():
    jaxtrain.register_model(BIGRAM)
    jaxtrain.register_evaluator(BitsPerToken)


def _config(**changes):
    c = load_config("lm", "runlocal", train__steps=12, eval__every=6, checkpoint__every=6,
                    optim__lr=3e-2)
    with c.unlocked():  # a config file adds its own blocks before it is locked
        c.model = ml_collections.ConfigDict(dict(name="toy_bigram", vocab_size=50304, dim=16))
        c.evals.bits = jaxtrain.eval_config("toy_bits_per_token", every=6)
        for key, value in changes.items():
            c.evals.bits[key] = value
    c.checkpoint.best_metric, c.checkpoint.best_mode = "eval/bits/bits", "min"
    return c


def test_a_new_model_and_evaluator_train_through_the_registries(registered, tmp_path):
    trainer = jaxtrain.Trainer(_config(), str(tmp_path))
    assert isinstance(trainer.task.model, Bigram)
    assert set(trainer.evaluators) == {"val", "bits"}  # the task's own, and the new one
    params = trainer.abstract_state.params
    assert (params["embed"].shape, params["out"].shape) == ((50304, 16), (16, 50304))
    result = trainer.train()
    evals = result.eval_history
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:  # bits = the perplexity evaluator's nats / ln 2, computed independently
        assert r["eval/bits/bits"] == pytest.approx(r["eval/val/loss"] / math.log(2), rel=1e-6)
    assert evals[-1]["eval/bits/bits"] < evals[0]["eval/bits/bits"]  # it learns
    assert result.best_step == 12 and result.best_metric == evals[-1]["eval/bits/bits"]
    # the family's FLOP formula drives the throughput figures: 6·D·V per token
    tokens = 8 * 32
    perf = next(r for r in result.metrics if "perf/tflops_per_device" in r)
    per_step = perf["perf/tflops_per_device"] * 1e12 / perf["perf/steps_per_second"]
    assert per_step * trainer.mesh.size == pytest.approx(6.0 * 16 * 50304 * tokens, rel=1e-6)


def test_the_new_pieces_are_checked_like_built_in_ones(registered):
    with pytest.raises(ConfigError, match=r"Unknown config key 'evals\.bits\.bse'.*'base'"):
        jaxtrain.Trainer(_config(bse=3.0))
    with pytest.raises(ConfigError, match=r"'evals\.bits\.base' must be > 1"):
        jaxtrain.Trainer(_config(base=1.0))
    c = _config()
    with c.unlocked():
        c.model.depth = 2
    with pytest.raises(ConfigError, match=r"Unknown config key 'model\.depth'.*'model.dim'"):
        jaxtrain.Trainer(c)
    c = _config()
    c.evals.bits.type = "toy_bits_per_tokn"
    with pytest.raises(ConfigError, match="Did you mean 'toy_bits_per_token'"):
        jaxtrain.Trainer(c)


@jaxtrain.register_evaluator
class NormEvaluator(jaxtrain.LoopEvaluator):
    """A loop evaluator (its own loop, not batches -> step -> metrics): the params' global norm,
    with a text record of it per evaluation."""

    type = "test_param_norm"
    prepared = 0

    @classmethod
    def default_config(cls):
        return ml_collections.ConfigDict(dict(fail=False))

    def prepare(self, *, batch_size, process_index, process_count):
        if self.config.fail:
            raise ConfigError("test_param_norm: no data")
        NormEvaluator.prepared += 1

    def run(self, params, frozen, context):
        assert isinstance(context.mesh, jax.sharding.Mesh) and context.batch_size == 64
        with open(f"{context.workdir}/norms.txt", "a") as f:
            f.write(f"{context.step}\n")
        norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(params))))
        context.writer.write_text(context.step, "norm", f"{norm:.6f}")
        return {"norm": norm}


def test_a_loop_evaluator_runs_its_own_loop_and_is_prepared_first(tmp_path):
    from tests import toy_task

    cfg = toy_task.config(train__steps=8)
    cfg.evals.norm = jaxtrain.eval_config("test_param_norm", every=4)
    result = jaxtrain.train(cfg, str(tmp_path / "run"))
    evals = {r["step"]: r["eval/norm/norm"] for r in result.metrics if "eval/norm/norm" in r}
    assert sorted(evals) == [4, 8] and NormEvaluator.prepared == 1
    final = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(
        result.final_state.params))))
    assert evals[8] == pytest.approx(final, rel=1e-6)
    assert (tmp_path / "run" / "norms.txt").read_text().split() == ["4", "8"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    cfg.evals.norm.fail = True
    with pytest.raises(ConfigError, match="no data"):
        jaxtrain.train(cfg, str(tmp_path / "failed"))
    assert not (tmp_path / "failed" / "metrics.jsonl").exists()  # stopped before any step
