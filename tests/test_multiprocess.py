"""Multi-process training: 2 processes x 4 CPU devices over gloo equal 1 process x 8 devices,
and checkpoints move between the two (launch/local_multiprocess.sh, as users run it); a tiny
MoE language model with its experts split across the two processes does the same."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The tiny CLIP run of these tests and of test_faults. A constant learning rate after warmup
# keeps `train.steps` out of the compiled step, so a run resumed with more steps (or another
# test's run with other steps) reads the step from the session's compilation cache. The
# cadences (log, eval, checkpoint) are not compiled in: each test sets its own.
CLIP = ["--config.optim.warmup_steps=2", "--config.optim.schedule=constant",
        "--config.train.progress_bar=False"]
FLAGS = [*CLIP, "--config.train.log_every=2", "--config.eval.every=6",
         "--config.checkpoint.every=3"]
RECALL = "eval/retrieval/mean_recall@1"


def command(workdir, steps, processes, config="clip.py:runlocal", flags=FLAGS) -> list[str]:
    """`python -m jaxtrain.main` on 1 process x 8 devices, or through
    launch/local_multiprocess.sh on `processes` x 4 devices."""
    config = f"--config={ROOT}/configs/{config},steps={steps}"
    if processes == 1:
        return [sys.executable, "-m", "jaxtrain.main", config, f"--workdir={workdir}", *flags]
    return [str(ROOT / "launch" / "local_multiprocess.sh"), str(processes), "4", "--", config,
            f"--workdir={workdir}", *flags]


def environment() -> dict[str, str]:
    """This session's environment (tests/conftest.py: XLA flags, compilation cache), with this
    Python first on PATH for the launcher's `python`."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def run(workdir, steps, processes, config="clip.py:runlocal", flags=FLAGS):
    proc = subprocess.run(command(workdir, steps, processes, config, flags), env=environment(),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def losses(workdir, metric=RECALL):
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    evals = {r["step"]: r[metric] for r in records if metric in r}
    return train, evals


@pytest.mark.slow
def test_two_processes_equal_one_and_checkpoints_cross_over(tmp_path):
    # 6 steps, checkpoints at 3 and 6: every step of a 2-process CPU run is slow (its
    # collectives go over gloo), and so is every process start: 4 runs test it all
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 6, processes=1)
    log = run(two, 6, processes=2)
    assert "process 0 of 2, 4 local / 8 global devices" in log
    (train1, eval1), (train2, eval2) = losses(one), losses(two)
    assert sorted(train1) == sorted(train2) == [2, 4, 6]
    np.testing.assert_allclose([train2[s] for s in train1], list(train1.values()), rtol=1e-5)
    assert sorted(eval1) == sorted(eval2) == [6]
    assert eval1 == pytest.approx(eval2)
    # only process 0 writes metrics and tensorboard; every process wrote its data position
    data = sorted(p.name for p in (two / "checkpoints" / "6" / "data").glob("*.json"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]

    # written by 2 processes, resumed by 1 (from step 6)
    assert "restored by 1" in run(two, 8, processes=1)
    # written by 1 process, resumed by 2 - from step 3: the newest checkpoint (6) is unreadable,
    # so process 0 moves it aside and both resume from the one before (and process 0 alone held
    # the workdir lock, released at the end). Both ways end with the same step-8 loss.
    for f in (one / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and "ocdbt" in str(f):
            f.write_bytes(b"garbage")
    log = run(one, 8, processes=2)
    assert "restored by 2" in log
    assert f"Moved the unreadable checkpoint {one}/checkpoints/6 aside" in log
    assert f"Resuming from {one}/checkpoints/3" in log
    assert (one / "checkpoints" / "6.corrupt").is_dir()
    (train1, _), (train2, _) = losses(one), losses(two)
    assert train1[8] == pytest.approx(train2[8], rel=1e-5)
    assert sorted(train1) == sorted(train2) == [2, 4, 6, 8]
    assert not (one / "jaxtrain.lock").exists()


@pytest.mark.slow
def test_tiny_moe_lm_on_two_processes_equals_one(tmp_path):
    # 5 steps, each logged (a 2-process step costs ~1 CPU-second over gloo)
    flags = ["--config.train.progress_bar=False", "--config.mesh.expert=2",
             "--config.mesh.fsdp=2", "--config.eval.every=5", "--config.train.log_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 5, 1, "moe.py:runlocal", flags)
    run(two, 5, 2, "moe.py:runlocal", flags)
    (train1, eval1), (train2, eval2) = losses(one, "eval/val/loss"), losses(two, "eval/val/loss")
    assert sorted(train1) == sorted(train2) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([train2[s] for s in train1], list(train1.values()), rtol=1e-5)
    assert sorted(eval1) == sorted(eval2) == [5]
    assert list(eval2.values()) == pytest.approx(list(eval1.values()), rel=1e-5)
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert records[-2]["train/tokens_seen"] == 5 * 8 * 32  # steps x rows x tokens
