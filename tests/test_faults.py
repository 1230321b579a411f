"""Faults on real runs: SIGTERM and Ctrl-C save, exit 42 and the re-run resumes where it stopped;
kill -9 at any moment (mid-save, mid-rotation) loses nothing; a full disk, a second run in the
workdir, unreadable checkpoints and bad flags end with one message and the documented exit code.
(The same faults in process: test_recovery.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_multiprocess import CLIP, command, environment

ROOT = Path(__file__).resolve().parents[1]

# A toy run in its own process: 80 steps, checkpoint every 10 (3 kept), final params saved as
# .npz. KILL_AT=<where>:<n> makes it kill -9 itself at the n-th time it reaches `where`:
#   save    an async checkpoint write has just been started (its files are being written)
#   commit  a written checkpoint is about to be committed (renamed from its temporary name)
#   rotate  an old checkpoint is half deleted by rotation
TOY_RUN = """
import os, pathlib, signal, sys, numpy as np, jax
from tests import toy_task
from jaxtrain import Trainer

where, _, n = os.environ.get("KILL_AT", "::").partition(":")
hits = [0]

def reached():
    hits[0] += 1
    if hits[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)

if where == "save":
    from orbax.checkpoint import StandardCheckpointHandler as H
    save = H.async_save
    async def async_save(self, *args, **kwargs):
        futures = await save(self, *args, **kwargs)
        reached()
        return futures
    H.async_save = async_save
elif where == "commit":
    from orbax.checkpoint._src.path.atomicity import AtomicRenameTemporaryPath as P
    finalize = P.finalize
    async def commit(self, *args, **kwargs):
        reached()
        return await finalize(self, *args, **kwargs)
    P.finalize = commit
