"""Nothing lost, in process: unreadable checkpoints, the workdir lock, diverged models, failed
writes. Each test injects the fault and asserts the outcome: the error and its message, and
what is on disk. (The same faults through the command line, with exit codes: test_faults.py.)"""

import errno
import json
import os
import re
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import CheckpointSaveError, NonFiniteError, Trainer
from jaxtrain.checkpoint import Checkpointer, CheckpointMismatchError
from jaxtrain.config import ConfigError
from jaxtrain.hooks import Progress
from jaxtrain.trainer import NoReadableCheckpointError
from jaxtrain.workdir import LOCK_NAME, WorkdirLock, WorkdirLockedError
from jaxtrain.writers import MetricsWriteError
from tests import toy_task
from tests.test_trainer import assert_trees_close


def damage(step_dir):
    """Overwrite the array data of one checkpoint (as a disk error or a cut copy would)."""
    state_dir = step_dir / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and "ocdbt" in str(f.relative_to(state_dir)):
            f.write_bytes(b"garbage")


def listing(workdir):
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 12-step toy run (checkpoints 4, 8, 12)."""
    return Trainer(toy_task.config(train__steps=12), tmp_path_factory.mktemp("full")).train()


def test_corrupt_newest_is_moved_aside_then_rewritten_and_never_counted(tmp_path, full):
    run = tmp_path / "run"
    Trainer(toy_task.config(train__steps=12, checkpoint__keep=2), run).train(stop_at_step=8)
    damage(run / "checkpoints" / "8")
    resumed = Trainer(toy_task.config(train__steps=12, checkpoint__keep=2), run).train()
    assert [s for s, _ in resumed.loss_history] == list(range(5, 13))  # from step 4
    assert_trees_close(resumed.final_state.params, full.final_state.params, rtol=0, atol=0)
    # the damaged 8 was renamed, not deleted; the new 8 and 12 are the two kept (keep=2)
    assert listing(run) == ["12", "8", "8.corrupt"]
    assert (run / "checkpoints" / "8.corrupt" / "state").is_dir()
    ckpt = Checkpointer(str(run / "checkpoints"))
    state, _ = ckpt.restore(8, resumed.final_state, Trainer(
        toy_task.config(), tmp_path / "x").state_shardings, toy_task.RegressionTask(
        toy_task.config()).train_iterator(seed=0, batch_size=32, process_index=0,
                                          process_count=1))
    assert int(state.step) == 8
    ckpt.close()


def test_missing_orbax_metadata_is_unreadable_not_incompatible(tmp_path, full):
    run = tmp_path / "run"
    Trainer(toy_task.config(train__steps=12), run).train(stop_at_step=8)
    (run / "checkpoints" / "8" / "state" / "_METADATA").unlink()
    resumed = Trainer(toy_task.config(train__steps=12), run).train()  # no mismatch error
    assert resumed.loss_history[0][0] == 5
    assert_trees_close(resumed.final_state.params, full.final_state.params, rtol=0, atol=0)
    assert "8.corrupt" in listing(run)


def test_a_checkpoint_of_another_model_is_still_a_mismatch(tmp_path):
    Trainer(toy_task.config(), tmp_path).train(stop_at_step=4)
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        Trainer(toy_task.config(model__hidden=32), tmp_path).train()
    assert listing(tmp_path) == ["4"]  # nothing moved aside


def test_no_readable_checkpoint_stops_listing_them_then_start_over_moves_them_aside(tmp_path,
                                                                                    full):
    Trainer(toy_task.config(train__steps=12), tmp_path).train()
    for step in (4, 8, 12):
        damage(tmp_path / "checkpoints" / str(step))
    with pytest.raises(NoReadableCheckpointError) as e:
        Trainer(toy_task.config(train__steps=12), tmp_path).train()
    message = str(e.value)
    for step in (4, 8, 12):
        assert f"{tmp_path}/checkpoints/{step}:" in message
    assert "Nothing was changed on disk" in message
    assert "--config.checkpoint.if_unreadable=start_over" in message
    assert isinstance(e.value, ConfigError)  # exit 2 on the command line
    assert listing(tmp_path) == ["12", "4", "8"]  # untouched: not rotated away
    again = Trainer(toy_task.config(train__steps=12, checkpoint__if_unreadable="start_over"),
                    tmp_path).train()
    assert again.loss_history[0][0] == 1
    assert_trees_close(again.final_state.params, full.final_state.params, rtol=0, atol=0)
    assert listing(tmp_path) == ["12", "12.corrupt", "4", "4.corrupt", "8", "8.corrupt"]


def test_start_over_does_not_discard_readable_checkpoints(tmp_path):
    Trainer(toy_task.config(train__steps=8), tmp_path).train(stop_at_step=4)
    result = Trainer(toy_task.config(train__steps=8, checkpoint__if_unreadable="start_over"),
                     tmp_path).train()
    assert result.loss_history[0][0] == 5  # resumed: the setting only acts when none reads


# --------------------------------------------------------------------------- the lock


def test_a_second_run_in_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
    with WorkdirLock(str(tmp_path)):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError) as e:
            Trainer(toy_task.config(), tmp_path).train()
        assert f"pid {os.getpid()} on host {socket.gethostname()!r}" in str(e.value)
        assert "Use another --workdir" in str(e.value)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    Trainer(toy_task.config(), tmp_path).train()
    assert not (tmp_path / LOCK_NAME).exists()  # released after the run, too


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(NonFiniteError):
        Trainer(toy_task.config(data__nan=True, train__nonfinite="error"), tmp_path).train()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_locks_are_recovered(tmp_path, caplog):
    lock = tmp_path / LOCK_NAME
    # this host, no process holds its flock (the holder was killed): stale at once
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 999999, "started": 0}))
    with caplog.at_level("WARNING"), WorkdirLock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "Recovered a stale lock" in caplog.text and "pid 999999" in caplog.text
    # another host with a fresh heartbeat: live (its flock is invisible from here)
    lock.write_text(json.dumps({"host": "node-7", "pid": 12, "started": time.time()}))
    with pytest.raises(WorkdirLockedError, match="pid 12 on host 'node-7'.*heartbeat"):
        WorkdirLock(str(tmp_path)).acquire()
    # ... and after STALE_SECONDS without a heartbeat, taken over
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with WorkdirLock(str(tmp_path), stale_seconds=600):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = WorkdirLock(str(tmp_path), heartbeat_seconds=0.05).acquire()
    try:
        old = time.time() - 3600
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.5)
        assert time.time() - os.stat(tmp_path / LOCK_NAME).st_mtime < 5
    finally:
        lock.release()


# --------------------------------------------------------------------------- diverged models


def test_non_finite_eval_outputs_give_nan_metrics(tmp_path):
    trainer = Trainer(toy_task.config(), tmp_path)
    state = trainer.init_state()
    assert np.isfinite(trainer.evaluate(state)["eval/val/loss"])
    nan_params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params)
    metrics = trainer.evaluate(state.replace(params=nan_params))
    assert list(metrics) == ["eval/val/loss"] and np.isnan(metrics["eval/val/loss"])


def test_nan_params_do_not_give_perfect_retrieval(tmp_path):
    """The issue's case: a CLIP model with NaN parameters scored recall@1 = 1, mean rank 0."""
    from jaxtrain import api
    from tests.test_lm_task import load_config

    trainer = api.Trainer(load_config("clip", "runlocal"), tmp_path)
    state = trainer.init_state()
    nan_params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params)
    metrics = trainer.evaluate(state.replace(params=nan_params), ["retrieval"])
    assert metrics and all(np.isnan(v) for v in metrics.values()), metrics


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_non_finite_metric_is_never_the_best(mode):
    cfg = toy_task.config(checkpoint__best_metric="eval/val/loss", checkpoint__best_mode=mode)
    progress = Progress()
    progress.update(4, {"eval/val/loss": float("nan")}, cfg)
    assert progress.best_step is None
    progress.update(8, {"eval/val/loss": 0.5}, cfg)
    progress.update(12, {"eval/val/loss": float("inf") if mode == "max" else -float("inf")}, cfg)
    progress.update(16, {"eval/val/loss": float("nan")}, cfg)
    assert (progress.best_step, progress.best_value) == (8, 0.5)


