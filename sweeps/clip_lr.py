"""Grid: learning rate x weight decay for configs/clip.py (3 x 2 = 6 trials).

    python -m jaxtrain.sweep --config=configs/clip.py:runlocal --sweep=sweeps/clip_lr.py

Trial order: optim.lr varies slowest, optim.weight_decay fastest (trial 1 = lr 1e-3, wd 0.05).
"""


def get_sweep():
    return {
        "method": "grid",
        "metric": "eval/retrieval/mean_recall@1",
        "mode": "max",
        "parameters": {
            "optim.lr": {"values": [1e-3, 2e-3, 4e-3]},
            "optim.weight_decay": {"values": [0.0, 0.05]},
        },
    }
