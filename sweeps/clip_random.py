"""Random search: log-uniform learning rate and the warmup length, 8 trials.

    python -m jaxtrain.sweep --config=configs/clip.py:runlocal --sweep=sweeps/clip_random.py

Trial i's values come from (seed, i) alone: the same with any number of workers. The warmup
range suits the 60-step `runlocal` run; for the full 600-step config use e.g. max 200.
"""


def get_sweep():
    return {
        "method": "random",
        "metric": "eval/retrieval/mean_recall@1",
        "mode": "max",
        "num_trials": 8,
        "seed": 0,
        "parameters": {
            "optim.lr": {"min": 3e-4, "max": 1e-2, "log": True},
            "optim.warmup_steps": {"min": 0, "max": 20, "int": True},
        },
    }