def test_the_checkpointer_never_keeps_a_nan_ranked_checkpoint_as_best(tmp_path):
    trainer = Trainer(toy_task.config(), tmp_path / "w")
    state, it = trainer.init_state(), trainer.train_iterator()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1, best_metric="m", best_mode="max",
                        async_save=False)
    for step, value in [(1, 0.1), (2, float("nan")), (3, 0.2), (4, 0.05), (5, float("nan"))]:
        ckpt.save(step, state, it, {}, {"m": value})
    assert ckpt.all_steps() == [3, 5]  # the best finite one and the latest
    ckpt.close()


# --------------------------------------------------------------------------- failed writes


def test_an_orbax_disk_full_error_is_a_checkpoint_save_error(tmp_path, monkeypatch):
    """Orbax reports a full disk as a ValueError (RESOURCE_EXHAUSTED), not an OSError."""
    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        if step == 8:
            raise ValueError('RESOURCE_EXHAUSTED: Failed writing: "/x/8.orbax-checkpoint-tmp/'
                             'd/abc": No space left on device [os_error_code=\'28\']')
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(CheckpointSaveError) as e:
        Trainer(toy_task.config(train__steps=12), tmp_path).train()
    # "4 or 8" when 4 is still being written in the background as 8 is saved
    assert re.search(r"Writing checkpoint (4 or )?8 under", str(e.value))
    assert "No space left" in str(e.value)
    assert f"Checkpoints on disk: [4] under {tmp_path}/checkpoints" in str(e.value)
    assert "resumes from step 4" in str(e.value)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 8  # the logs were flushed up to the failure
    assert not (tmp_path / LOCK_NAME).exists()


