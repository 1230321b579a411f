"""One command, one table: jaxtrain's train steps (and decoding) on one GPU against the peers.

    python benchmarks/gpu_suite.py --out=/tmp/suite          # one H100/H200: <= 8 minutes
    python benchmarks/gpu_suite.py --tiny --out=/tmp/suite   # the same rows, tiny shapes, CPU

On the GPU image (Python 3.12, jax + CUDA; no datasets, grain, tensorboardX, ml-collections):
run ``bash benchmarks/gpu_wheels.sh`` here once (it downloads the ml-collections and Pillow
wheels into ``.gpu_wheels/``), carry ``.gpu_wheels`` along, and run there

    pip install --no-index --find-links .gpu_wheels ml-collections pillow && \\
        python benchmarks/gpu_suite.py --out=$OUT

Nothing else is needed there: what the suite touches imports grain, datasets and tensorboardX
only when a run reads data or writes metrics, which the suite never does (its batches are
random arrays of the shapes the tasks' pipelines give; tests/test_gpu_suite.py checks both).

Rows (each in its own process on the GPU, so one row's out-of-memory or kernel failure is
printed in its place and its peak memory is its own; ``--tiny`` runs them in this process):

    ceiling          bf16 8192³ matmul through jax.jit: the peak the MFU column divides by
    llama953m        the peer's Llama 953M (hidden 2048, 16 layers, 16 heads, ffn 5632, vocab
                     32000), batch 8 x 2048, AdamW, bf16 compute, cuDNN attention, layers unrolled
    llama953m_scan   the same with lax.scan over the layers
    clip_b32         CLIP ViT-B/32 + 12-layer text tower, batch 256, 224 px, cuDNN attention, text
                     padded to 80 tokens (cuDNN's backward rejects 77)
    clip_gradcache   the same model at batch 16,384 with the gradient cache (chunks of 512):
                     peak memory
    moe_dropless     a Llama MoE (hidden 1024, 8 layers, 8 experts, top-2, expert ffn 1408, vocab
                     32000), batch 8 x 2048, dropless routing (model.moe_impl)
    moe_capacity     the same with GShard capacity routing (capacity factor 1.25): whether
                     dropless's grouped matmul beats the dispatch einsums on this GPU
    lm_packed        the 953M model on packed rows (several documents per row: segment ids,
                     positions restarting per document; attention_impl 'auto')
    decode           greedy decoding of configs/lm.py's size=1b model (the 953M layers with
                     GPT-2's 50304-token vocabulary; bf16, random weights), batch 64, a
                     128-token prompt, 128 new tokens: decode tokens/s (jaxtrain.generate)

Each train row compiles the Trainer's own step (sharding, donation, optimizer as in a run),
runs one warm-up step and then ``--steps`` timed steps (clock stopped on a blocking fetch of
the last loss). Columns: throughput (tokens/s or samples/s), TFLOP/s and MFU against the
measured ceiling, peak device memory (``memory_stats()['peak_bytes_in_use']``), compile seconds,
the peer figure the row is compared with, the ratio measured / peer, and a note.
TFLOP/s of the Llama rows use the peer script's formula, so they compare with its 415 TFLOP/s:

    FLOPs per token = 6 · (N − V·H) + 6 · L · H · S

(N all parameters, V·H the embedding lookup, L layers, H hidden, S sequence length: causal
attention counted half). Other rows use the task's documented formula, else XLA's count.

The table is printed row by row as measured, and written (after every row, so a cut-off run
keeps what it measured) to ``--out``/gpu_suite.json and gpu_suite.md. Rows that would start after
``--budget_s`` are reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULT = "GPU_SUITE_RESULT "  # a child process's result line
if ROOT not in sys.path:  # jaxtrain from this checkout (not installed on the GPU image)
    sys.path.insert(0, ROOT)

# Peer figures, copied from the project's measurement notes (December 2026): measured on the
# H100 80GB lent to the project in November 2026. PyTorch peers: HF transformers + PyTorch,
# bf16 autocast, fused AdamW (the project's bench/peer_torch.py). "plain JAX": a hand-written
# jitted step (fp32 params, bf16 compute, optax.adamw, cuDNN attention) on the same H100.
PEERS = {
    "ceiling": (787.0, "TFLOP/s", "bf16 8192³ matmul via jax.jit, H100"),
    "llama_eager": (52.0e3, "tokens/s", "HF Llama + PyTorch eager, H100"),
    "llama": (72.5e3, "tokens/s", "HF Llama + torch.compile, H100 (415 TFLOP/s, 52% MFU)"),
    "llama_jax": (90.1e3, "tokens/s", "plain JAX step unrolled, H100"),
    "llama_jax_scan": (73.4e3, "tokens/s", "plain JAX step with scan, H100"),
    "clip": (5.2e3, "samples/s", "HF CLIP + torch.compile, H100 (eager 3.3k)"),
    "clip_jax": (5.9e3, "samples/s", "plain JAX step, text padded to 80, H100"),
}
# Goals of issue 19 on one H100 (shown in the notes column).
GOALS = {"llama953m": (92e3, "goal >= 92k tokens/s (>= 66% MFU)"),
         "clip_b32": (6.5e3, "goal >= 6.5k samples/s")}


# ---------------------------------------------------------------------------- configs

def load_config(path: str, arg: str | None):
    """`get_config(arg)` of a config file under configs/ (loaded by path, as the CLI does)."""
    spec = importlib.util.spec_from_file_location(
        "_gpu_suite_" + os.path.basename(path)[:-3], os.path.join(ROOT, "configs", path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _common(c, tiny: bool) -> None:
    """No evaluators, checkpoints, progress bar: the suite only steps."""
    import ml_collections

    c.evals = ml_collections.ConfigDict()
    c.train.progress_bar = False
    c.checkpoint.best_metric = ""
    if tiny:
        c.model.attention_impl = None  # CPU: XLA attention


def _set_if(c, key: str, value: Any) -> bool:
    """`c.model.<key> = value` where this checkout has the key; False where it has not."""
    if key in c.model:
        c.model[key] = value
        return True
    return False


def llama_config(tiny: bool, scan: bool = False, packed: bool = False):
    variant = "runlocal" if tiny else "size=1b,bench"
    c = load_config("lm.py", variant + (",scan" if scan else "") + (",pack" if packed else ""))
    _common(c, tiny)
    if tiny:
        c.model.vocab_size = 512
        c.model.dtype = "bfloat16"
        c.data.seq_len = 64
        c.train.batch_size = 8
        c.data.kind = "synthetic"  # as size=1b,bench: one document per row
    if packed:
        c.data.kind = "text"  # segment ids reach the attention ('synthetic' rows ignore them)
        if not tiny:
            _set_if(c, "attention_impl", "auto")
    return c


def clip_config(tiny: bool, gradcache: int = 0):
    arg = "runlocal" if tiny else "b32"
    if gradcache:
        arg += f",gradcache={gradcache}"
    c = load_config("clip.py", arg)
    _common(c, tiny)
    c.contrastive.mode = "i2t"
    if tiny:
        c.train.batch_size = 64 if gradcache else 16
    else:
        c.model.text_max_len = 80  # cuDNN's attention backward rejects odd lengths (77)
        c.model.attention_impl = "cudnn"
        if gradcache:
            c.train.batch_size = 16384
    return c


def moe_config(tiny: bool, impl: str = "dropless"):
    c = load_config("moe.py", "runlocal" if tiny else "experts=8,topk=2")
    _common(c, tiny)
    _set_if(c, "moe_impl", impl)
    c.data.kind = "synthetic"
    if tiny:
        c.model.vocab_size = 512
        c.data.seq_len = 64
        c.train.batch_size = 8
    else:
        c.model.update(dict(hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=8,
                            intermediate_size=2816, moe_intermediate_size=1408,
                            vocab_size=32000, dtype="bfloat16", attention_impl="cudnn",
                            remat_policy="none", tie_embeddings=False))
        c.data.seq_len = 2048
        c.train.batch_size = 8
    return c


# ---------------------------------------------------------------------------- batches

def lm_batch(config, rows: int, packed: bool, seed: int = 0) -> dict:
    """Random token rows in the layout of jaxtrain.data.text (``ROW_KEYS``): one document per
    row, or (`packed`) rows cut into documents of random lengths, segment ids 1, 2, ... and
    positions restarting at 0 in each, the last token of a document not predicting the next."""
    import numpy as np

    n, vocab = config.data.seq_len, config.model.vocab_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (rows, n + 1), dtype=np.int32)
    segments = np.ones((rows, n), np.int32)
    positions = np.broadcast_to(np.arange(n, dtype=np.int32), (rows, n)).copy()
    mask = np.ones((rows, n), np.float32)
    if packed:
        for r in range(rows):
            cuts = np.sort(rng.choice(np.arange(8, n - 8), size=3, replace=False))
            for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, n], strict=True)):
                segments[r, a:b] = i + 1
                positions[r, a:b] = np.arange(b - a)
                if b < n:
                    mask[r, b - 1] = 0.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "segment_ids": segments, "positions": positions}


def clip_batch(config, rows: int, mesh, seed: int = 0) -> dict:
    """i2t pairs: float32 images [B, S, S, 3] made on the devices (a 16,384-image batch is
    9.9 GB: no host copy) and int32 token rows [B, T] with no padding (ids >= 1)."""
    import jax
    import jax.numpy as jnp

    from jaxtrain.mesh import batch_sharding

    m = config.model
    shapes = {"query": ((rows, m.image_size, m.image_size, 3), jnp.float32),
              "positive": ((rows, m.text_max_len), jnp.int32)}

    def make(key):
        k1, k2 = jax.random.split(key)
        return {"query": jax.random.normal(k1, shapes["query"][0], jnp.float32),
                "positive": jax.random.randint(k2, shapes["positive"][0], 1, m.vocab_size,
                                               jnp.int32)}

    out = {k: batch_sharding(mesh, len(s)) for k, (s, _) in shapes.items()}
    return jax.jit(make, out_shardings=out)(jax.random.key(seed))


# ---------------------------------------------------------------------------- rows

@dataclasses.dataclass
class Row:
    name: str
    what: str
    kind: str  # "train", "ceiling" or "decode"
    config: Callable[[bool], Any] | None = None
    batch: str = ""  # "lm", "lm_packed", "clip"
    peer: str = ""  # key of PEERS
    steps: int = 0  # timed steps (0 = --steps)
    peer_flops: bool = False  # TFLOP/s by the peer script's LM formula


ROWS = [
    Row("ceiling", "bf16 matmul 8192³ (MFU peak)", "ceiling", peer="ceiling"),
    Row("llama953m", "Llama 953M b8x2048 unrolled", "train", lambda t: llama_config(t), "lm",
        peer="llama", peer_flops=True),
    Row("llama953m_scan", "Llama 953M b8x2048 scan", "train",
        lambda t: llama_config(t, scan=True), "lm", peer="llama", peer_flops=True),
    Row("clip_b32", "CLIP B/32 b256 224px", "train", lambda t: clip_config(t), "clip",
        peer="clip"),
    Row("clip_gradcache", "CLIP B/32 b16384 gradcache", "train",
        lambda t: clip_config(t, gradcache=512 if not t else 16), "clip", steps=2),
    Row("moe_dropless", "MoE 8x top-2 b8x2048 dropless", "train", moe_config, "lm"),
    Row("moe_capacity", "MoE 8x top-2 b8x2048 capacity 1.25", "train",
        lambda t: moe_config(t, impl="capacity"), "lm"),
    Row("lm_packed", "Llama 953M packed rows", "train",
        lambda t: llama_config(t, packed=True), "lm_packed", peer="llama", peer_flops=True),
    Row("decode", "Llama 1b greedy decode b64", "decode"),
]
BY_NAME = {r.name: r for r in ROWS}


def peer_flops_per_token(params: Any, model_config, seq_len: int) -> float:
    """The peer script's count: 6 · (N − V·H) + 6 · L · H · S."""
    import jax

    n = sum(x.size for x in jax.tree.leaves(params))
    m = model_config
    return (6.0 * (n - m.vocab_size * m.hidden_size)
            + 6.0 * m.num_layers * m.hidden_size * seq_len)


