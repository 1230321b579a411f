"""Mixture-of-experts language model: top-k routing with a capacity factor, router losses.

    python -m jaxtrain.main --config=configs/moe.py                 # tiny MoE, Shakespeare, CPU
    python -m jaxtrain.main --config=configs/moe.py:runlocal        # seconds (tests)
    python -m jaxtrain.main --config=configs/moe.py --config.mesh.expert=4  # experts on 4 devices

Loss = CE + loss.load_balance · C·Σ f_i·P_i + loss.balance_deviation · Σ (f_i − 1/C)²
          + loss.router_z · mean(logsumexp(router logits)²)
Logged: train/moe/{load_balance, balance_deviation, router_z, dropped_fraction} and the
per-expert load train/moe/expert_load/<i> (fraction of routed assignments).

Variants: runlocal, steps=N, experts=N, topk=K.
"""

import importlib.util
import os

from jaxtrain.config import parse_variants


def _lm_config(arg):
    """configs/lm.py beside this file (config files are loaded by path, not as a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm.py")
    spec = importlib.util.spec_from_file_location("_jaxtrain_configs_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    args = parse_variants(arg, ("runlocal", "steps=N", "experts=N", "topk=K"), "configs/moe.py")
    c = _lm_config("runlocal" if "runlocal" in args else None)  # the dense setup + MoE layers
    c.unlock()
    c.model.num_experts = int(args.get("experts", 4))
    c.model.num_experts_per_tok = int(args.get("topk", 2))
    c.model.capacity_factor = 1.25
    c.model.moe_intermediate_size = c.model.intermediate_size // 2
    c.loss.load_balance = 0.01
    c.loss.balance_deviation = 0.0
    c.loss.router_z = 0.001
    if "steps" in args:
        c.train.steps = int(args["steps"])
    c.lock()
    return c
