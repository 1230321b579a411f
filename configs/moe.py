"""Mixture-of-experts language model: top-k routing, dropless experts, router losses.

    python -m jaxtrain.main --config=configs/moe.py                 # tiny MoE, Shakespeare, CPU
    python -m jaxtrain.main --config=configs/moe.py:runlocal        # seconds (tests)
    python -m jaxtrain.main --config=configs/moe.py --config.mesh.expert=4  # experts on 4 devices
    python -m jaxtrain.main --config=configs/moe.py --config.model.moe_impl=capacity  # GShard

model.moe_impl: 'dropless' (default: tokens sorted by expert, one grouped matmul
jax.lax.ragged_dot per projection, nothing dropped) or 'capacity' (GShard one-hot dispatch, each
expert takes at most ceil(k·T·capacity_factor/C) tokens per sequence, the rest are dropped).

Loss = CE + loss.load_balance · C·Σ f_i·P_i + loss.balance_deviation · Σ (f_i − 1/C)²
          + loss.router_z · mean(logsumexp(router logits)²)
Logged: train/moe/{load_balance, balance_deviation, router_z, dropped_fraction} and the
per-expert load train/moe/expert_load/<i> (fraction of routed assignments).

Variants: runlocal, steps=N, experts=N, topk=K, and
  long    the FLOP/memory comparison of the two impls at T = 4096 (BUILD.md): random tokens,
          hidden 512, 2 layers, 8 experts of 1408, k = 2, batch 1 x 4096, vocab 32000;
          python benchmarks/train_step.py --config=configs/moe.py:long --compile_only
"""

import importlib.util
import os

from jaxtrain.config import parse_variants, set_steps


def _lm_config(arg):
    """configs/lm.py beside this file (config files are loaded by path, not as a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm.py")
    spec = importlib.util.spec_from_file_location("_jaxtrain_configs_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


VARIANTS = ("runlocal", "steps=N", "experts=N", "topk=K", "long")


def get_config(arg: str | None = None):
    args = parse_variants(arg, VARIANTS, "configs/moe.py")
    c = _lm_config("runlocal" if "runlocal" in args else None)  # the dense setup + MoE layers
    c.unlock()
    c.model.num_experts = int(args.get("experts", 4))
    c.model.num_experts_per_tok = int(args.get("topk", 2))
    c.model.capacity_factor = 1.25
    c.model.moe_intermediate_size = c.model.intermediate_size // 2
    c.model.moe_impl = "dropless"
    if "long" in args:
        c.model.update(dict(hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=8,
                            intermediate_size=1408, moe_intermediate_size=1408,
                            vocab_size=32000, num_experts=int(args.get("experts", 8))))
        c.data.kind = "synthetic"
        c.data.seq_len = 4096
        c.data.train_examples = 8
        c.data.eval_examples = 8
        c.train.batch_size = 1
    c.loss.load_balance = 0.01
    c.loss.balance_deviation = 0.0
    c.loss.router_z = 0.001
    if "steps" in args:
        set_steps(c, int(args["steps"]))
    c.lock()
    return c
