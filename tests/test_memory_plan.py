"""benchmarks/memory_plan.py: the exact parts of the plan equal what the compiled step takes and
what the devices hold; a 7B / 70B plan allocates nothing model-sized; topologies by name.

The TPU compile itself needs libtpu (Python >= 3.12, `pip install "jax[tpu]"`), which CI does
not have: these tests run the same code on the 8 simulated CPU devices."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxtrain import Trainer
from jaxtrain.errors import ConfigError
from jaxtrain.tasks.lm import LMTask
from tests.test_lm_task import load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_estimate as est  # noqa: E402
import memory_plan as plan  # noqa: E402


def device0_bytes(tree) -> int:
    """Bytes of the arrays of `tree` that device 0 holds, read off the real shards."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)


def test_exact_parts_equal_the_devices_shards_and_the_compiled_arguments():
    config = load_config("lm", "runlocal", mesh__data=1, mesh__fsdp=-1)
    trainer = Trainer(config, workdir="/tmp/jaxtrain-memory-plan-test")
    planned = est.state_bytes(trainer.abstract_state, trainer.state_shardings)

    state = trainer.init_state()  # the reference: what the devices really hold
    assert planned.params == device0_bytes(state.params)
    assert planned.opt_state == device0_bytes(state.opt_state)
    assert planned.grads == planned.params
    assert planned.other == sum(device0_bytes(getattr(state, f))
                                for f in ("step", "rng", "frozen"))
    # FSDP over 8 really splits the model (so the test would notice replication)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    assert planned.params < total / 4

    memory = plan.compiled_memory(trainer)
    _, batch = plan.abstract_inputs(trainer)
    batch_bytes = sum(est.shard_bytes(x, x.sharding) for x in batch.values())
    assert memory["argument"] == (planned.params + planned.opt_state + planned.other
                                  + batch_bytes)
    assert memory["total"] == memory["argument"] + memory["output"] + memory["temp"] - \
        memory["alias"]


@pytest.mark.parametrize("size", ["7b", "70b"])
def test_big_plans_allocate_nothing_model_sized(size):
    config = load_config("lm", f"size={size},scan", mesh__data=1, mesh__fsdp=-1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = plan.plan_row(config, jax.devices(), "dots_no_batch", "none", compile_step=False,
                        platform="cpu")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    e = row["estimate_gib"]
    model = LMTask(config).model_config
    fp32_state = model.num_params() * 4  # the params alone, unsharded
    assert grown < fp32_state / 20, f"the plan grew the host memory by {grown / 2**30:.1f} GiB"
    # independent reference: every large dimension divides by 8, so each device holds 1/8
    per_device = model.num_params() * 4 / 8 / est.GIB
    assert e["params"] == pytest.approx(per_device, rel=1e-3)
    assert e["grads"] == e["params"]
    assert e["opt_state"] == pytest.approx(2 * per_device, rel=1e-3)  # AdamW: mu and nu
    assert e["total"] > e["params"] + e["opt_state"] + e["grads"] + e["activations"]


def test_activation_formula_orders_the_policies():
    m = est.DecoderShape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128,
                         layers=32, vocab=32000, compute_bytes=2, flash_attention=False)
    saved = {p: est.activation_bytes(m, p, rows=1, seq_len=4096)["saved"]
             for p in ("full", "attention_out", "dots_no_batch", "dots", "none")}
    assert list(saved.values()) == sorted(saved.values())
    # full remat keeps one bf16 hidden vector per token and layer
    assert saved["full"] == 32 * 4096 * 4096 * 2
    with pytest.raises(ValueError, match="no activation formula for remat policy 'mystery'"):
        est.activation_bytes(m, "mystery", rows=1, seq_len=8)


@pytest.mark.parametrize("name,chips,grid", [
    ("v5p-16", 8, "v5p:2x2x2"), ("v5p-128", 64, "v5p:4x4x4"), ("v4-16", 8, "v4:2x2x2"),
    ("v5e-64", 64, "v5e:8x8"), ("v5litepod-16", 16, "v5e:4x4"), ("v5p:2x2x4", 16, "v5p:2x2x4"),
    ("gpu-8", 8, None)])
def test_topology_names(name, chips, grid):
    topo = plan.parse_topology(name)
    assert (topo["chips"], topo["grid"]) == (chips, grid)


def test_bad_topology_names_the_flag_and_the_forms():
    with pytest.raises(ConfigError, match=r"--topology='v9-3'.*v5p-N"):
        plan.parse_topology("v9-3")
    with pytest.raises(ConfigError, match="no known chip grid for 3 chips"):
        plan.parse_topology("v5e-3")


def test_cli_estimate_for_a_gpu_cluster():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_plan.py"),
         "--config=configs/lm.py:size=7b,scan", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
         "--config.data.seq_len=4096", "--topology=gpu-8", "--estimate",
         "--remat=full,dots_no_batch", "--offload=none"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "gpu-8 (8 devices, gpu, estimate only)" in lines[0]
    assert "batch 64 x 4096" in lines[0]
    assert "fits 79.6 GiB" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert set(rows) == {"full", "dots_no_batch"}
    # exact parts: 7B fp32 params / 8 ≈ 3.2 GiB per device, AdamW state twice that
    assert float(rows["full"][2]) == pytest.approx(3.2, abs=0.1)
    assert float(rows["full"][3]) == pytest.approx(6.4, abs=0.2)


def test_a_step_too_big_for_the_chip_is_a_row_saying_so():
    # the TPU compiler's message for 7B, batch 8 x 4096 on v5p-16 without remat
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the "
               "total memory required for HLO temporaries (141.68G) exceeds available HBM "
               "(95.73G). HLO module: jit_train_step.")
    oom = plan.compile_oom(message)
    assert oom == {"temp": 141.68, "hbm": 95.73}
    assert plan.compile_oom("RESOURCE_EXHAUSTED: something else") is None
    e = {"params": 3.2, "opt_state": 6.4, "grads": 3.2, "activations": 80.0, "transient": 8.0,
         "total": 101.0, "host_state": 0.0}
    text = plan.table([{"policy": "none", "offload": "none", "estimate_gib": e,
                        "compiled_oom": oom}], 95.0)
    assert text.splitlines()[1].endswith(
        "no: the compiler needs 141.68G of temporaries, 95.73G available")


def test_offloaded_state_counts_as_host_memory():
    config = load_config("lm", "runlocal", mesh__data=1, mesh__fsdp=-1)
    if "offload_state" not in config.optim:
        pytest.skip("this jaxtrain has no optim.offload_state")
    on_device = Trainer(config, workdir="/tmp/x")
    offloaded = Trainer(plan.with_overrides(config, {"optim.offload_state": True}),
                        workdir="/tmp/x")
    a = est.state_bytes(on_device.abstract_state, on_device.state_shardings)
    b = est.state_bytes(offloaded.abstract_state, offloaded.state_shardings)
    assert (b.opt_state, b.host_opt_state) == (0, a.opt_state)
    assert (b.params, b.host_params) == (a.params, 0)
