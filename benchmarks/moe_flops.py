"""XLA's FLOPs and memory of an MoE config's train step for each `model.moe_impl`, side by side
with the model FLOP formula (6 · active params · tokens + attention), compiled from shapes only.

    python benchmarks/moe_flops.py --config=configs/moe.py:long                 # XLA:CPU
    PYTHONPATH=. /work/tpuvenv/bin/python benchmarks/moe_flops.py \\
        --config=configs/moe.py:long --topology=v5p:1x1x1                       # the TPU compiler

`--topology` compiles ahead of time for a TPU topology's devices (libtpu, Python >= 3.12, no TPU
needed, as benchmarks/memory_plan.py); without it, the local devices. One JSON line per impl,
then a Markdown table: XLA's FLOPs per step (all devices), the formula's, their ratio, and the
compiled temporaries per device. Where the backend lowers `jax.lax.ragged_dot` to a masked dense
dot over all C experts (XLA:CPU, XLA:GPU's default), the dropless row counts C times the expert
FLOPs; the TPU compiler runs it as a grouped matmul.
"""

from __future__ import annotations

import copy
import json

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxtrain import Trainer
from jaxtrain.mesh import batch_sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "An MoE config file.",
                                          lock_config=True)
_IMPLS = flags.DEFINE_list("impls", ["dropless", "capacity"], "model.moe_impl values.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU topology (e.g. v5p:1x1x1) to compile "
                                "for ahead of time; empty = the local devices.")


def tpu_devices(topology: str) -> list:
    """A TPU topology's devices (e.g. 'v5p:1x1x1'), for ahead-of-time compiles without a TPU."""
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def abstract_inputs(trainer: Trainer) -> tuple:
    """(state, batch) as sharded ShapeDtypeStructs (batch shapes from one batch of the data)."""
    host = next(trainer.task.train_iterator(
        seed=0, batch_size=trainer.config.train.batch_size, process_index=0, process_count=1))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(trainer.mesh,
                                                                               v.ndim))
             for k, v in host.items()}
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    return state, batch


def measure(config, impl: str, devices) -> dict:
    config = copy.deepcopy(config)
    config.model.moe_impl = impl
    trainer = Trainer(config, workdir="/tmp/jaxtrain-moe-flops", devices=devices)
    state, batch = abstract_inputs(trainer)
    compiled = trainer.compiled_step(state, batch)
    xla = compiled.xla_flops * trainer.mesh.size
    memory = compiled.fn.memory_analysis()
    return {"impl": impl, "device": devices[0].device_kind, "devices": len(devices),
            "tokens_per_step": compiled.tokens, "xla_flops_per_step": xla,
            "model_flops_per_step": compiled.model_flops,
            "ratio": round(xla / compiled.model_flops, 3) if compiled.model_flops else None,
            "temp_gib_per_device": round(memory.temp_size_in_bytes / 2**30, 3),
            "compile_seconds": round(compiled.seconds, 1)}


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    if not config.model.get("num_experts"):
        raise app.UsageError("--config must be an MoE model (model.num_experts > 0)")
    devices = tpu_devices(_TOPOLOGY.value) if _TOPOLOGY.value else jax.devices()
    rows = [measure(config, impl, devices) for impl in _IMPLS.value]
    for row in rows:
        print(json.dumps(row))
    print("| moe_impl | device | XLA TFLOP/step | formula TFLOP/step | ratio | temp GiB/device |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['impl']} | {r['device']} | {r['xla_flops_per_step'] / 1e12:.3f} | "
              f"{r['model_flops_per_step'] / 1e12:.3f} | {r['ratio']} | "
              f"{r['temp_gib_per_device']} |")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
