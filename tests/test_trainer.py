"""The engine end to end on tiny tasks: sharding, accumulation, checkpoints, resume, rotation."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrain import ConfigError, NonFiniteError, Trainer
from jaxtrain.checkpoint import Checkpointer, CheckpointMismatchError
from jaxtrain.mesh import shard_batch
from tests import toy_task

ROOT = Path(__file__).resolve().parents[1]


def clip_config(**model):
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import clip

        c = clip.get_config("runlocal")
    finally:
        sys.path.pop(0)
    c.train.progress_bar = False
    c.model.update(model)
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_close(a, b, **tol):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


def one_step(trainer, host_batch):
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, shard_batch(host_batch, trainer.mesh))
    return state, jax.device_get(metrics)


def test_clip_step_on_8_devices_equals_1_device():
    cfg = clip_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2  # batch, FSDP and tensor sharding
    t8 = Trainer(cfg)
    t1 = Trainer(clip_config(), devices=jax.devices()[:1])
    assert t8.mesh.devices.size == 8 and t1.mesh.devices.size == 1
    batch = next(t8.task.train_iterator(seed=0, batch_size=64, process_index=0, process_count=1))
    s8, m8 = one_step(t8, batch)
    s1, m1 = one_step(t1, batch)
    # parameters really are split over the fsdp axis on 8 devices
    kernel = s8.params["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor"), kernel.sharding
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    assert_trees_close(s8.params, s1.params, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_large_batch():
    big = Trainer(toy_task.config(optim__name="sgd", optim__momentum=0.0))
    acc = Trainer(toy_task.config(optim__name="sgd", optim__momentum=0.0, train__accum_steps=4))
    batch = next(big.task.train_iterator(seed=0, batch_size=32, process_index=0, process_count=1))
    sb, mb = one_step(big, batch)
    sa, ma = one_step(acc, batch)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    assert_trees_close(sa.params, sb.params, rtol=1e-5, atol=1e-7)
    # and it is not trivially equal: a single microbatch gives a different update
    s_small, _ = one_step(big, {k: np.tile(v[:8], (4,) + (1,) * (v.ndim - 1))
                               for k, v in batch.items()})
    assert not np.allclose(leaves(s_small.params)[0], leaves(sb.params)[0])


def test_checkpoint_written_on_8_devices_restores_on_1_and_back(tmp_path):
    result = Trainer(toy_task.config(mesh__fsdp=4, mesh__data=-1), tmp_path / "w8").train()
    t1 = Trainer(toy_task.config(), tmp_path / "w8", devices=jax.devices()[:1])
    ckpt = Checkpointer(str(tmp_path / "w8" / "checkpoints"))
    it = t1.task.train_iterator(seed=0, batch_size=32, process_index=0, process_count=1)
    state, meta = ckpt.restore(8, t1.abstract_state, t1.state_shardings, it)
    assert meta["step"] == 8 and int(state.step) == 8
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state.params))
    assert_trees_close(state.params, result.final_state.params, rtol=0, atol=0)
    # 1 -> 8: a run trained on 1 device resumes on 8
    r1 = Trainer(toy_task.config(), tmp_path / "w1", devices=jax.devices()[:1]).train(
        stop_at_step=4)
    r8 = Trainer(toy_task.config(), tmp_path / "w1").train()
    assert r1.final_step == 4 and r8.final_step == 8
    ckpt.close()


def test_interrupt_and_resume_matches_uninterrupted(tmp_path):
    full = Trainer(toy_task.config(), tmp_path / "full").train()
    first = Trainer(toy_task.config(), tmp_path / "resumed").train(stop_at_step=3)
    assert first.final_step == 3 and first.preempted is False
    second = Trainer(toy_task.config(), tmp_path / "resumed").train()
    assert second.final_step == 8
    assert [s for s, _ in second.loss_history] == list(range(4, 9))
    assert_trees_close(second.final_state.params, full.final_state.params, rtol=0, atol=0)
    assert_trees_close(second.final_state.opt_state, full.final_state.opt_state, rtol=0, atol=0)
    # the losses of the resumed steps equal the uninterrupted run's: same batches, same state
    np.testing.assert_allclose([loss for _, loss in second.loss_history],
                               [loss for _, loss in full.loss_history[3:]], rtol=1e-6)
    records = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)), "metrics.jsonl has duplicated steps after resume"


def test_rotation_keeps_latest_and_best(tmp_path):
    cfg = toy_task.config(train__steps=12, checkpoint__every=2, checkpoint__keep=2,
                          eval__every=2, checkpoint__best_metric="eval/val/loss",
                          checkpoint__best_mode="max")  # 'max' loss: the best is an early step
    result = Trainer(cfg, tmp_path).train()
    evals = {r["step"]: r["eval/val/loss"] for r in result.eval_history}
    best = max(evals, key=evals.get)
    assert best < 10, evals
    kept = sorted(int(Path(p).name) for p in result.checkpoint_paths)
    assert kept == sorted({best, 10, 12})
    assert result.best_step == best
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == kept


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    Trainer(toy_task.config(train__steps=2, checkpoint__every=2), tmp_path).train()
    wider = Trainer(toy_task.config(model__hidden=32, train__steps=4), tmp_path)
    expected = r"(?s)does not fit.*params/Dense_0/bias: checkpoint \(16,\) vs model \(32,\)"
    with pytest.raises(CheckpointMismatchError, match=expected + ".*new --workdir"):
        wider.train()


def test_early_stopping(tmp_path):
    cfg = toy_task.config(train__steps=40, eval__every=4, eval__early_stop_metric="eval/val/loss",
                          eval__early_stop_mode="min", eval__patience=2, eval__min_delta=10.0)
    result = Trainer(cfg, tmp_path).train()
    # the first eval sets the reference; no later eval beats it by 10.0 -> stop at the third
    assert result.stopped_early and result.final_step == 12
    assert int(Path(result.checkpoint_paths[-1]).name) == 12


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    trainer = Trainer(toy_task.config(data__nan=True, train__max_nonfinite_streak=0), tmp_path)
    init = trainer.init_state()
    result = trainer.train()
    assert_trees_close(result.final_state.params, init.params, rtol=0, atol=0)
    counted = [r["train/nonfinite_steps"] for r in result.metrics if "train/loss" in r]
    assert sum(counted) == 8


def test_nonfinite_error_mode_names_the_step(tmp_path):
    trainer = Trainer(toy_task.config(data__nan=True, train__nonfinite="error"), tmp_path)
    with pytest.raises(NonFiniteError, match=r"step\(s\) \[1, 2\]"):
        trainer.train()


def test_frozen_group_is_not_updated_and_lr_multiplier_applies(tmp_path):
    cfg = toy_task.config(optim__param_groups=(("Dense_0/.*", 0.0),), train__steps=4)
    trainer = Trainer(cfg, tmp_path)
    init = jax.device_get(trainer.init_state().params)
    final = jax.device_get(trainer.train().final_state.params)
    assert_trees_close(final["Dense_0"], init["Dense_0"], rtol=0, atol=0)
    assert not np.allclose(final["Dense_1"]["kernel"], init["Dense_1"]["kernel"])


def test_nan_storm_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    good = Trainer(toy_task.config(train__steps=4, checkpoint__every=4), tmp_path).train()
    storm = Trainer(toy_task.config(data__nan=True, train__steps=20,
                                    train__max_nonfinite_streak=6), tmp_path)
    with pytest.raises(NonFiniteError, match=r"6 consecutive steps up to step 10"):
        storm.train()
    kept = Checkpointer(str(tmp_path / "checkpoints"))
    assert kept.all_steps() == [4, 8]  # step 8 saved during the storm: every update skipped
    it = storm.task.train_iterator(seed=0, batch_size=32, process_index=0, process_count=1)
    state, _ = kept.restore(8, storm.abstract_state, storm.state_shardings, it)
    assert_trees_close(state.params, good.final_state.params, rtol=0, atol=0)
    kept.close()


def test_unreadable_checkpoint_is_skipped(tmp_path):
    full = Trainer(toy_task.config(train__steps=12), tmp_path / "full").train()
    Trainer(toy_task.config(train__steps=12), tmp_path / "run").train(stop_at_step=8)
    state_dir = tmp_path / "run" / "checkpoints" / "8" / "state"
    for f in state_dir.rglob("*"):  # the newest checkpoint's array data is damaged
        if f.is_file() and "ocdbt" in str(f.relative_to(state_dir)):
            f.write_bytes(b"garbage")
    resumed = Trainer(toy_task.config(train__steps=12), tmp_path / "run").train()
    assert [s for s, _ in resumed.loss_history] == list(range(5, 13))  # restarted from step 4
    assert_trees_close(resumed.final_state.params, full.final_state.params, rtol=0, atol=0)


def test_disk_full_at_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    import errno

    from jaxtrain import CheckpointSaveError

    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        if step == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    on_disk = r"Checkpoints on disk: \[4\]"
    with pytest.raises(CheckpointSaveError, match=r"checkpoint (4 or )?8 .*No space.*" + on_disk):
        Trainer(toy_task.config(), tmp_path).train()
    monkeypatch.setattr(Checkpointer, "save", real_save)
    resumed = Trainer(toy_task.config(), tmp_path).train()
    assert [s for s, _ in resumed.loss_history] == [5, 6, 7, 8]


def test_unwritable_or_full_workdir_fails_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="is not writable"):
        Trainer(toy_task.config(), blocker / "run").train()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 100))
    with pytest.raises(ConfigError, match=r"0\.0 MiB free, less than two checkpoints"):
        Trainer(toy_task.config(), tmp_path / "run").train()
    assert not (tmp_path / "run" / "checkpoints").exists()


class _ShapeBugTask(toy_task.RegressionTask):
    """A task whose loss cannot be traced with this config (a shape mismatch it only finds
    while the step is built)."""

    name = "toy_shape_bug"

    def loss_fn(self, params, batch, rng, frozen):
        return jax.numpy.dot(batch["x"], batch["x"]).sum(), {}


def test_an_error_while_building_the_step_is_a_config_error(tmp_path):
    """A ValueError/TypeError raised while the step is traced and compiled comes from the config
    (task, model, data shapes, mesh): a ConfigError (exit code 2 from the CLI) that names the
    batch shapes, the mesh and the original error."""
    trainer = Trainer(toy_task.config(), str(tmp_path), task=_ShapeBugTask)
    with pytest.raises(ConfigError, match=r"Building the train step for batch \{'x': \(32, 8\), "
                                          r"'y': \(32,\)\} on mesh .*TypeError: .*dot"):
        trainer.train()
