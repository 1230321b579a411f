"""Decoding speed of jaxtrain.generate against transformers' eager ``generate`` (same weights).

    python benchmarks/generate.py                          # tiny and 1b, batch 1, 8, 64
    python benchmarks/generate.py --configs=tiny --batches=1,8 --new_tokens=32
    python benchmarks/generate.py --configs=1b --dtype=bfloat16 --no_transformers   # GPU

Models: the LM sizes of configs/lm.py (``tiny``: 96 wide, 4 layers, tied GPT-2 vocabulary;
``1b``: the 953M model), random weights, saved with jaxtrain.hf.llama.save_hf and loaded by
transformers (torch, CPU, float32, its default attention). Every row of a batch has a prompt of
``--prompt_len`` random tokens and greedy decoding runs ``--new_tokens`` tokens with no stop
token on both sides. Per (model, batch, implementation), after a warm-up call (jaxtrain: the
compile) the best of ``--repeats`` runs of each of:

    t_1 = generate 1 new token (the prefill and one sampling step)
    t_N = generate N = --new_tokens new tokens

    prefill tok/s = B · prompt_len / t_1
    decode tok/s  = B · (N - 1) / (t_N - t_1)      per-token latency = (t_N - t_1) / (N - 1)

Prints one table, and the machine's load average (a shared CPU makes every figure noisy).
Imports neither datasets, grain nor ml_collections itself (configs/lm.py would: its sizes are
copied here).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

# configs/lm.py SIZES, with its vocabulary (GPT-2's, padded to 50304)
SIZES = {
    "tiny": dict(vocab_size=50304, hidden_size=96, num_layers=4, num_heads=3, num_kv_heads=3,
                 intermediate_size=256, tie_embeddings=True),
    "1b": dict(vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16,
               num_kv_heads=16, intermediate_size=5632),
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,1b", help="comma-separated: " + ",".join(SIZES))
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="jaxtrain's compute dtype (transformers runs float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_transformers", action="store_true", help="jaxtrain only")
    return p.parse_args()


def _random_params(cfg) -> dict:
    """numpy float32 weights of init_params' shapes: N(0, 0.02²), norm scales 1."""
    import flax.linen as nn

    from jaxtrain.models.llama import init_params

    rng = np.random.default_rng(0)
    shapes = nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))

    def leaf(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(s.shape, np.float32)
        return (0.02 * rng.standard_normal(s.shape, np.float32)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _rates(b: int, prompt_len: int, n: int, t1: float, tn: float) -> dict[str, float]:
    step = max(tn - t1, 1e-9) / (n - 1)
    return {"prefill_tok_s": b * prompt_len / t1, "decode_tok_s": b / step,
            "ms_per_token": 1e3 * step}


def bench_jaxtrain(cfg, params, prompts: list[list[int]], n: int, repeats: int) -> dict:
    from jaxtrain.generate import Generator, SamplingConfig

    gen = Generator(cfg, params)
    one, full = SamplingConfig(max_new_tokens=1), SamplingConfig(max_new_tokens=n)
    t0 = time.perf_counter()
    gen.generate(prompts, one)
    gen.generate(prompts, full)
    compile_s = time.perf_counter() - t0
    t1 = _best(lambda: gen.generate(prompts, one), repeats)
    tn = _best(lambda: gen.generate(prompts, full), repeats)
    return {**_rates(len(prompts), len(prompts[0]), n, t1, tn), "warmup_s": compile_s}


def bench_transformers(model_dir: str, prompts: list[list[int]], n: int, repeats: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                              dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = torch.as_tensor(np.asarray(prompts, np.int64))
    mask = torch.ones_like(ids)

    def run(k: int):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + k

    t0 = time.perf_counter()
    run(1)
    warm = time.perf_counter() - t0
    t1 = _best(lambda: run(1), repeats)
    tn = _best(lambda: run(n), repeats)
    return {**_rates(len(prompts), len(prompts[0]), n, t1, tn), "warmup_s": warm}


def main() -> None:
    args = _args()
    from jaxtrain.hf.llama import save_hf
    from jaxtrain.models.llama import LlamaConfig

    rows = []
    for name in args.configs.split(","):
        if name not in SIZES:
            raise SystemExit(f"--configs: unknown size {name!r}; valid: {', '.join(SIZES)}")
        cfg = LlamaConfig(**SIZES[name], dtype=args.dtype)
        params = _random_params(cfg)
        with tempfile.TemporaryDirectory() as model_dir:
            if not args.no_transformers:
                save_hf(model_dir, params, cfg)
            for b in (int(x) for x in args.batches.split(",")):
                rng = np.random.default_rng(b)
                prompts = rng.integers(1, cfg.vocab_size, (b, args.prompt_len)).tolist()
                results = {"jaxtrain": bench_jaxtrain(cfg, params, prompts, args.new_tokens,
                                                      args.repeats)}
                if not args.no_transformers:
                    results["transformers"] = bench_transformers(
                        model_dir, prompts, args.new_tokens, args.repeats)
                for impl, r in results.items():
                    rows.append((name, b, impl, r))
                    print(f"# {name} batch {b} {impl}: " +
                          ", ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)

    device = jax.devices()[0]
    print(f"\ndevice: {device.platform} {device.device_kind} x{jax.device_count()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, jaxtrain {args.dtype}")
    head = (f"{'model':6} {'batch':>5} {'impl':12} {'prefill tok/s':>14} {'decode tok/s':>13} "
            f"{'ms/token':>9} {'decode x':>8}")
    print(head)
    print("-" * len(head))
    ref = {(m, b): r["decode_tok_s"] for m, b, impl, r in rows if impl == "transformers"}
    for m, b, impl, r in rows:
        ratio = r["decode_tok_s"] / ref[(m, b)] if (m, b) in ref else float("nan")
        print(f"{m:6} {b:>5} {impl:12} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
              f"{r['ms_per_token']:>9.2f} {ratio:>8.2f}")


if __name__ == "__main__":
    main()
