"""Throughput and compiled cost of a config's train step (any task), without writing a run.

    python benchmarks/train_step.py --config=configs/clip.py --steps=50
    python benchmarks/train_step.py --config=configs/clip.py:runlocal --config.train.batch_size=256

    python benchmarks/train_step.py --config=configs/lm.py:size=953m --steps=20   # the LM peer

Prints one JSON line: compile seconds, steps/s, samples/s, tokens/s (token models), XLA's FLOPs
per step, the task's model FLOPs (the documented formula) with TFLOP/s and MFU against
--peak_tflops (default: the trainer's table for the device kind), the compiled memory analysis
(argument/output/temp bytes per device) and, on GPU/TPU, the peak device memory in use. The
timed steps run after one warm-up step; the clock stops on a blocking fetch of the last loss.
"""

from __future__ import annotations

import json
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxtrain import Trainer
from jaxtrain.mesh import batch_sharding, shard_batch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_SYNC = flags.DEFINE_bool("sync", False, "Block on every step (CPU: avoids queueing overhead).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile from shapes only (no arrays, no steps): XLA's FLOPs and "
    "memory analysis of a model too big to run here.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for MFU (0 = table).")


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    trainer = Trainer(config, workdir="/tmp/jaxtrain-benchmark")
    if _COMPILE_ONLY.value:
        return compile_only(trainer)
    it = trainer.task.train_iterator(seed=config.seed, batch_size=config.train.batch_size,
                                     process_index=0, process_count=1)
    batches = [shard_batch(next(it), trainer.mesh) for _ in range(min(_STEPS.value, 8))]
    state = trainer.init_state()
    compiled = trainer.compiled_step(state, batches[0])
    state, metrics = compiled.fn(state, batches[0])  # warm-up
    jax.block_until_ready(metrics)
    memory = compiled.fn.memory_analysis()
    t0 = time.perf_counter()
    for i in range(_STEPS.value):
        state, metrics = trainer.train_step(state, batches[i % len(batches)])
        if _SYNC.value:
            jax.block_until_ready(metrics)
    float(metrics["loss"])
    seconds = time.perf_counter() - t0
    sps = _STEPS.value / seconds
    n = trainer.mesh.size
    flops = compiled.model_flops / n if compiled.model_flops else compiled.xla_flops
    peak = _PEAK.value or trainer.peak_tflops()
    stats = jax.devices()[0].memory_stats() or {}
    print(json.dumps({
        "config": flags.FLAGS["config"].config_filename,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "batch_size": config.train.batch_size,
        "compile_seconds": round(compiled.seconds, 2),
        "steps_per_second": round(sps, 3),
        "samples_per_second": round(sps * compiled.samples, 1),
        "tokens_per_second": round(sps * compiled.tokens, 1),
        "xla_flops_per_step_per_device": compiled.xla_flops,
        "model_flops_per_step": compiled.model_flops,
        "tflops_per_second_per_device": round(flops * sps / 1e12, 4),
        "mfu": round(flops * sps / 1e12 / peak, 4) if peak else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "memory_bytes": {k: getattr(memory, k, None) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")},
    }))


def compile_only(trainer: Trainer) -> None:
    host = next(trainer.task.train_iterator(
        seed=0, batch_size=trainer.config.train.batch_size, process_index=0, process_count=1))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(trainer.mesh,
                                                                               v.ndim))
             for k, v in host.items()}
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    compiled = trainer.compiled_step(state, batch)
    memory = compiled.fn.memory_analysis()
    print(json.dumps({
        "config": flags.FLAGS["config"].config_filename,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "params": sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params)),
        "compile_seconds": round(compiled.seconds, 2),
        "tokens_per_step": compiled.tokens,
        "xla_flops_per_step_per_device": compiled.xla_flops,
        "model_flops_per_step": compiled.model_flops,
        "memory_bytes": {k: getattr(memory, k, None) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")},
    }))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