def test_checkpoints_path_being_a_file_fails_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointSaveError, match="is a file, not a directory.*Move the file"):
        Trainer(toy_task.config(), tmp_path).train()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_nonfinite_error_says_what_is_on_disk(tmp_path):
    cfg = toy_task.config(data__nan=True, train__nonfinite="error")
    with pytest.raises(NonFiniteError, match="No checkpoint is on disk yet"):
        Trainer(cfg, tmp_path / "none").train()
    Trainer(toy_task.config(train__steps=12), tmp_path / "some").train(stop_at_step=4)
    with pytest.raises(NonFiniteError, match=r"Checkpoints on disk: \[4\].*resumes from step 4"):
        Trainer(toy_task.config(train__steps=12, data__nan=True, train__nonfinite="error"),
                tmp_path / "some").train()


def test_a_full_disk_at_the_metrics_write_stops_cleanly_and_resume_loses_nothing(
        tmp_path, monkeypatch, full):
    import builtins

    import jaxtrain.writers

    real_open = builtins.open
    writes = {"n": 0}

    def full_disk_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            writes["n"] += 1
            if writes["n"] == 6:  # the 6th record: half a line reaches the disk, then ENOSPC
                with real_open(path, mode) as f:
                    f.write('{"step": 10, "train/lo')
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(jaxtrain.writers, "open", full_disk_open, raising=False)
    with pytest.raises(MetricsWriteError, match=r"metrics.jsonl failed \(No space left on device"):
        Trainer(toy_task.config(train__steps=12), tmp_path).train()
    monkeypatch.undo()
    resumed = Trainer(toy_task.config(train__steps=12), tmp_path).train()  # cut line dropped
    assert_trees_close(resumed.final_state.params, full.final_state.params, rtol=0, atol=0)
    steps = [r["step"] for r in resumed.metrics if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12


# --------------------------------------------------------------------------- Ctrl-C, exit codes


def test_the_first_ctrl_c_asks_for_a_checkpoint_and_the_second_aborts(tmp_path):
    import signal

    from jaxtrain.hooks import Loop, PreemptionHook

    hook = PreemptionHook(log_every=5)
    loop = Loop(trainer=None, state=None, train_iter=None, start=0, stop_at=100)
    before = signal.getsignal(signal.SIGINT)
    hook.on_start(loop)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        loop.step = 1
        hook.after_step(loop)
        assert loop.stop and loop.stop_reason == "preempted"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        hook.on_end(loop)
    assert signal.getsignal(signal.SIGINT) is before


def test_exit_codes():
    from jaxtrain.cli import failure_exit_code
    from jaxtrain.workdir import WorkdirLockedError

    cases = [(ConfigError("x"), 2), (CheckpointMismatchError("x"), 2),
             (NoReadableCheckpointError("x"), 2), (WorkdirLockedError("x"), 2),
             (NonFiniteError("x"), 3), (CheckpointSaveError("x"), 3), (MetricsWriteError("x"), 3),
             (KeyboardInterrupt(), 130), (RuntimeError("a bug"), None)]
    assert [failure_exit_code(e) for e, _ in cases] == [code for _, code in cases]


def test_a_long_error_keeps_its_start_and_its_end():
    from jaxtrain.errors import brief

    long = ValueError("RESOURCE_EXHAUSTED: Failed writing " + "x" * 500 + ": No space left on "
                      "device [os_error_code='28']\nsecond line")
    text = brief(long, 200)
    assert len(text) <= 200 and text.startswith("ValueError: RESOURCE_EXHAUSTED")
    assert text.endswith("No space left on device [os_error_code='28']")
    assert brief(OSError("short")) == "OSError: short"
