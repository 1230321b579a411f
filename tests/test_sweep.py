"""Hyperparameter sweeps: grid order, random reproducibility, Bayesian search with Optuna,
resuming an interrupted sweep, workers, early stopping, the results table, the CLI, the errors."""

import csv
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from jaxtrain import trainer as trainer_lib
from jaxtrain.sweep import (
    RepeatedFailureError,
    SweepError,
    Trial,
    apply_params,
    load_results,
    load_sweep,
    rank_trials,
    run_sweep,
    trial_plan,
    workers_from_env,
)
from jaxtrain.sweep import report as report_lib
from jaxtrain.sweep import runner as runner_lib
from tests import toy_task

ROOT = Path(__file__).resolve().parents[1]


def toy(**overrides):
    c = toy_task.config(**overrides)
    c.lock()
    return c


def grid(parameters, metric="eval/val/loss", mode="min"):
    return {"method": "grid", "metric": metric, "mode": mode, "parameters": parameters}


def trial_json(workdir, index):
    return json.loads((Path(workdir) / f"trial_{index:04d}" / "trial.json").read_text())


@pytest.fixture
def runs(monkeypatch):
    """Records every finished Trainer.train call as (trial dir name, its first trained step, or
    None when it had nothing left to train)."""
    calls = []
    original = trainer_lib.Trainer.train

    def train(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        first = result.loss_history[0][0] if result.loss_history else None
        calls.append((Path(self.workdir).name, first))
        return result

    monkeypatch.setattr(trainer_lib.Trainer, "train", train)
    return calls


def interrupt_at(monkeypatch, n):
    """Raise KeyboardInterrupt (as a killed process would stop) on the n-th train step."""
    original = trainer_lib.Trainer.compiled_step
    count = [0]

    def compiled_step(self, state, batch):
        count[0] += 1
        if count[0] == n:
            raise KeyboardInterrupt
        return original(self, state, batch)

    monkeypatch.setattr(trainer_lib.Trainer, "compiled_step", compiled_step)


# ---------------------------------------------------------------------------------------------
# The search space, without training


def test_grid_enumerates_the_product_in_file_order():
    sweep = load_sweep(grid({"optim.lr": {"values": [0.1, 0.2, 0.3]},
                             "optim.name": {"values": ["adamw", "sgd"]}}), toy())
    assert sweep.size == 6
    expected = [{"optim.lr": lr, "optim.name": n} for lr in (0.1, 0.2, 0.3)
                for n in ("adamw", "sgd")]  # the last parameter varies fastest
    assert [p for _, p in trial_plan(sweep)] == expected
    assert trial_plan(sweep, worker=1, num_workers=4) == [(1, expected[1]), (5, expected[5])]
    base = toy()
    cfg = apply_params(base, sweep.params(3))
    assert (cfg.optim.lr, cfg.optim.name) == (0.2, "sgd")
    assert (base.optim.lr, base.optim.name) == (1e-2, "adamw")  # the original is untouched


def test_random_params_depend_only_on_seed_and_index():
    params = {"optim.lr": {"min": 1e-4, "max": 1e-1, "log": True},
              "optim.warmup_steps": {"min": 0, "max": 5, "int": True},
              "optim.name": {"values": ["adamw", "sgd", "lion"]}}
    raw = {"method": "random", "metric": "eval/val/loss", "mode": "min", "num_trials": 400,
           "seed": 3, "parameters": params}
    sweep = load_sweep(raw, toy())
    alone = trial_plan(sweep)
    split = sorted((t for w in range(3) for t in trial_plan(sweep, w, 3)), key=lambda t: t[0])
    assert split == alone  # 3 workers draw exactly what one worker draws
    assert load_sweep(raw, toy()).params(7) == alone[7][1]
    assert load_sweep({**raw, "seed": 4}, toy()).params(0) != alone[0][1]
    # another parameter added to the file leaves the others' draws as they were
    more = load_sweep({**raw, "parameters": {**params, "optim.b1": {"min": 0.8, "max": 0.95}}},
                      toy())
    assert more.params(7)["optim.lr"] == alone[7][1]["optim.lr"]
    lrs = np.array([p["optim.lr"] for _, p in alone])
    assert lrs.min() >= 1e-4 and lrs.max() <= 1e-1
    assert abs(np.median(np.log10(lrs)) + 2.5) < 0.25  # log-uniform: median at 10^-2.5
    warmups = {p["optim.warmup_steps"] for _, p in alone}
    assert warmups == set(range(6)) and all(isinstance(w, int) for w in warmups)
    assert {p["optim.name"] for _, p in alone} == {"adamw", "sgd", "lion"}


def test_ranking_best_first_then_unfinished_then_failed():
    trials = [Trial(0, "failed", {}), Trial(1, "complete", {}, value=0.5),
              Trial(2, "running", {}), Trial(3, "early_stopped", {}, value=0.9),
              Trial(4, "complete", {}, value=0.1)]
    assert [t.index for t in rank_trials(trials, "max")] == [3, 1, 4, 2, 0]
    assert [t.index for t in rank_trials(trials, "min")] == [4, 1, 3, 2, 0]


def test_workers_default_from_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert workers_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert workers_from_env() == (2, 4)


def test_example_sweep_files_fit_the_clip_config():
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import clip

        config = clip.get_config("runlocal")
    finally:
        sys.path.pop(0)
    lr = load_sweep(ROOT / "sweeps/clip_lr.py", config)
    assert (lr.method, lr.size, lr.metric) == ("grid", 6, "eval/retrieval/mean_recall@1")
    assert lr.params(1) == {"optim.lr": 1e-3, "optim.weight_decay": 0.05}
    rand = load_sweep(ROOT / "sweeps/clip_random.py", config)
    assert rand.method == "random" and rand.size == 8
    assert all(0 <= p["optim.warmup_steps"] <= 20 for _, p in trial_plan(rand))
    bayes = load_sweep(ROOT / "sweeps/clip_bayes.py", config)
    assert bayes.method == "bayes" and bayes.startup_trials == 5


@pytest.mark.parametrize("raw, message", [
    ({"method": "grdi"}, "'method' must be one of grid, random, bayes; got 'grdi'. Did you mean "
                         "'grid'?"),
    ({"parameters": {"optim.lrr": {"values": [1.0]}}},
     "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'"),
    ({"parameters": {"optim.lr": {"min": 1e-3, "max": 1e-1}}}, "a grid needs 'values' lists"),
    ({"parameters": {}}, "'parameters' is empty"),
    ({"parameters": {"optim.lr": {"values": []}}}, "'values' must be a non-empty list"),
    ({"parameters": {"optim": {"values": [1]}}}, "names a config section"),
    ({"parameters": {"train.steps": {"values": [1.5]}}}, "'train.steps' must be int"),
    ({"parameters": {"optim.warmup_steps": {"values": [0, 100]}}},
     "grid trial 1 (optim.warmup_steps=100) gives an invalid config: Config key "
     "'optim.warmup_steps' (100) must be smaller than train.steps (8)."),
    ({"metric": "loss"}, "'metric' must name an eval metric"),
    ({"metric": "eval/loss"}, "'eval/<evaluator>/<metric>' such as 'eval/val/loss'"),
    ({"metric": "eval/vall/loss"}, "names the evaluator 'vall', which the config does not have. "
                                   "Did you mean 'val'? Its evaluators: ['val']"),
    ({"mode": "maximize"}, "'mode' must be 'max' or 'min'"),
    ({"num_trials": 4}, "'num_trials' is for random and bayes sweeps"),
    ({"metrics": "eval/val/loss"}, "unknown sweep key 'metrics'. Did you mean 'metric'?"),
    ({"method": "random"}, "a random sweep needs 'num_trials'"),
    ({"method": "random", "num_trials": 2,
      "parameters": {"train.steps": {"min": 4, "max": 8}}}, "add \"int\": True"),
    ({"method": "random", "num_trials": 2,
      "parameters": {"optim.lr": {"min": 0.0, "max": 1.0, "log": True}}}, "needs min > 0"),
    ({"method": "random", "num_trials": 2,
      "parameters": {"optim.lr": {"min": 1e-3, "max": 1e-2, "lg": True}}},
     "unknown spec key 'lg'. Did you mean 'log'?"),
])
def test_sweep_file_errors_name_the_file_and_the_fix(tmp_path, raw, message):
    sweep = {**grid({"optim.lr": {"values": [1e-3]}}), **raw}
    path = tmp_path / "my_sweep.py"
    path.write_text(f"def get_sweep():\n    return {sweep!r}\n")
    with pytest.raises(SweepError) as e:
        load_sweep(path, toy())
    assert str(e.value).startswith(f"{path}: "), e.value
    assert message in str(e.value), e.value


def test_bayes_without_optuna_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    raw = {"method": "bayes", "metric": "eval/val/loss", "mode": "min", "num_trials": 2,
           "parameters": {"optim.lr": {"min": 1e-3, "max": 1e-1, "log": True}}}
    with pytest.raises(SweepError, match=r"pip install optuna \(or pip install -e "):
        load_sweep(raw, toy())
    # grid and random sweeps never import it
    load_sweep({**raw, "method": "random"}, toy())


def test_another_search_space_in_the_same_workdir_is_an_error(tmp_path, runs):
    space = grid({"optim.lr": {"values": [1e-2, 2e-2]}})
    result = run_sweep(toy(), space, tmp_path, max_trials=0)  # records sweep.json only
    assert result.trials == [] and runs == []
    assert json.loads((tmp_path / "sweep.json").read_text())["size"] == 2
    with pytest.raises(SweepError, match=r"another search space \(parameter 'optim.lr' differ"):
        run_sweep(toy(), grid({"optim.lr": {"values": [1e-2, 5e-2]}}), tmp_path)
    with pytest.raises(SweepError, match=r"\(method, seed differ"):
        run_sweep(toy(), {**space, "method": "random", "num_trials": 2}, tmp_path)


# ---------------------------------------------------------------------------------------------
# Sweeps that train (the toy regression task: 8 steps, evaluations at steps 4 and 8)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, runs):
    space = grid({"optim.lr": {"values": [1e-2, 3e-2]}})
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        interrupt_at(mp, 8 + 6)  # killed in trial 1 at step 6, after its checkpoint at step 4
        run_sweep(toy(), space, tmp_path)
    assert runs == [("trial_0000", 1)]
    assert [trial_json(tmp_path, i)["status"] for i in (0, 1)] == ["complete", "running"]
    # the trial's hook recorded its progress at the step-4 evaluation, before the interruption
    step4 = [json.loads(x) for x in (tmp_path / "trial_0001/metrics.jsonl").open()
             if "eval/val/loss" in x]
    assert [r["step"] for r in step4] == [4]
    assert trial_json(tmp_path, 1)["progress"] == {
        "step": 4, "value": step4[0]["eval/val/loss"], "best_step": 4}
    runs.clear()

    result = run_sweep(toy(), space, tmp_path)
    # trial 0 is not run again; trial 1 resumes from its checkpoint (step 5 is its first step)
    assert runs == [("trial_0001", 5)]
    assert result.ran == [1] and result.finished
    for i, lr in enumerate((1e-2, 3e-2)):
        record = trial_json(tmp_path, i)
        assert record["status"] == "complete" and record["params"] == {"optim.lr": lr}
        assert record["best_step"] in (4, 8) and record["final_step"] == 8
        assert json.loads((tmp_path / f"trial_{i:04d}/config.json").read_text())["optim"][
            "lr"] == lr
        evals = [json.loads(x) for x in (tmp_path / f"trial_{i:04d}/metrics.jsonl").open()
                 if "eval/val/loss" in x]
        assert record["value"] == min(r["eval/val/loss"] for r in evals)  # best over evaluations
        assert record["progress"] == {"step": 8, "value": record["value"],
                                      "best_step": record["best_step"]}
    assert [t.index for t in result.trials] == sorted(
        (0, 1), key=lambda i: trial_json(tmp_path, i)["value"])  # mode min: lowest first

    runs.clear()
    assert run_sweep(toy(), space, tmp_path).ran == [] and runs == []  # all done: nothing runs


def test_workers_split_trials_and_the_merged_table_ranks_all(tmp_path, runs):
    base = toy(train__steps=12, eval__early_stop_metric="eval/val/loss",
               eval__early_stop_mode="min",
               eval__min_delta=100.0, checkpoint__every=0)
    # patience 1 with an impossible min_delta stops at the 2nd evaluation (step 8); a batch of
    # 36 does not split over the 8 devices, so those trials fail (at once, before compiling)
    space = grid({"eval.patience": {"values": [1, 50]},
                  "train.batch_size": {"values": [32, 36]}})
    one = run_sweep(base, space, tmp_path, worker=1, num_workers=2, max_trials=1)
    assert one.ran == [1] and [t.status for t in one.trials] == ["failed"]
    assert "ConfigError: train.batch_size / train.accum_steps = 36" in one.trials[0].error
    one = run_sweep(base, space, tmp_path, worker=1, num_workers=2)
    assert one.ran == [3] and not one.finished and len(one.trials) == 2

    both = run_sweep(base, space, tmp_path, worker=0, num_workers=2)
    assert both.ran == [0, 2] and both.finished
    assert [name for name, _ in runs] == ["trial_0000", "trial_0002"]
    by_index = {t.index: t for t in both.trials}
    assert by_index[0].status == "early_stopped" and by_index[0].final_step == 8
    assert by_index[2].status == "complete" and by_index[2].final_step == 12
    ranked = [t.index for t in both.trials]
    assert ranked[2:] == [1, 3]  # failed last
    assert by_index[ranked[0]].value <= by_index[ranked[1]].value  # mode min
    assert both.best.index == ranked[0]

    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == ranked
    assert [r["status"] for r in rows][2:] == ["failed", "failed"]
    assert set(rows[0]) >= {"trial", "status", "eval/val/loss", "best_step", "eval.patience",
                            "train.batch_size", "error"}
    assert math.isclose(float(rows[0]["eval/val/loss"]), both.best.value)
    table = load_results(tmp_path).table()
    assert "early_stopped" in table and "trial 1 failed: ConfigError" in table
    assert run_sweep(base, space, tmp_path, worker=1, num_workers=2).ran == []
    assert run_sweep(base, space, tmp_path, worker=1, num_workers=2, retry_failed=True).ran == [
        1, 3]


def test_the_same_error_three_times_in_a_row_stops_the_sweep(tmp_path):
    space = grid({"optim.lr": {"values": [0.1, 0.2, 0.3, 0.4]}})
    with pytest.raises(RepeatedFailureError, match=r"same error: ConfigError: train.batch_size"):
        run_sweep(toy(train__batch_size=36), space, tmp_path)  # 36 does not split over 8
    assert [t.status for t in load_results(tmp_path).trials] == ["failed"] * 3  # not trial 3


def test_bayes_trials_are_told_recorded_and_resumed(tmp_path, runs):
    optuna = pytest.importorskip("optuna")
    space = {"method": "bayes", "metric": "eval/val/loss", "mode": "min", "num_trials": 2,
             "startup_trials": 1, "seed": 1,
             "parameters": {"optim.lr": {"min": 1e-3, "max": 1e-1, "log": True},
                            "model.hidden": {"values": [8, 16]}}}
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        interrupt_at(mp, 8 + 6)  # in the second trial, after its step-4 checkpoint
        run_sweep(toy(), space, tmp_path)
    runs.clear()

    def study():
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna_journal.log")))
        return optuna.load_study(study_name="jaxtrain", storage=storage)

    states = [t.state.name for t in study().trials]
    assert states == ["COMPLETE", "RUNNING"]
    asked = trial_json(tmp_path, 1)["params"]

    result = run_sweep(toy(), space, tmp_path)
    assert runs == [("trial_0001", 5)]  # trial 1 resumed at step 5
    assert result.ran == [1] and result.finished
    assert trial_json(tmp_path, 1)["params"] == asked  # the same values as first asked
    trials = study().trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    for t in trials:
        record = trial_json(tmp_path, t.number)
        assert record["status"] == "complete"
        assert t.value == record["value"] and t.params == record["params"]
        # every evaluation was reported to the study by the trial's hook (trial 1's step 4
        # before the interruption, its step 8 after the resume)
        evals = {r["step"]: r["eval/val/loss"] for r in map(json.loads, (
            tmp_path / f"trial_{t.number:04d}/metrics.jsonl").open()) if "eval/val/loss" in r}
        assert t.intermediate_values == evals and sorted(evals) == [4, 8]
        assert 1e-3 <= t.params["optim.lr"] <= 1e-1 and t.params["model.hidden"] in (8, 16)
    assert result.best.value == min(t.value for t in trials)

    runs.clear()
    assert run_sweep(toy(), space, tmp_path).ran == [] and runs == []  # 2 of 2 taken
    assert len(study().trials) == 2


def test_a_metric_the_task_does_not_record_is_an_error_then_fixable(tmp_path, runs):
    space = grid({"optim.lr": {"values": [1e-2]}}, metric="eval/val/los")
    with pytest.raises(SweepError, match=r"'eval/val/los' is not recorded.*\['eval/val/loss'\]"):
        run_sweep(toy(), space, tmp_path)
    assert trial_json(tmp_path, 0)["status"] == "running"
    result = run_sweep(toy(), {**space, "metric": "eval/val/loss"}, tmp_path)
    assert runs[-1] == ("trial_0000", None)  # resumed a finished run: no training again
    assert result.trials[0].status == "complete" and result.trials[0].value > 0


@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), ("90", 90.0), ("45s", 45.0), ("30m", 1800.0), ("2h", 7200.0),
    ("1h30m", 5400.0), ("1.5h", 5400.0), (None, None), ("", None)])
