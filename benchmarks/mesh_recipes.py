"""Per-device memory of the train state and of the compiled step for each mesh recipe.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/mesh_recipes.py \
        --config=configs/clip.py

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/mesh_recipes.py \
        --config=configs/moe.py:runlocal      # adds the expert-parallel recipes

Recipes (8 devices): pure data parallel, data parallel with the optimizer state sharded over
`data` (`mesh.shard_optimizer`, ZeRO-1/2), FSDP, FSDP + tensor parallel, data x FSDP x tensor, and
for mixture-of-experts models FSDP + expert and data x expert.
Prints a table: parameter + optimizer bytes held by device 0, and XLA's compiled memory analysis
of the train step (arguments, temporaries) per device. On CPU this is what XLA plans; on a GPU
it is what the step allocates.
"""

from __future__ import annotations

import json

import jax
from absl import app
from ml_collections import config_flags

from jaxtrain import Trainer
from jaxtrain.mesh import shard_batch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)

RECIPES = {
    "data parallel": dict(data=-1, fsdp=1, tensor=1),
    # ZeRO-1/2: params replicated like data parallel, optimizer state split over `data`
    "dp + sharded optimizer": dict(data=-1, fsdp=1, tensor=1, shard_optimizer=True),
    "fsdp": dict(data=1, fsdp=-1, tensor=1),
    "fsdp + tensor": dict(data=1, fsdp=-1, tensor=2),
    "data x fsdp x tensor": dict(data=2, fsdp=-1, tensor=2),
}
EXPERT_RECIPES = {  # only for models with experts (config.model.num_experts > 0)
    "fsdp + expert": dict(data=1, fsdp=2, tensor=1, expert=4),
    "data x expert": dict(data=2, fsdp=1, tensor=1, expert=4),
}


def device0_bytes(tree) -> int:
    """Bytes of `tree`'s arrays that live on the first device."""
    dev = jax.devices()[0]
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == dev
    )


def measure(config) -> dict:
    trainer = Trainer(config, workdir="/tmp/jaxtrain-benchmark")
    state = trainer.init_state()
    it = trainer.task.train_iterator(
        seed=0, batch_size=config.train.batch_size, process_index=0, process_count=1
    )
    batch = shard_batch(next(it), trainer.mesh)
    out = {
        "params_bytes": device0_bytes(state.params),
        "opt_state_bytes": device0_bytes(state.opt_state),
    }
    mem = trainer.compiled_step(state, batch).fn.memory_analysis()
    out["step_argument_bytes"] = mem.argument_size_in_bytes
    out["step_temp_bytes"] = mem.temp_size_in_bytes
    return out


def main(argv) -> None:
    del argv
    rows = {}
    recipes = dict(RECIPES)
    if _CONFIG.value.model.get("num_experts", 0):
        recipes.update(EXPERT_RECIPES)
    for name, mesh in recipes.items():
        config = _CONFIG.value.copy_and_resolve_references()
        with config.unlocked():
            config.mesh.update(mesh)
        rows[name] = measure(config)
    print(json.dumps({"devices": jax.device_count(), "recipes": rows}, indent=1))
    state = lambda r: r["params_bytes"] + r["opt_state_bytes"]
    base = state(rows["data parallel"])
    for name, r in rows.items():
        print(f"{name:22s} params {r['params_bytes'] / 2**20:7.2f} MiB + opt "
              f"{r['opt_state_bytes'] / 2**20:7.2f} MiB on device 0: {state(r) / 2**20:7.2f} MiB "
              f"({state(r) / base:.3f}x)  step args: {r['step_argument_bytes'] / 2**20:7.2f} "
              f"MiB  temp: {r['step_temp_bytes'] / 2**20:7.2f} MiB")

if __name__ == "__main__":
    app.run(main)
