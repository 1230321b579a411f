"""Device prefetch (jaxtrain/prefetch.py): same batches, bounded read-ahead, exact resume."""

from __future__ import annotations

import json
import threading
import time

import jax
import numpy as np
import pytest

from jaxtrain import Trainer
from jaxtrain import mesh as mesh_lib
from jaxtrain.data import pipeline
from jaxtrain.prefetch import DevicePrefetcher, device_prefetch
from tests import toy_task


def _source(n=64):
    return [{"x": np.full((3,), i, np.float32)} for i in range(n)]


def _grain_iter(seed=0):
    return pipeline.train_iterator(_source(), batch_size=8, seed=seed)


class _Counting:
    """Batches 0, 1, ... with a position state; counts the reads (and can fail at one)."""

    def __init__(self, n, fail_at=-1):
        self.n, self.pos, self.reads, self.fail_at = n, 0, 0, fail_at

    def __next__(self):
        if self.pos == self.fail_at:
            raise OSError(f"disk gone at batch {self.pos}")
        if self.pos == self.n:
            raise StopIteration
        self.reads += 1
        self.pos += 1
        return self.pos - 1

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]


def test_same_batches_and_state_as_the_iterator_itself():
    mesh = mesh_lib.make_mesh({"data": -1})
    put = lambda b: mesh_lib.shard_batch(b, mesh)  # noqa: E731
    plain, raw = _grain_iter(), _grain_iter()
    it = device_prefetch(raw, put, 2)
    for _ in range(5):
        want = next(plain)
        got = next(it)
        assert isinstance(got["x"], jax.Array) and len(got["x"].sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(got["x"]), want["x"])
        # the state is the consumed batch's, although the thread has read ahead
        assert it.get_state() == plain.get_state()
    saved = it.get_state()
    expected = [next(plain)["x"] for _ in range(3)]
    it.set_state(saved)  # drops the read-ahead batches, repositions
    np.testing.assert_array_equal(np.stack([np.asarray(next(it)["x"]) for _ in range(3)]),
                                  np.stack(expected))
    it.close()  # the raw iterator is left after the last batch handed out
    assert raw.get_state() == plain.get_state()
    np.testing.assert_array_equal(next(raw)["x"], next(plain)["x"])


@pytest.mark.parametrize("size", [1, 2, 3])
def test_reads_at_most_size_batches_ahead(size):
    counting = _Counting(1000)
    it = DevicePrefetcher(counting, put=lambda b: b, size=size)
    assert next(it) == 0
    for consumed in range(1, 4):
        time.sleep(0.05)  # let the thread fill its buffer
        assert counting.reads == consumed + size
        assert next(it) == consumed
    it.close()  # the reads ahead are undone
    assert counting.pos == 4 and next(it) == 4
    it.close()
    assert not any(t.name == "jaxtrain-device-prefetch" for t in threading.enumerate())


def test_errors_surface_at_the_batch_that_failed():
    it = DevicePrefetcher(_Counting(10, fail_at=3), put=lambda b: b, size=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="disk gone at batch 3"):
        next(it)
    bad_put = DevicePrefetcher(_Counting(10), put=lambda b: 1 / (b - 2), size=2)
    next(bad_put), next(bad_put)
    with pytest.raises(ZeroDivisionError):
        next(bad_put)
    assert list(DevicePrefetcher(_Counting(3), put=lambda b: b, size=2)) == [0, 1, 2]
    with pytest.raises(ValueError, match="size must be >= 0"):
        device_prefetch(iter(()), lambda b: b, -1)


@pytest.mark.slow
def test_resume_with_prefetch_matches_the_uninterrupted_run(tmp_path):
    """Stopped at step 3 with batches 4 and 5 already read ahead: the checkpoint holds the data
    position after batch 3, and the resumed run's losses equal the uninterrupted run's."""
    cfg = lambda **kw: toy_task.config(train__prefetch_to_device=2, **kw)  # noqa: E731
    full = Trainer(cfg(), tmp_path / "full").train()
    off = Trainer(toy_task.config(train__prefetch_to_device=0), tmp_path / "off").train()
    np.testing.assert_array_equal([x for _, x in full.loss_history],
                                  [x for _, x in off.loss_history])  # prefetch changes nothing
    first = Trainer(cfg(), tmp_path / "resumed").train(stop_at_step=3)
    assert first.final_step == 3
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / "3" / "data" /
                        "process_0-of-1.json").read_text())
    reference = _toy_iterator_after(3)
    assert saved == json.loads(json.dumps(reference))
    second = Trainer(cfg(), tmp_path / "resumed").train()
    assert [s for s, _ in second.loss_history] == list(range(4, 9))
    np.testing.assert_array_equal([x for _, x in second.loss_history],
                                  [x for _, x in full.loss_history[3:]])


def _toy_iterator_after(steps: int) -> dict:
    cfg = toy_task.config()
    task = toy_task.RegressionTask(cfg)
    it = task.train_iterator(seed=cfg.seed, batch_size=cfg.train.batch_size, process_index=0,
                             process_count=1)
    for _ in range(steps):
        next(it)
    return it.get_state()
