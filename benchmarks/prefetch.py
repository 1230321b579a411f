"""Device prefetch on CPU: how long the step loop waits for its batch, prefetch 0 vs 2.

    python benchmarks/prefetch.py                      # 8 simulated devices, 64 x 224² x 3 f32
    python benchmarks/prefetch.py --rows=32 --steps=10 --rounds=3

The loop is the trainer's (jaxtrain.trainer.Trainer.loop): ``batch = next(it)`` from
``jaxtrain.prefetch.device_prefetch(data, put, size)`` with ``put = mesh.shard_batch`` (i.e.
``jax.make_array_from_process_local_data`` onto the batch sharding), then the jitted step.
The data iterator hands out a fresh float32 image batch each time (``--rows`` x 224 x 224 x 3,
38.5 MB at 64 rows: a copy out of a pool, as a pipeline's final stack of float32 images), so
every batch is a real host→device copy. The step is a linear layer on the flattened images and
its gradient update (``--width`` outputs), sharded over the devices.

Per step, measured after ``--warmup`` steps, for size 0 and ``train.prefetch_to_device``-style
size 2, alternating ``--rounds`` times (medians printed):

    wait     seconds the loop spends in ``next(it)``: reading the batch and copying it to the
             devices (size 0), or taking a batch the thread already put there (size 2)
    step     wall seconds per step (the loop's period), blocking on each step's output
    cpu      CPU seconds of the loop's own thread per step

With prefetch the wait drops to the queue hand-off and the period to max(step, read + copy)
instead of their sum, when spare cores can run the reader thread (a shared machine's load
average is printed: on busy cores the two compete).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


class ImageBatches:
    """Endless fresh float32 image batches (a copy out of a small pool), with a position."""

    def __init__(self, rows: int, size: int = 224, pool: int = 2):
        import numpy as np

        rng = np.random.default_rng(0)
        self.pool = [rng.standard_normal((rows, size, size, 3), dtype=np.float32)
                     for _ in range(pool)]
        self.pos = 0

    def __next__(self) -> dict:
        x = self.pool[self.pos % len(self.pool)].copy()
        self.pos += 1
        return {"x": x}

    def get_state(self) -> dict:
        return {"pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.pos = state["pos"]


def run(size: int, args, mesh, step, w) -> tuple[dict, object]:
    import jax

    from jaxtrain.mesh import shard_batch
    from jaxtrain.prefetch import device_prefetch

    it = device_prefetch(ImageBatches(args.rows), lambda b: shard_batch(b, mesh), size)
    for _ in range(args.warmup):
        w, loss = step(w, next(it))
        jax.block_until_ready(loss)
    wait = 0.0
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(args.steps):
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        w, loss = step(w, batch)
        jax.block_until_ready(loss)
    period = (time.perf_counter() - t0) / args.steps
    cpu = (time.thread_time() - c0) / args.steps
    it.close()
    return {"prefetch": size, "wait_s": wait / args.steps, "step_s": period, "cpu_s": cpu}, w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxtrain import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": -1})
    rep = mesh_lib.replicated(mesh)
    features = 224 * 224 * 3

    def loss_fn(w, batch):
        x = batch["x"].reshape(batch["x"].shape[0], -1)
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    def train_step(w, batch):
        loss, g = jax.value_and_grad(loss_fn)(w, batch)
        return w - 1e-3 * g, loss

    step = jax.jit(train_step, out_shardings=(rep, rep), donate_argnums=0)
    w = jax.device_put(jnp.zeros((features, args.width), jnp.float32) + 1e-3, rep)
    results: dict[int, list[dict]] = {0: [], 2: []}
    for _ in range(args.rounds):
        for size in (0, 2):
            r, w = run(size, args, mesh, step, w)
            results[size].append(r)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in r.items()}), flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("wait_s", "step_s", "cpu_s")}
           for s, rs in results.items()}
    mb = args.rows * features * 4 / 1e6
    print(f"\n{jax.device_count()} {jax.devices()[0].platform} devices, batch {args.rows} x "
          f"224x224x3 float32 ({mb:.1f} MB), {args.steps} steps x {args.rounds} rounds, load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (medians)")
    print(f"{'prefetch':>8} {'wait s/step':>12} {'step s':>8} {'loop-thread CPU s':>18}")
    for s, m in med.items():
        print(f"{s:>8} {m['wait_s']:>12.4f} {m['step_s']:>8.4f} {m['cpu_s']:>18.4f}")
    print(f"prefetch 2 / 0: wait {med[2]['wait_s'] / med[0]['wait_s']:.3f}, step "
          f"{med[2]['step_s'] / med[0]['step_s']:.3f}, loop-thread CPU "
          f"{med[2]['cpu_s'] / med[0]['cpu_s']:.3f}")


if __name__ == "__main__":
    main()