def measure_ceiling(tiny: bool, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    n, dtype = (256, jnp.float32) if tiny else (8192, jnp.bfloat16)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    reps = 3 if tiny else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a, b)
    jax.block_until_ready(out)
    tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    return {"value": tflops, "unit": "TFLOP/s", "tflops": tflops}


def measure_train(row: Row, tiny: bool, steps: int, peak: float) -> dict:
    import jax
    import numpy as np

    from jaxtrain import Trainer
    from jaxtrain.mesh import shard_batch

    config = row.config(tiny)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir=workdir)
    rows = config.train.batch_size
    if row.batch == "clip":
        batch = clip_batch(config, rows, trainer.mesh)
    else:
        batch = shard_batch(lm_batch(config, rows, packed=row.batch == "lm_packed"),
                            trainer.mesh)
    state = trainer.init_state()
    compiled = trainer.compiled_step(state, batch)
    state, metrics = compiled.fn(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled.fn(state, batch)
    loss = float(metrics["loss"])
    seconds = (time.perf_counter() - t0) / steps
    devices = trainer.mesh.size
    if row.peer_flops:
        flops = compiled.tokens * peer_flops_per_token(
            trainer.abstract_state.params, trainer.task.model_config, config.data.seq_len)
        source = "peer formula"
    elif compiled.model_flops:
        flops, source = compiled.model_flops, "task formula"
    else:
        flops, source = compiled.xla_flops * devices, "XLA count"
    tflops = flops / seconds / 1e12 / devices  # per device
    unit = "tokens/s" if compiled.tokens else "samples/s"
    value = (compiled.tokens if compiled.tokens else compiled.samples) / seconds
    out = {"value": value, "unit": unit, "tflops": tflops, "flops_source": source,
           "mfu": tflops / peak if peak else None, "compile_s": compiled.seconds,
           "step_s": seconds, "loss": loss, "devices": devices,
           "compiled_temp_bytes": compiled.memory.get("temp_size_in_bytes"),
           "peak_bytes": _peak_bytes(), "batch": {k: list(v.shape) for k, v in batch.items()}}
    if not np.isfinite(loss):
        out["note"] = "non-finite loss"
    if row.name == "moe_dropless" and "moe_impl" not in config.model:
        out["note"] = "no model.moe_impl in this checkout: capacity-factor routing"
    return out


def measure_decode(tiny: bool, steps: int) -> dict:
    import flax.linen as nn
    import jax

    sys.path.insert(0, HERE)
    from generate import SIZES, bench_jaxtrain  # benchmarks/generate.py

    from jaxtrain.models.llama import LlamaConfig, init_params

    batch, prompt, new = (8, 16, 32) if tiny else (64, 128, 128)
    cfg = LlamaConfig(**SIZES["tiny" if tiny else "1b"], dtype="bfloat16")
    params = nn.unbox(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)))
    import numpy as np

    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, prompt)).tolist()
    r = bench_jaxtrain(cfg, params, prompts, new, repeats=2)
    return {"value": r["decode_tok_s"], "unit": "tokens/s", "compile_s": r["warmup_s"],
            "prefill_tok_s": r["prefill_tok_s"], "ms_per_token": r["ms_per_token"],
            "peak_bytes": _peak_bytes(),
            "note": f"batch {batch}, prompt {prompt}, {new} new tokens; no GPU peer recorded"}


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure(name: str, tiny: bool, steps: int, peak: float) -> dict:
    """One row's figures, or its error (the row's failure is the row's result)."""
    row = BY_NAME[name]
    t0 = time.perf_counter()
    try:
        if row.kind == "ceiling":
            out = measure_ceiling(tiny, steps)
        elif row.kind == "decode":
            out = measure_decode(tiny, steps)
        else:
            out = measure_train(row, tiny, row.steps or steps, peak)
    except Exception as e:  # noqa: BLE001 - an OOM or an unsupported kernel is a table entry
        out = {"error": f"{type(e).__name__}: {_brief(str(e))}"}
    import jax

    out["device"] = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    out["row_s"] = time.perf_counter() - t0
    return out


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------- the table

