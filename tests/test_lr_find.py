"""The learning-rate finder: the sweep, the suggestion, divergence, sharding, files, the CLI."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrain import Trainer, checkpoint, trainer
from jaxtrain import lr_find as lf
from jaxtrain.hooks import ProgressHook
from jaxtrain.mesh import shard_batch
from tests import toy_task

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array([[float(x) for x in r] for r in rows[1:]])


def test_suggest_lr_is_the_steepest_descent_on_an_analytic_curve():
    lrs = lf.sweep_lrs(1e-7, 10.0, 200)
    x, x0, h = np.log(lrs), np.log(3e-3), np.log(1e8) / 199
    curve = 2.0 - np.tanh((x - x0) / 0.7)  # d/dlog(lr) is most negative exactly at lr = 3e-3
    assert abs(np.log(lf.suggest_lr(lrs, curve)) - x0) <= h / 2 + 1e-12
    # a steeper drop in the first points (EMA warm-up) is skipped; points after a NaN are ignored
    early = curve.copy()
    early[:6] += 50.0 * np.linspace(1.0, 0.0, 6)
    assert lf.suggest_lr(lrs, early) == lf.suggest_lr(lrs, curve)
    assert lf.suggest_lr(lrs, early, skip_start=0) < lrs[5]
    cut = curve.copy()
    cut[100:] = np.nan  # 3e-3 is at index 111: the steepest point left is the last interior one
    assert lf.suggest_lr(lrs, cut) == lrs[98]
    with pytest.raises(ValueError, match="at least 3 finite points"):
        lf.suggest_lr(lrs[:2], curve[:2])


def test_smoothing_and_divergence_rule():
    losses = np.array([4.0, 2.0, 3.0, 1.0])
    b, avg, want = 0.9, 0.0, []
    for i, loss in enumerate(losses):
        avg = b * avg + (1 - b) * loss
        want.append(avg / (1 - b ** (i + 1)))
    np.testing.assert_allclose(lf.smooth_losses(losses, b), want, rtol=1e-12)
    np.testing.assert_array_equal(lf.smooth_losses(losses, 0.0), losses)
    rising = [1.0, 0.5, 1.9, 2.1]  # best 0.5: 2.1 > 4 x 0.5, not > 4.3 x 0.5
    assert lf.divergence_index(rising, rising, 4.0) == 3
    assert lf.divergence_index(rising, rising, 4.3) is None
    assert lf.divergence_index([-1.0, -2.0, 3.9], [-1.0, -2.0, 3.9], 4.0) is None  # -2 + 3 x 2
    assert lf.divergence_index([-1.0, -2.0, 4.1], [-1.0, -2.0, 4.1], 4.0) == 2
    assert lf.divergence_index([1.0, np.nan, 1.0], [1.0, 1.0, 1.0], 4.0) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_lr=1.0, max_lr=0.1), "must be smaller than max_lr"),
    (dict(min_lr=0.0), r"min_lr=0.0 must be > 0"),
    (dict(max_lr=-1.0, min_lr=-2.0), r"min_lr=-2.0 must be > 0"),
    (dict(steps=5), r"steps=5 must be an integer >= 10"),
    (dict(smoothing=1.0), r"smoothing=1.0 must be in \[0, 1\)"),
    (dict(diverge=0.0), r"diverge=0.0 must be > 1"),
    (dict(max_lr=float("nan")), "not a finite number"),
])
def test_bad_arguments_are_clear_errors(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        lf.lr_find(toy_task.config(), tmp_path, **kwargs)
    assert not (tmp_path / "lr_find").exists()


def test_sgd_really_uses_the_exponential_lrs(tmp_path):
    cfg = toy_task.config(optim__name="sgd", optim__momentum=0.0, optim__clip_norm=0.0,
                          optim__schedule="cosine", optim__warmup_steps=4)  # both ignored
    one = jax.devices()[:1]
    result = lf.lr_find(cfg, tmp_path, min_lr=1e-3, max_lr=1.0, steps=12, devices=one)
    want = 1e-3 * 1000.0 ** (np.arange(12) / 11)
    header, rows = read_csv(result.csv_path)
    assert header == ["step", "lr", "loss", "smoothed_loss"]
    np.testing.assert_array_equal(rows[:, 0], np.arange(12))
    np.testing.assert_allclose(rows[:, 1], want, rtol=1e-15)
    np.testing.assert_array_equal(rows[:, 2], result.losses)

    # the same schedule in a Trainer: every update is exactly -lr_i * grad (plain SGD)
    t = Trainer(cfg, tmp_path, devices=one, schedule=lf.sweep_schedule(result.lrs))
    state, data = t.init_state(), t.train_iterator()
    grad = jax.jit(jax.grad(lambda p, b: t.task.loss_fn(p, b, None, {})[0]))
    for i in range(4):
        host = next(data)
        before = jax.device_get(state.params)
        g = jax.device_get(grad(before, host))
        state, metrics = t.train_step(state, shard_batch(host, t.mesh))
        assert float(metrics["lr"]) == np.float32(want[i])
        np.testing.assert_allclose(float(metrics["loss"]), result.losses[i], rtol=1e-6)
        after = jax.device_get(state.params)
        for b, a, d in zip(*(jax.tree.leaves(x) for x in (before, after, g)), strict=True):
            np.testing.assert_allclose(a - b, -np.float32(want[i]) * d, rtol=1e-3, atol=1e-7)


def test_divergence_stops_the_sweep(tmp_path, monkeypatch):
    loops = []  # the finder runs on the trainer's loop; its hook stops it
    original = trainer.Trainer.loop

    def loop(self, run, hooks):
        loops.append((original(self, run, hooks), [type(h) for h in hooks]))
        return loops[-1][0]

    monkeypatch.setattr(trainer.Trainer, "loop", loop)
    result = lf.lr_find(toy_task.config(), tmp_path, min_lr=1e-3, max_lr=1e6, steps=100)
    d = result.stopped_at
    assert result.diverged and d is not None and d < 99
    assert d < result.steps_run <= d + 10  # checked every 10 steps
    [(ran, hooks)] = loops
    assert hooks == [lf.LRFinderHook, ProgressHook]
    assert ran.stop_reason == "diverged" and ran.step == result.steps_run < ran.stop_at == 100
    assert len(result.losses) == len(result.lrs) == d + 1
    s = result.smoothed
    assert not np.isfinite(result.losses[d]) or s[d] > 4.0 * s[:d].min()
    assert all(s[i] <= 4.0 * s[:i].min() for i in range(1, d))
    assert result.suggestion in result.lrs[:d]
    _, rows = read_csv(result.csv_path)
    assert len(rows) == d + 1
    assert Path(result.png_path).read_bytes()[:8] == PNG_MAGIC


def test_8_device_mesh_equals_1_device_and_only_process_0_writes(tmp_path, monkeypatch):
    cfg8 = toy_task.config(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
    r8 = lf.lr_find(cfg8, tmp_path / "a", min_lr=1e-4, max_lr=0.1, steps=10)
    monkeypatch.setattr(lf, "_is_writer", lambda: False)  # as on process 1 of a multi-host run
    r1 = lf.lr_find(toy_task.config(), tmp_path / "b", min_lr=1e-4, max_lr=0.1, steps=10,
                    devices=jax.devices()[:1])
    assert r8.steps_run == r1.steps_run == 10 and not r8.diverged
    np.testing.assert_allclose(r8.losses, r1.losses, rtol=1e-5)
    assert r1.csv_path is None and r1.png_path is None and not (tmp_path / "b").exists()
    assert Path(r8.csv_path) == tmp_path / "a" / "lr_find" / "lr_find.csv"


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_existing_run_is_untouched_and_the_sweep_starts_fresh(tmp_path, monkeypatch):
    run = Trainer(toy_task.config(train__steps=2, checkpoint__every=2), tmp_path).train()
    before = snapshot(tmp_path)
    assert any(str(p).startswith("checkpoints") for p in before)
    assert Path("metrics.jsonl") in before

    def forbidden(*args, **kwargs):
        raise AssertionError("the lr finder must not create a Checkpointer or MetricWriter")

    for module in (trainer, checkpoint):
        monkeypatch.setattr(module, "Checkpointer", forbidden)
    monkeypatch.setattr(trainer, "MetricWriter", forbidden)
    result = lf.lr_find(toy_task.config(), tmp_path, min_lr=1e-4, max_lr=1.0, steps=10)
    after = snapshot(tmp_path)
    assert sorted(p for p in after if p not in before) == [
        Path("lr_find/lr_find.csv"), Path("lr_find/lr_find.png")]
    assert {p: b for p, b in after.items() if p in before} == before  # byte-identical
    # a fresh state: the first loss is the fresh run's first loss, not the checkpoint's
    np.testing.assert_allclose(result.losses[0], run.loss_history[0][1], rtol=1e-6)


def test_cli_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.lr_find", f"--config={ROOT}/configs/clip.py:runlocal",
         f"--workdir={tmp_path}", "--config.train.progress_bar=False", "--steps=12",
         "--min_lr=1e-4", "--max_lr=1"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["lr_find"]
    header, rows = read_csv(tmp_path / "lr_find" / "lr_find.csv")
    assert header == ["step", "lr", "loss", "smoothed_loss"] and 2 <= len(rows) <= 12
    np.testing.assert_allclose(rows[:, 1], 1e-4 * 1e4 ** (np.arange(len(rows)) / 11))
    assert (tmp_path / "lr_find" / "lr_find.png").read_bytes()[:8] == PNG_MAGIC
    assert "Suggested learning rate" in proc.stderr
    assert "jaxtrain.main --config=" in proc.stderr and "--config.optim.lr=" in proc.stderr
