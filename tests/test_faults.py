"""Faults on real runs: SIGTERM saves, exits 42 and the re-run resumes where it stopped; kill -9
at any moment loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_multiprocess import CLIP, command, environment

ROOT = Path(__file__).resolve().parents[1]

# A toy run in its own process: 80 steps, checkpoint every 10, final params saved as .npz.
TOY_RUN = """
import os, sys, numpy as np, jax
from tests import toy_task
from jaxtrain import Trainer
cfg = toy_task.config(train__steps=80, checkpoint__every=10, train__log_every=5, eval__every=40)
result = Trainer(cfg, sys.argv[1]).train()
leaves = jax.tree.leaves(jax.device_get(result.final_state.params))
np.savez(os.path.join(sys.argv[1], "final.npz"), *leaves)
"""

# The tiny CLIP run of test_multiprocess (the same compiled step: the first of these tests to
# run compiles it for the others), logging every 5 steps, run "forever" until a signal: no
# evaluation and no periodic checkpoint, so the only checkpoint is the one SIGTERM writes.
FOREVER = [*CLIP, "--config.train.log_every=5", "--config.eval.every=0",
           "--config.checkpoint.every=0"]


def env():
    return {**environment(), "PYTHONPATH": str(ROOT)}


def wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if path.exists():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step}")


def train_steps(workdir: Path) -> list[int]:
    """The steps of the train records in metrics.jsonl, in file order."""
    return [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in x]


def toy(workdir):
    return subprocess.Popen(
        [sys.executable, "-c", TOY_RUN, str(workdir)],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def final_params(workdir):
    with np.load(workdir / "final.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_equals_uninterrupted(tmp_path):
    reference = toy(tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    killed = tmp_path / "killed"
    for kill_at in (12, 40, 71):  # mid-interval, near a save, just past a save
        proc = toy(killed)
        wait_for_step(killed, kill_at, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = toy(killed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    for a, b in zip(final_params(killed), final_params(tmp_path / "ref"), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = train_steps(killed)
    assert steps == sorted(set(steps)) and steps[-1] == 80


@pytest.mark.slow
def test_sigterm_saves_exits_42_and_resumes(tmp_path):
    cmd = command(tmp_path, 100000, processes=1, flags=FOREVER)
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(tmp_path, 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 42, err[-3000:]
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 10
    # the same command with more steps resumes from that checkpoint instead of starting over
    rerun = subprocess.run(
        command(tmp_path, saved[0] + 5, processes=1, flags=FOREVER),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {tmp_path}/checkpoints/{saved[0]}" in rerun.stderr
    steps = train_steps(tmp_path)  # continued: no step logged twice, none lost
    assert steps == sorted(set(steps)) and steps[0] == 5 and steps[-1] == saved[0] + 5


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_with_a_checkpoint(tmp_path):
    launcher = subprocess.Popen(
        command(tmp_path, 100000, processes=2, flags=FOREVER),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path, 5, launcher)
    # this run's process 1 only (by its workdir): other tests may run 2-process jobs meanwhile
    listed = subprocess.run(["pgrep", "-af", "process_id=1"], capture_output=True,
                            text=True).stdout.splitlines()
    worker = [line.split()[0] for line in listed
              if f"--workdir={tmp_path} " in line + " " and "jaxtrain.main" in line]
    assert len(worker) == 1, listed
    os.kill(int(worker[0]), signal.SIGTERM)
    try:
        _, err = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # leave no endless run behind for the rest of the suite
        subprocess.run(["pkill", "-KILL", "-f", "--", f"--workdir={tmp_path}"], check=False)
        raise
    assert launcher.returncode == 42, err[-3000:]
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] % 5 == 0  # both stopped at the same log step
    data = sorted(p.name for p in (tmp_path / "checkpoints" / str(saved[0]) / "data").iterdir())
    assert "process_1-of-2.json" in data