COLUMNS = ("row", "what", "measured", "TFLOP/s", "MFU", "peak GiB", "compile s", "peer",
           "ratio", "note")


def table_cells(row: Row, r: dict) -> list[str]:
    peer = PEERS.get(row.peer)
    if "error" in r:
        return [row.name, row.what, "error", "", "", "", "", _peer_text(peer), "",
                r["error"]]
    gib = r.get("peak_bytes")
    ratio = r["value"] / peer[0] if peer else None
    note = r.get("note", "")
    goal = GOALS.get(row.name)
    if goal:
        note = (note + "; " if note else "") + goal[1] + (" (met)" if r["value"] >= goal[0]
                                                          else " (not met)")
    if row.name == "llama953m_scan":
        note = (note + "; " if note else "") + f"plain JAX scan: {PEERS['llama_jax_scan'][0]:.3g}"
    if row.name == "llama953m":
        note = (note + "; " if note else "") + f"plain JAX: {PEERS['llama_jax'][0]:.3g}"
    if row.name == "clip_b32":
        note = (note + "; " if note else "") + f"plain JAX: {PEERS['clip_jax'][0]:.3g}"
    return [row.name, row.what, f"{r['value']:.4g} {r['unit']}",
            f"{r['tflops']:.4g}" if r.get("tflops") is not None else "",
            f"{r['mfu']:.1%}" if r.get("mfu") is not None else "",
            f"{gib / 2**30:.2f}" if gib else "n/a",
            f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "",
            _peer_text(peer), f"{ratio:.2f}" if ratio else "", note]


