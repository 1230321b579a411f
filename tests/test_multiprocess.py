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
FLAGS = ["--config.optim.warmup_steps=2", "--config.train.progress_bar=False",
         "--config.train.log_every=5", "--config.eval.every=20", "--config.checkpoint.every=10"]


def run(workdir, steps, processes, config="clip.py:runlocal", flags=FLAGS):
    config = f"--config={ROOT}/configs/{config},steps={steps}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "JAXTRAIN_XLA_FLAGS": "--xla_backend_optimization_level=0"}
    if processes == 1:
        cmd = [sys.executable, "-m", "jaxtrain.main", config, f"--workdir={workdir}", *flags]
    else:
        cmd = [str(ROOT / "launch" / "local_multiprocess.sh"), str(processes), "4", "--",
               config, f"--workdir={workdir}", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def losses(workdir, metric="eval/mean_recall@1"):
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    evals = {r["step"]: r[metric] for r in records if metric in r}
    return train, evals


@pytest.mark.slow
def test_two_processes_equal_one_and_checkpoints_cross_over(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 20, processes=1)
    log = run(two, 20, processes=2)
    assert "process 0 of 2, 4 local / 8 global devices" in log
    (train1, eval1), (train2, eval2) = losses(one), losses(two)
    assert sorted(train1) == sorted(train2) == [5, 10, 15, 20]
    np.testing.assert_allclose([train2[s] for s in train1], list(train1.values()), rtol=1e-5)
    assert eval1 == pytest.approx(eval2)
    # only process 0 writes metrics and tensorboard; every process wrote its data position
    data = sorted(p.name for p in (two / "checkpoints" / "20" / "data").glob("*.json"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]

    # written by 2 processes, resumed by 1 - and the other way round: the same step-30 loss
    assert "restored by 1" in run(two, 30, processes=1)
    assert "restored by 2" in run(one, 30, processes=2)
    (train1, _), (train2, _) = losses(one), losses(two)
    assert train1[30] == pytest.approx(train2[30], rel=1e-5)
    assert sorted(train1) == sorted(train2) == [5, 10, 15, 20, 25, 30]


@pytest.mark.slow
def test_tiny_moe_lm_on_two_processes_equals_one(tmp_path):
    flags = ["--config.train.progress_bar=False", "--config.mesh.expert=2",
             "--config.mesh.fsdp=2", "--config.eval.every=10"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 10, 1, "moe.py:runlocal", flags)
    run(two, 10, 2, "moe.py:runlocal", flags)
    (train1, eval1), (train2, eval2) = losses(one, "eval/loss"), losses(two, "eval/loss")
    assert sorted(train1) == sorted(train2) == [5, 10]
    np.testing.assert_allclose([train2[s] for s in train1], list(train1.values()), rtol=1e-5)
    assert list(eval2.values()) == pytest.approx(list(eval1.values()), rel=1e-5)
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert records[-2]["train/tokens_seen"] == 10 * 8 * 32  # steps x rows x tokens
