"""Bayesian search (Optuna TPE; pip install -e ".[sweep]"): lr, weight decay, warmup, 12 trials.

    python -m jaxtrain.sweep --config=configs/clip.py:runlocal --sweep=sweeps/clip_bayes.py

The first `startup_trials` are random, then TPE proposes from the results so far. Several
workers (--worker=I --num_workers=N) share the study in <workdir>/optuna_journal.log.
"""


def get_sweep():
    return {
        "method": "bayes",
        "metric": "eval/retrieval/mean_recall@1",
        "mode": "max",
        "num_trials": 12,
        "startup_trials": 5,
        "seed": 0,
        "parameters": {
            "optim.lr": {"min": 3e-4, "max": 1e-2, "log": True},
            "optim.weight_decay": {"min": 0.0, "max": 0.2},
            "optim.warmup_steps": {"values": [0, 5, 10, 20]},
        },
    }