def _peer_text(peer) -> str:
    return f"{peer[0]:.4g} {peer[1]} ({peer[2]})" if peer else "none recorded"


def write_out(out_dir: str, header: dict, results: list[tuple[Row, dict]]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_suite.json"), "w") as f:
        json.dump({**header, "rows": [{"row": row.name, "what": row.what, **r}
                                      for row, r in results]}, f, indent=1)
    lines = [f"# jaxtrain GPU suite ({header['mode']}, {header.get('device', '?')})", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in table_cells(row, r)) + " |"
              for row, r in results]
    with open(os.path.join(out_dir, "gpu_suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run_child(name: str, args: argparse.Namespace, peak: float, timeout: float) -> dict:
    """The row in a fresh process: its own device memory (peak) and its own crash."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--_row={name}",
           f"--steps={args.steps}", f"--peak_tflops={peak}"] + (["--tiny"] if args.tiny else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (--row_timeout_s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = [x for x in proc.stderr.splitlines() if x.strip()][-3:]
    return {"error": f"process exited {proc.returncode}: {_brief(' | '.join(tail))}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, CPU (what tests run)")
    p.add_argument("--out", default="", help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--rows", default=",".join(BY_NAME), help="comma-separated row names")
    p.add_argument("--steps", type=int, default=0, help="timed steps (0: 10 on GPU, 2 tiny)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="per-device peak for MFU (0: the measured ceiling row)")
    p.add_argument("--isolate", default="auto", choices=["auto", "yes", "no"],
                   help="each row in its own process (auto: yes, except --tiny)")
    p.add_argument("--row_timeout_s", type=float, default=120.0,
                   help="a row's process is stopped after this long (isolated rows)")
    p.add_argument("--budget_s", type=float, default=360.0,
                   help="rows that would start after this many seconds are skipped (with "
                        "--row_timeout_s: the whole suite ends within 8 minutes)")
    p.add_argument("--_row", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (2 if args.tiny else 10)
    if args._row:  # a child: one row, one result line
        print(RESULT + json.dumps(measure(args._row, args.tiny, args.steps, args.peak_tflops)),
              flush=True)
        return
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; valid: {', '.join(BY_NAME)}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.tiny)
    header = {"mode": "tiny (CPU shapes)" if args.tiny else "full", "steps": args.steps,
              "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not isolate:
        import jax

        header.update(device=f"{jax.devices()[0].device_kind} x{jax.device_count()}",
                      jax=jax.__version__)
    print(" | ".join(COLUMNS), flush=True)
    t_start, peak, results = time.perf_counter(), args.peak_tflops, []
    for name in names:
        row = BY_NAME[name]
        if time.perf_counter() - t_start > args.budget_s:
            r = {"error": f"skipped: the {args.budget_s:.0f} s budget (--budget_s) is spent"}
        elif isolate:
            r = run_child(name, args, peak, args.row_timeout_s)
        else:
            r = measure(name, args.tiny, args.steps, peak)
        if row.kind == "ceiling" and "value" in r and not args.peak_tflops:
            peak = r["value"]
        header.setdefault("device", r.get("device", "?"))
        header["peak_tflops"] = peak
        results.append((row, r))
        print(" | ".join(table_cells(row, r)), flush=True)
        if args.out:
            write_out(args.out, header, results)
    print(f"total {time.perf_counter() - t_start:.0f} s; MFU against {peak:.4g} TFLOP/s "
          f"per device; {header.get('device', '?')}", flush=True)


if __name__ == "__main__":
    main()
