"""Compiled memory of packed-row attention: the masked XLA path against the flash kernels.

    # TPU (ahead-of-time, no TPU needed; Python >= 3.12 venv with jax[tpu] flax optax and the
    # project's dependencies, see benchmarks/memory_plan.py): the Splash kernel vs XLA
    PYTHONPATH=. /work/tpuvenv/bin/python benchmarks/packed_attention.py --platform=tpu

    # CPU (XLA:CPU's plan; the Pallas GPU kernel in interpret mode, its blocks as XLA loops)
    python benchmarks/packed_attention.py --platform=cpu --seq_len=1024

    # GPU: XLA vs the Pallas (Triton) kernel vs cuDNN, after a check that the kernel's output
    # and gradients equal the masked XLA path's on the GPU (max abs differences printed)
    python benchmarks/packed_attention.py --platform=gpu --impls=xla,pallas,cudnn --check

For each implementation, two programs on one device are compiled from shapes alone (nothing
runs): ``attention`` — the gradient of sum(w · attention(q, k, v)) w.r.t. q, k, v for packed
rows (``--segments`` documents per row) — and ``model`` — the gradient w.r.t. the parameters of
a Llama's next-token loss on packed rows (``--layers`` layers, width heads × head_dim). One row
each: the compiled temporaries, and the arrays of the compiled program with two T-sized axes
(how many, and the largest's bytes); the masked path's [B, H, T, T] scores are
B·H·T²·4 bytes per layer in float32.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1, "u32": 4, "s8": 1, "u8": 1}


def device(platform: str, topology: str) -> Any:
    """One device: the first of a TPU topology's (libtpu; no hardware needed) or the CPU."""
    if platform in ("cpu", "gpu"):
        return jax.devices(platform)[0]
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


def txt_arrays(hlo: str, t: int) -> tuple[int, int]:
    """(number, largest bytes) of the distinct array shapes in compiled HLO text with two
    adjacent T-sized axes (``f32[1,32,4096,4096]``)."""
    shapes = set(re.findall(rf"\b([a-z]+[0-9]*)\[([0-9,]*\b{t},{t}\b[0-9,]*)\]", hlo))
    sizes = [_BYTES.get(dt, 4) * int(np.prod([int(n) for n in dims.split(",")]))
             for dt, dims in shapes]
    return len(sizes), max(sizes, default=0)


def packed_segments(b: int, t: int, n: int) -> np.ndarray:
    """[B, T] segment ids: ``n`` documents of uneven length per row (1..n), padding (0) last."""
    cuts = np.linspace(0, t * 0.95, n + 1).astype(int)
    seg = np.zeros((b, t), np.int32)
    for i in range(n):
        seg[:, cuts[i]:cuts[i + 1]] = i + 1
    return seg


def attention_program(args, impl: str):
    from jaxtrain.models.attention import attention

    b, t, h, k, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    dt = jnp.dtype(args.dtype)
    seg = jnp.asarray(packed_segments(b, t, args.segments))

    def loss(q, kk, v, w):
        out = attention(q, kk, v, segment_ids=seg, causal=True, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * w)

    shapes = [(b, t, h, d), (b, t, k, d), (b, t, k, d), (b, t, h, d)]
    return jax.grad(loss, argnums=(0, 1, 2)), [jax.ShapeDtypeStruct(s, dt) for s in shapes]


def model_program(args, impl: str):
    from jaxtrain.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.heads * args.head_dim,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      intermediate_size=4 * args.heads * args.head_dim, dtype=args.dtype,
                      attention_impl=impl)
    b, t = args.batch, args.seq_len
    seg = jnp.asarray(packed_segments(b, t, args.segments))
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    params = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8),
                                                                                  jnp.int32)))

    def loss(params, tokens):
        logits = Llama(cfg).apply(params, tokens, None, seg)[0]
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * (seg[:, 1:] == seg[:, :-1]))

    return jax.grad(loss), [params, tokens]


def measure(args, program: str, impl: str, dev) -> dict:
    make = attention_program if program == "attention" else model_program
    fn, shapes = make(args, impl)
    sharding = jax.sharding.SingleDeviceSharding(dev)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          shapes)
    try:  # the kernels run compiled for TPU/GPU, in interpret mode for the CPU
        compiled = jax.jit(fn).lower(*shapes).compile()
    except Exception as e:  # noqa: BLE001 - a row saying why
        return {"program": program, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]}
    mem = compiled.memory_analysis()
    count, largest = txt_arrays(compiled.as_text(), args.seq_len)
    return {"program": program, "impl": impl, "temp_bytes": mem.temp_size_in_bytes,
            "argument_bytes": mem.argument_size_in_bytes, "txt_arrays": count,
            "largest_txt_bytes": largest}


def check(impl: str, dtype: str) -> list[float]:
    """Runs ``impl`` and the masked XLA path on the default backend (B=2, T=1000: padded to the
    blocks; 16 heads, 8 kv heads, head_dim 128, packed rows): the largest absolute differences
    of the output and of the gradients w.r.t. q, k, v."""
    from jaxtrain.models.attention import attention

    b, t, h, k, d = 2, 1000, 16, 8, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q, kk, v, w = (jax.random.normal(key, s, dtype) for key, s in zip(
        keys, [(b, t, h, d), (b, t, k, d), (b, t, k, d), (b, t, h, d)], strict=True))
    seg = jnp.asarray(packed_segments(b, t, 5))

    def run(name):
        def loss(q, kk, v):
            out = attention(q, kk, v, segment_ids=seg, impl=name)
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, kk, v)
        return [out, *grads]

    return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))))
            for a, r in zip(run(impl), run("xla"), strict=True)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", choices=("tpu", "cpu", "gpu"), default="tpu")
    p.add_argument("--check", action="store_true", help="first run each kernel on small packed "
                   "rows and print its largest difference from the masked XLA path")
    p.add_argument("--topology", default="v5p:2x2x2", help="TPU topology (libtpu)")
    p.add_argument("--impls", default="", help="comma-separated; default: xla and the "
                   "platform's kernel (tpu: splash, cpu and gpu: pallas)")
    p.add_argument("--programs", default="attention,model")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    impls = args.impls.split(",") if args.impls else \
        ["xla", "splash" if args.platform == "tpu" else "pallas"]
    dev = device(args.platform, args.topology)
    if args.check:
        for impl in impls:
            if impl != "xla":
                print(f"# check {impl}: max |difference| from xla (out, dq, dk, dv) = "
                      f"{check(impl, args.dtype)}", flush=True)
    b, h, t = args.batch, args.heads, args.seq_len
    print(f"# {dev.device_kind if hasattr(dev, 'device_kind') else dev}, B={b} T={t} H={h} "
          f"K={args.kv_heads} D={args.head_dim} {args.dtype}, {args.segments} segments per row;"
          f" [B, H, T, T] f32 = {b * h * t * t * 4 / 2**20:.0f} MiB")
    print(f"| program | impl | temporaries MiB | arrays with [.., {t}, {t}] | largest MiB |")
    print("|---|---|---:|---:|---:|")
    for program in args.programs.split(","):
        for impl in impls:
            r = measure(args, program, impl, dev)
            if "error" in r:
                print(f"| {program} | {impl} | {r['error']} | | |")
                continue
            print(f"| {program} | {impl} | {r['temp_bytes'] / 2**20:,.1f} | {r['txt_arrays']} "
                  f"| {r['largest_txt_bytes'] / 2**20:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
