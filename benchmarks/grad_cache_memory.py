"""Peak memory of the contrastive train step with and without the gradient cache, by batch size.

    python benchmarks/grad_cache_memory.py --config=configs/clip.py:b32
    python benchmarks/grad_cache_memory.py --config=configs/clip.py:b32 --batches=1024 --chunk=128

Compiles the real train step (the Trainer's, sharded over all devices) from shapes only and
prints one JSON line per (batch, gradient cache on/off): XLA's compiled memory analysis per
device — arguments (params, optimizer state, batch) and temporaries (activations, gradients,
logits): what the step needs beyond its inputs, known before anything runs. With the
gradient cache the temporaries follow the chunk, not the batch, apart from the [B, D]
embeddings and the loss's [B, B] logits.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxtrain import Trainer
from jaxtrain.mesh import batch_sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_BATCHES = flags.DEFINE_list("batches", ["1024", "4096", "16384"], "Global batch sizes.")
_CHUNK = flags.DEFINE_integer("chunk", 256, "gradient_cache_chunk_size.")


def measure(config, batch_size: int, cache: bool) -> dict:
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch_size
    config.train.use_gradient_cache = cache
    config.train.gradient_cache_chunk_size = _CHUNK.value
    trainer = Trainer(config, workdir="/tmp/jaxtrain-benchmark")
    # One row from the task's own pipeline gives the batch's structure; no data is generated.
    row = next(trainer.task.train_iterator(seed=0, batch_size=1, process_index=0,
                                           process_count=1))
    batch = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype,
                                     sharding=batch_sharding(trainer.mesh, v.ndim))
             for k, v in row.items()}
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    compiled = trainer.compiled_step(state, batch)
    memory = compiled.fn.memory_analysis()
    out = {
        "batch_size": batch_size,
        "gradient_cache": cache,
        "chunk": _CHUNK.value if cache else None,
        "devices": jax.device_count(),
        "device": jax.devices()[0].device_kind,
        "compile_seconds": round(compiled.seconds, 1),
        "argument_bytes": memory.argument_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "xla_flops_per_device": compiled.xla_flops,
    }
    return out


def main(argv) -> None:
    del argv
    for batch in (int(b) for b in _BATCHES.value):
        for cache in (False, True):
            try:
                print(json.dumps(measure(_CONFIG.value, batch, cache)), flush=True)
            except Exception as e:  # report and go on with the next size
                print(json.dumps({"batch_size": batch, "gradient_cache": cache,
                                  "error": repr(e)[:300]}), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