def test_timeout_accepts_seconds_and_durations(value, seconds):
    assert runner_lib.parse_timeout(value) == seconds


@pytest.mark.parametrize("value", ["2 hours", "-5", 0, "h", "30x", "1h-5m"])
def test_a_bad_timeout_is_an_error_naming_the_forms(value):
    with pytest.raises(SweepError, match=r"--timeout must be .* like '2h', '30m', '1h30m'"):
        runner_lib.parse_timeout(value)


@pytest.mark.slow
def test_timeout_stops_the_trial_in_flight_with_a_checkpoint_and_writes_the_table(
        tmp_path, runs, monkeypatch):
    """The clock advances one second per train step: with --timeout=6 trial 0 (4 steps)
    completes, trial 1 stops after its step 2 (the first step ending at/after 6 s) with a
    checkpoint, trial 2 does not start; a re-run resumes trial 1 at step 3."""
    steps = [0]
    original = trainer_lib.Trainer.compiled_step

    def compiled_step(self, state, batch):
        steps[0] += 1
        return original(self, state, batch)

    monkeypatch.setattr(trainer_lib.Trainer, "compiled_step", compiled_step)
    clock = types.SimpleNamespace(monotonic=lambda: float(steps[0]),
                                  perf_counter=time.perf_counter)
    monkeypatch.setattr(runner_lib, "time", clock)
    monkeypatch.setattr(report_lib, "time", clock)
    space = grid({"optim.lr": {"values": [1e-2, 2e-2, 3e-2]}})
    base = toy(train__steps=4, eval__every=2, checkpoint__every=4)
    result = run_sweep(base, space, tmp_path, timeout="6s")

    assert result.timed_out and result.ran == [0, 1] and not result.finished
    assert runs == [("trial_0000", 1), ("trial_0001", 1)]
    assert [(t.index, t.status, t.final_step) for t in result.trials] == [
        (0, "complete", 4), (1, "timeout", 2)]
    assert (tmp_path / "trial_0001/checkpoints/2").is_dir()  # stopped as a preemption would
    assert not (tmp_path / "trial_0002").exists()
    record = trial_json(tmp_path, 1)
    assert record["status"] == "timeout" and "finished_at" not in record
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], r["status"], r["optim.lr"]) for r in rows] == [
        ("0", "complete", "0.01"), ("1", "timeout", "0.02")]
    assert rows[0]["eval/val/loss"] and not rows[1]["eval/val/loss"]
    # each trial is a run named <sweep>/trial_<NNNN>, grouped by the sweep in W&B
    for i in (0, 1):
        cfg = json.loads((tmp_path / f"trial_{i:04d}/config.json").read_text())
        assert cfg["run_name"] == f"{tmp_path.name}/trial_{i:04d}"
        assert cfg["logging"]["wandb_group"] == tmp_path.name

    runs.clear()
    result = run_sweep(base, space, tmp_path)  # no timeout: resume trial 1, then trial 2
    assert runs == [("trial_0001", 3), ("trial_0002", 1)]
    assert result.finished and not result.timed_out
    assert sorted(t.status for t in result.trials) == ["complete"] * 3


