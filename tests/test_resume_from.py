"""resume_from (a step of this workdir, or another run's checkpoint) and init_params=."""

import json
import logging

import jax
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain import trainer as engine
from jaxtrain.checkpoint import read_state
from jaxtrain.evaluators import build_evaluators
from jaxtrain.hooks import Hook
from tests import toy_task


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
    x, y = leaves(a), leaves(b)
    assert len(x) == len(y)
    for u, v in zip(x, y, strict=True):
        np.testing.assert_array_equal(u, v)


class StartState(Hook):
    """Records the state the loop starts from."""

    def on_start(self, loop):
        self.start = loop.start
        self.params = jax.device_get(loop.state.params)
        self.opt_state = jax.device_get(loop.state.opt_state)


def config(**kw):
    return toy_task.config(checkpoint__every=2, checkpoint__keep=3, **kw)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """An 8-step run with checkpoints at 4, 6 and 8 (2 rotated out)."""
    workdir = tmp_path_factory.mktemp("first")
    return Trainer(config(), workdir).train()


def test_resume_from_a_step_moves_later_checkpoints_aside(first_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(first_run.workdir, workdir)
    ckpts = workdir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "6", "8"]

    with pytest.raises(ConfigError, match=r"no checkpoint at step 5.*\[4, 6, 8\]"):
        Trainer(config(resume_from="5"), workdir).train()

    resumed = Trainer(config(resume_from="4"), workdir).train()
    # continues from 4 exactly as the uninterrupted run did: same batches, same state
    assert [s for s, _ in resumed.loss_history] == [5, 6, 7, 8]
    np.testing.assert_allclose([v for _, v in resumed.loss_history],
                               [v for _, v in first_run.loss_history[4:]], rtol=1e-6)
    assert_trees_equal(resumed.final_state.params, first_run.final_state.params)
    assert_trees_equal(resumed.final_state.opt_state, first_run.final_state.opt_state)
    # the old 6 and 8 were renamed, not deleted; rotation (keep=3) did not count them
    names = sorted(p.name for p in ckpts.iterdir())
    aside = [n for n in names if ".after-resume-" in n]
    assert sorted(n.partition(".")[0] for n in aside) == ["6", "8"], names
    assert sorted(n for n in names if n.isdigit()) == ["4", "6", "8"]
    assert all((ckpts / n / "state").is_dir() for n in aside)
    # metrics.jsonl was truncated at 4: one record per step, none duplicated
    steps = [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl"))
             if "train/loss" in r]
    assert steps == [2, 4, 6, 8]

    # the same command again (e.g. after a preemption) resumes the latest: nothing moves
    again = Trainer(config(resume_from="4"), workdir).train()
    assert again.final_step == 8 and again.loss_history == []
    assert sorted(p.name for p in ckpts.iterdir()) == names


def test_resume_from_another_workdir_starts_a_fine_tune(first_run, tmp_path, caplog):
    source = f"{first_run.workdir}/checkpoints/6"
    _, saved = read_state(source)
    hook = StartState()
    cfg = config(resume_from=source)
    with caplog.at_level(logging.WARNING):
        tuned = Trainer(cfg, tmp_path, hooks=[hook]).train(stop_at_step=2)
    assert "Metadata file does not exist" not in caplog.text  # Orbax's, reading that run
    assert hook.start == 0 and tuned.final_step == 2
    assert_trees_equal(hook.params, saved["params"])  # its params ...
    assert all(not np.any(x) for x in leaves(hook.opt_state))  # ... a fresh optimizer
    assert any(np.any(x) for x in leaves(saved["opt_state"]))  # (which had moved)

    # once this workdir has its own checkpoints, a re-run resumes them (step 2, not 0)
    hook = StartState()
    Trainer(cfg, tmp_path, hooks=[hook]).train(stop_at_step=3)
    assert hook.start == 2

    with pytest.raises(ConfigError, match="resume_from checkpoint .* do not fit the model"):
        Trainer(config(resume_from=first_run.workdir, model__hidden=32), tmp_path / "w").train()
    with pytest.raises(ConfigError, match=r"resume_from='.*nowhere'.*does not exist"):
        Trainer(config(resume_from=str(tmp_path / "nowhere")), tmp_path / "x").train()


def test_init_params_start_the_run(first_run, tmp_path):
    cfg = config()
    task = toy_task.RegressionTask(cfg)
    hook = StartState()
    given = first_run.final_state.params
    run = engine.Trainer(cfg, tmp_path, task=task, evaluators=build_evaluators(cfg, task),
                         hooks=[hook], init_params=given)
    run.train(stop_at_step=1)
    assert hook.start == 0
    assert_trees_equal(hook.params, given)
    # only some leaves given: the others keep their init
    part = {"Dense_0": {"bias": np.full((16,), 0.5, np.float32)}}
    state = engine.Trainer(cfg, task=task, init_params=part).init_state()
    fresh = engine.Trainer(cfg, task=task).init_state()
    np.testing.assert_array_equal(state.params["Dense_0"]["bias"], part["Dense_0"]["bias"])
    np.testing.assert_array_equal(state.params["Dense_1"]["kernel"],
                                  fresh.params["Dense_1"]["kernel"])
    wrong = {"Dense_0": {"bias": np.zeros((3,), np.float32)}}
    with pytest.raises(ConfigError, match=r"init_params params do not fit.*\(3,\) vs model"):
        engine.Trainer(cfg, task=task, init_params=wrong).init_state()
