"""Hyperparameter sweeps: grid, random and Bayesian (Optuna TPE) search over config keys.

    python -m jaxtrain.sweep --config=configs/clip.py:runlocal --sweep=sweeps/clip_lr.py
        [--workdir=runs/sweep_clip_lr] [--worker=I --num_workers=N] [--max_trials=K]
        [--timeout=2h] [--config.KEY=VALUE ...]
    python -m jaxtrain.sweep --workdir=runs/sweep_clip_lr --results     # the table, no training

    result = run_sweep(config, "sweeps/clip_lr.py", "runs/sweep_clip_lr")   # SweepResult
    result.best.params, result.best.value
    print(result.table())

A sweep file is a Python file whose ``get_sweep()`` returns a dict (or ConfigDict)::

    method          "grid" | "random" | "bayes"
    metric          an eval metric the run records, "eval/<evaluator>/<metric>" of an evaluator in
                    config.evals: "eval/retrieval/mean_recall@1", "eval/val/loss", ...
    mode            "max" | "min"
    num_trials      random / bayes: how many trials (not grid: it runs every combination)
    seed            random / bayes (default 0)
    startup_trials  bayes: random trials before TPE (default min(10, max(1, num_trials // 2)))
    parameters      {config key path: spec}, each spec one of
        {"values": [...]}                    a list (grid; random / bayes: categorical)
        {"min": a, "max": b, "log": False}   a float range (log: log-uniform)
        {"min": a, "max": b, "int": True}    an int range, both ends included (may be log too)

Each trial is an ordinary :class:`jaxtrain.Trainer` run (the config validated as usual) on a copy
of the config with the trial's values, in ``<workdir>/trial_<NNNN>/``, which also holds
``config.json`` and ``trial.json`` (index, worker, params, status ``running`` | ``timeout`` |
``complete`` | ``early_stopped`` | ``failed``, metric value, best step, error, and
``progress``: the step and best value so far, updated at each evaluation by the trial's hook,
:class:`~jaxtrain.sweep.report.TrialReportHook`, which also reports each value to a bayes trial).
The trial's value is the best value of ``metric`` over the run's evaluations (max or min by
``mode``; the config's own ``checkpoint.best_metric`` and early stopping are left as the user set
them), and ``best_step`` the step of that evaluation.

* grid: the Cartesian product of the ``values`` lists in the order written, the last parameter
  varying fastest; trial i is combination i.
* random: each value is drawn from ``numpy.random.default_rng([seed, i, crc32(key)])``, so trial
  i's values depend only on the seed, i and the key: not on the worker count, the other keys, or
  which trials ran before. Ranges are uniform (``log``: uniform in log space; ``int``: inclusive).
* bayes: Optuna's TPE sampler over a study in ``<workdir>/optuna_journal.log``
  (``JournalStorage`` over a ``JournalFileBackend``, so worker processes on a shared filesystem
  share one study). Trials are numbered in the order they are asked; failed trials are told as
  failed. Seeded, but not bit-reproducible across interruptions or worker counts.

Workers: ``--worker=I --num_workers=N`` (default from ``SLURM_PROCID`` / ``SLURM_NTASKS``) runs
grid/random trials I, I+N, I+2N, ... one after another; bayes workers ask the shared study for
the next trial until ``num_trials`` are taken. Each worker trains single-host on the devices it
sees: give each its own GPUs (``CUDA_VISIBLE_DEVICES``, ``srun --gpus-per-task=1``) or run one
worker per host.

Re-running the same command continues a sweep: finished trials (``complete``, ``early_stopped``,
``failed``; ``--retry_failed`` runs failed ones again) are skipped and a trial left
``running`` resumes from its own latest checkpoint, by the worker that owns it (grid/random: by
index; bayes: the worker that asked for it). ``<workdir>/sweep.json`` records the search space:
another method, seed or parameters in the same workdir is an error, and so is another metric or
mode once a trial has a value; ``num_trials`` may change (random trial i keeps its values). A
trial that raises (a config the Trainer rejects, NaN with ``train.nonfinite='error'``, out of
memory, ...) is ``failed`` with the error in trial.json, and the sweep goes on; it stops when
3 trials in a row fail with the same error (a bug or a missing file, not the hyperparameters)
and when a checkpoint cannot be written. ``results.csv`` is rebuilt from every ``trial.json`` (all
workers') after each trial: ranked by the metric, unfinished trials after, failed ones last.

``--timeout`` (``run_sweep(timeout=...)``: seconds, ``'2h'``, ``'30m'``, ``'1h30m'``) is the
call's wall-clock budget: no trial starts after it; the trial in flight stops at the first step
ending after it, with a checkpoint, status ``timeout`` (resumed by a re-run). Trials run as
``<sweep>/trial_<NNNN>`` in every tracker, grouped by the sweep (:mod:`jaxtrain.trackers`).

Modules: :mod:`~jaxtrain.sweep.spec` (the sweep file and its checks), :mod:`~jaxtrain.sweep.space`
(the search space, each trial's values), :mod:`~jaxtrain.sweep.runner` (running a worker's
trials), :mod:`~jaxtrain.sweep.bayes` (the Optuna study), :mod:`~jaxtrain.sweep.report` (the trial
hook), :mod:`~jaxtrain.sweep.results` (trial.json, the ranked table, results.csv),
:mod:`~jaxtrain.sweep.workdir` (sweep.json), :mod:`~jaxtrain.sweep.cli` (the command line).
"""

from jaxtrain.sweep.results import FINISHED, SweepResult, Trial, load_results, rank_trials
from jaxtrain.sweep.runner import RepeatedFailureError, run_sweep, workers_from_env
from jaxtrain.sweep.space import ParamSpec, Sweep, apply_params, trial_plan
from jaxtrain.sweep.spec import SweepError, load_sweep, parse_sweep, read_sweep_file

__all__ = [
    "FINISHED", "ParamSpec", "RepeatedFailureError", "Sweep", "SweepError", "SweepResult",
    "Trial", "apply_params", "load_results", "load_sweep", "parse_sweep", "rank_trials",
    "read_sweep_file", "run_sweep", "trial_plan", "workers_from_env",
]