elif where == "rotate":
    from orbax.checkpoint._src.path.deleter import PathDeleter
    delete = PathDeleter.delete
    def half_delete(self, path, *args, **kwargs):
        files = sorted(p for p in pathlib.Path(str(path)).rglob("*") if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        reached()
        return delete(self, path, *args, **kwargs)
    PathDeleter.delete = half_delete

cfg = toy_task.config(train__steps=80, checkpoint__every=10, train__log_every=5, eval__every=40)
result = Trainer(cfg, sys.argv[1]).train()
leaves = jax.tree.leaves(jax.device_get(result.final_state.params))
np.savez(os.path.join(sys.argv[1], "final.npz"), *leaves)
"""

# The toy task through the command line (fast: a tiny model), for exit codes and messages.
TOY_CLI = [sys.executable, "-m", "jaxtrain.main", f"--config={ROOT}/tests/toy_config.py"]

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


def toy(workdir, kill_at=""):
    return subprocess.Popen(
        [sys.executable, "-c", TOY_RUN, str(workdir)],
        env={**env(), "KILL_AT": kill_at},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def final_params(workdir):
    with np.load(workdir / "final.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted toy run (in its own process) that both kill -9 tests' runs must equal,
    bit for bit: run once for the module."""
    workdir = tmp_path_factory.mktemp("toy_reference")
    proc = toy(workdir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    return workdir


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_equals_uninterrupted(tmp_path, reference):
    killed = tmp_path / "killed"
    for kill_at in (12, 40, 71):  # mid-interval, near a save, just past a save
        proc = toy(killed)
        wait_for_step(killed, kill_at, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = toy(killed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    for a, b in zip(final_params(killed), final_params(reference), strict=True):
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


@pytest.mark.slow
def test_kill_9_mid_save_mid_commit_and_mid_rotation_then_resume_equals_uninterrupted(
        tmp_path, reference):
    killed = tmp_path / "killed"
    # save 2 = step 20 mid-write; then (resumed from 10) the 2nd commit (of step 20: Orbax
    # commits each checkpoint's items, then the checkpoint); then the first rotation after that
    # resume (a 4th checkpoint pushes the oldest out, keep=3)
    for kill_at in ("save:2", "commit:2", "rotate:1"):
        proc = toy(killed, kill_at)
        assert proc.wait(timeout=300) == -signal.SIGKILL, (kill_at, proc.stderr.read()[-3000:])
    proc = toy(killed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    for a, b in zip(final_params(killed), final_params(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = train_steps(killed)
    assert steps == sorted(set(steps)) and steps[-1] == 80


def toy_cli(workdir, *flags, timeout=300):
    return subprocess.run([*TOY_CLI, f"--workdir={workdir}", *flags], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unknown_config_key_is_one_message_and_exit_2(tmp_path):
    proc = toy_cli(tmp_path, "--config.train.stepz=3", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Unknown config key 'stepz' Did you mean \"steps\" instead of \"stepz\"?"]


@pytest.mark.slow
def test_no_readable_checkpoint_exits_2_and_start_over_moves_them_aside(tmp_path):
    assert toy_cli(tmp_path, "--config.train.steps=8").returncode == 0
    for step in (4, 8):
        for f in (tmp_path / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file() and "ocdbt" in str(f):
                f.write_bytes(b"garbage")
    proc = toy_cli(tmp_path, "--config.train.steps=8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for step in (4, 8):
        assert f"{tmp_path}/checkpoints/{step}:" in proc.stderr
    assert "if_unreadable=start_over" in proc.stderr
    proc = toy_cli(tmp_path, "--config.train.steps=8",
                   "--config.checkpoint.if_unreadable=start_over")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "4", "4.corrupt", "8", "8.corrupt"]


def test_checkpoints_path_being_a_file_exits_3_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("")
    proc = toy_cli(tmp_path, timeout=120)  # was: a 5-minute Orbax timeout
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (a disk that fills up), remountable bigger; needs mount rights."""
    path = tmp_path / "disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk case is covered in "
                    "process by test_recovery.py")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_exits_3_with_one_message_and_the_resume_loses_nothing(tmp_path, small_disk):
    flags = ["--config.train.steps=100", "--config.checkpoint.every=10",
             "--config.checkpoint.keep=100", "--config.train.log_every=5"]
    assert toy_cli(tmp_path / "ref", *flags).returncode == 0
    run = small_disk / "run"
    proc = toy_cli(run, *flags)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # no flood: the INFO lines (start-up status, step logs: as many as steps ran before the disk
    # filled) aside, a few library lines about the failed write and one message of ours
    assert len([x for x in proc.stderr.splitlines() if not x.startswith("I")]) < 30, \
        proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if "cli.py" in x]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr[-3000:]
    # where the disk fills depends on what else was written first (events, metrics)
    on_disk = re.search(r"Checkpoints on disk: \[((?:\d+, )*\d+)\]", errors[0])
    assert on_disk and on_disk.group(1).startswith("10"), errors[0]
    last = on_disk.group(1).split(", ")[-1]
    assert f"re-running the same command resumes from step {last}." in errors[0]
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    proc = toy_cli(run, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from jaxtrain.checkpoint import read_state

    got, want = read_state(str(run))[1]["params"], read_state(str(tmp_path / "ref"))[1]["params"]
    for a, b in zip(jax_leaves(got), jax_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = train_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == 100


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


FOREVER_TOY = ["--config.train.steps=100000", "--config.checkpoint.every=0",
               "--config.eval.every=0", "--config.train.log_every=5"]


def toy_forever(workdir):
    return subprocess.Popen([*TOY_CLI, f"--workdir={workdir}", *FOREVER_TOY], env=env(),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_a_second_run_in_the_workdir_is_refused_and_a_killed_runs_lock_is_recovered(tmp_path):
    first = toy_forever(tmp_path)
    try:
        wait_for_step(tmp_path, 5, first)
        second = toy_cli(tmp_path, "--config.train.steps=3")
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"in use by another jaxtrain run (pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.kill()  # kill -9: its lock stays behind, stale
        first.wait()
    assert (tmp_path / "jaxtrain.lock").exists()
    third = toy_cli(tmp_path, "--config.train.steps=3")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"Recovered a stale lock on {tmp_path} (pid {first.pid}" in third.stderr
    assert not (tmp_path / "jaxtrain.lock").exists()


@pytest.mark.slow
def test_ctrl_c_saves_exits_42_and_the_rerun_resumes(tmp_path):
    proc = toy_forever(tmp_path)
    wait_for_step(tmp_path, 10, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 42, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C: saving a checkpoint" in err and "re-run the same command to resume" in err
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 10
    rerun = toy_cli(tmp_path, f"--config.train.steps={saved[0] + 5}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {tmp_path}/checkpoints/{saved[0]}" in rerun.stderr


@pytest.mark.slow
def test_bad_data_through_the_command_line_is_exit_2_naming_file_and_line(tmp_path):
    """A caption that is not UTF-8, in a CLIP run's jsonl: one message, before compiling."""
    from PIL import Image

    from tests.test_bad_data import N, _pairs

    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):  # _pairs' rows point at img/<i>.png
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(
            tmp_path / "img" / f"{i}.png")
    bad = b'{"image": "img/5.png", "text": "caf\xe9"}'  # Latin-1, not UTF-8
    data = _pairs(tmp_path / "pairs.jsonl", lines={5: bad})
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", f"--config={ROOT}/configs/clip.py:runlocal",
         f"--workdir={tmp_path / 'run'}", f"--config.data.name={data}",
         "--config.data.tokenizer=gpt2", "--config.model.vocab_size=50304"],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = [x for x in proc.stderr.splitlines() if "cli.py" in x]
    assert len(error) == 1 and "Line 6 (row 5)" in error[0] and "pairs.jsonl" in error[0]
    assert "not UTF-8" in error[0] and "on_bad_row='skip'" in error[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any step


def test_brief_names_the_os_error_tensorstore_gives_only_by_number():
    """Orbax (tensorstore) ends a full-disk error with "[os_error_code='28']" after a long spec,
    whose middle `brief` cuts: the reason must still be in the message."""
    from jaxtrain.errors import brief

    error = ValueError("RESOURCE_EXHAUSTED: Error writing 'step/.zarray': Failed to write 271 "
                       "bytes to file 9: No space left on device [tensorstore_spec=" + "x" * 2000
                       + " [os_error_code='28']")  # the reason in the middle, which is cut
    assert brief(error, 240).endswith("(No space left on device)")
    assert len(brief(error, 240)) <= 240
    plain = OSError(28, "No space left on device")
    assert brief(plain).count("No space left on device") == 1
