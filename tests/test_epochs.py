"""train.epochs: steps derived from the dataset size, the schedule that follows, 'epoch'
cadences for evaluation and checkpoints, the epoch in the logs and the result."""

import copy
import math
from fractions import Fraction

import jax
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain import trainer as engine
from jaxtrain.api import build_task
from jaxtrain.epochs import is_epoch_end, steps_for_epochs
from jaxtrain.optim import build_schedule
from tests import toy_task


def test_epochs_to_steps_arithmetic():
    assert steps_for_epochs(1, 512, 32) == 16  # divisible
    assert steps_for_epochs(2, 100, 32) == 7  # 6.25 -> 7
    assert steps_for_epochs(1.5, 500, 32) == 24  # 23.4375 -> 24
    assert steps_for_epochs(0.1, 30, 8) == 1  # a fraction of a step is one step
    assert steps_for_epochs(0.3, 1000, 10) == 30  # exact decimal: never 31 from float error
    # epoch ends: ceil(k * N / B), against Fraction arithmetic, for awkward sizes
    for n, b in [(100, 32), (96, 32), (7, 3), (1000, 7), (5, 16)]:
        want = {math.ceil(Fraction(k * n, b)) for k in range(1, 60)}
        got = {s for s in range(1, max(want) + 1) if is_epoch_end(s, n, b)}
        assert got == {s for s in want if s <= max(want)}, (n, b)


@pytest.mark.parametrize("accum", [1, 2])
def test_steps_and_schedule_follow_the_epochs(accum):
    cfg = toy_task.config(data__examples=100, train__epochs=2.0, train__accum_steps=accum,
                          optim__schedule="cosine", optim__warmup_ratio=0.3, eval__every=0)
    given = copy.deepcopy(cfg)
    trainer = Trainer(cfg)
    # 2 epochs of 100 rows at a global batch of 32 (accumulation splits the batch: same steps)
    assert trainer.config.train.steps == 7
    assert trainer.steps_per_epoch == pytest.approx(100 / 32)
    assert cfg.to_dict() == given.to_dict(), "the caller's config must not change"
    want = copy.deepcopy(cfg)
    want.train.steps = 7
    reference = build_schedule(want.optim, 7)  # warmup = ratio of the derived steps
    np.testing.assert_allclose([trainer.schedule(s) for s in range(8)],
                               [reference(s) for s in range(8)], rtol=1e-6)
    assert trainer.schedule(7) < trainer.schedule(3), "the schedule must decay over 7 steps"


def test_epochs_config_errors():
    with pytest.raises(ConfigError, match="train.epochs .* or train.steps .*not both"):
        build_task(toy_task.config(train__epochs=1.0, train__steps=5))
    with pytest.raises(ConfigError, match="'train.epochs' must be >= 0"):
        build_task(toy_task.config(train__epochs=-1.0))
    build_task(toy_task.config(eval__every="epoch", checkpoint__every="epoch"))  # allowed
    with pytest.raises(ConfigError, match="eval.every"):
        build_task(toy_task.config(eval__every="epochs"))
    cfg = toy_task.config(train__epochs=1.0, optim__warmup_steps=20)  # 16 steps
    with pytest.raises(ConfigError, match=r"warmup_steps' \(20\) must be smaller than the 16"):
        Trainer(cfg)

    class Streaming(toy_task.RegressionTask):
        def num_train_examples(self):
            return None

    with pytest.raises(ConfigError, match="set train.steps instead"):
        engine.Trainer(toy_task.config(train__epochs=1.0), task=Streaming(toy_task.config()))
    with pytest.raises(ConfigError, match="checkpoint.every='epoch' needs the number"):
        engine.Trainer(toy_task.config(checkpoint__every="epoch"),
                       task=Streaming(toy_task.config()))


def test_every_epoch_evaluates_and_saves_at_epoch_ends(tmp_path):
    # 100 rows, batch 32: 3.125 steps per epoch; 2 epochs = 7 steps; epochs end at 4 and 7
    cfg = toy_task.config(data__examples=100, train__epochs=2.0, eval__every=0,
                          checkpoint__every="epoch", checkpoint__keep=10,
                          checkpoint__best_metric="eval/val/loss", checkpoint__best_mode="min")
    cfg.evals.val.every = "epoch"
    result = Trainer(cfg, tmp_path).train()
    assert result.final_step == 7
    assert [r["step"] for r in result.eval_history] == [4, 7]
    assert [int(p.rpartition("/")[2]) for p in result.checkpoint_paths] == [4, 7]
    epochs = {r["step"]: r["train/epoch"] for r in result.metrics if "train/epoch" in r}
    assert epochs == pytest.approx({s: s / 3.125 for s in (2, 4, 6, 7)})
    assert result.epoch == pytest.approx(7 / 3.125)
    assert result.best_step in (4, 7)
    assert result.best_epoch == pytest.approx(result.best_step / 3.125)
    assert result.best_checkpoint_path == str(tmp_path / "checkpoints" / str(result.best_step))
    losses = [r["train/loss"] for r in result.metrics if "train/loss" in r]
    assert result.final_loss == losses[-1]
    # the mean of the last log window (step 7 alone: 6 was logged)
    assert result.final_loss == pytest.approx(result.loss_history[-1][1], rel=1e-6)

    frame = result.metrics_frame()
    assert frame.index.name == "step"
    assert list(frame.index) == sorted({r["step"] for r in result.metrics})
    assert {2, 4, 6, 7} <= set(frame.index) and frame.index.is_unique
    for record in result.metrics:  # every record is in the frame, at its step
        for key, value in record.items():
            if key != "step":
                assert frame.loc[record["step"], key] == pytest.approx(value), key
    assert np.isnan(frame.loc[2, "eval/val/loss"]) and not np.isnan(frame.loc[4, "eval/val/loss"])


def test_steps_per_epoch_without_epochs_and_unknown_size():
    t = Trainer(toy_task.config())
    assert t.config.train.steps == 8 and t.steps_per_epoch == 512 / 32

    class Streaming(toy_task.RegressionTask):
        def num_train_examples(self):
            return None

    t = engine.Trainer(toy_task.config(), task=Streaming(toy_task.config()),
                       devices=jax.devices()[:1])
    assert t.steps_per_epoch is None


def test_command_line_overrides_take_epoch_or_steps(monkeypatch):
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", "--config=tests/toy_config.py", "--config.eval.every=epoch",
            "--config.checkpoint.every=3", "--config.evals.val.every=epoch",
            "--config.train.epochs=2"]
    monkeypatch.setattr("sys.argv", argv)  # config_flags finds the override names there
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
    fv(argv)
    cfg = fv.config
    assert (cfg.eval.every, cfg.checkpoint.every, cfg.evals.val.every) == ("epoch", 3, "epoch")
    assert cfg.train.epochs == 2.0
    build_task(cfg)  # valid