def test_command_line_end_to_end(tmp_path):
    (tmp_path / "toy_config.py").write_text(
        "from tests import toy_task\n\n\ndef get_config():\n    c = toy_task.config()\n"
        "    c.lock()\n    return c\n")
    sweep = grid({"optim.lr": {"values": [1e-2, 5e-2]}})
    (tmp_path / "toy_sweep.py").write_text(f"def get_sweep():\n    return {sweep!r}\n")
    (tmp_path / "bad_sweep.py").write_text(
        f"def get_sweep():\n    return {grid({'optim.lrr': {'values': [1.0]}})!r}\n")
    workdir = tmp_path / "sweep"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jaxtrain.sweep", *args],
                              capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env=os.environ.copy())

    proc = cli(f"--config={tmp_path}/toy_config.py", f"--sweep={tmp_path}/toy_sweep.py",
               f"--workdir={workdir}", "--max_trials=1", "--timeout=1h")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Sweep results" in proc.stderr and "Best: trial 0" in proc.stderr
    assert "re-run the same command to continue" in proc.stderr
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], r["status"], r["optim.lr"]) for r in rows] == [("0", "complete", "0.01")]

    proc = cli(f"--workdir={workdir}", "--results")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["rank", "trial", "status", "eval/val/loss", "best_step",
                                "optim.lr"]
    assert lines[1].split()[:3] == ["1", "0", "complete"] and len(lines) == 2

    proc = cli(f"--config={tmp_path}/toy_config.py", f"--sweep={tmp_path}/bad_sweep.py",
               f"--workdir={tmp_path}/bad")
    assert proc.returncode == 2
    assert "bad_sweep.py: parameters: Unknown config key 'optim.lrr'. Did you mean 'optim.lr'" \
        in proc.stderr
