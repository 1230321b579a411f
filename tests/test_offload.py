"""Host offload (optimizer state, params, activations) and memory in the logs.

XLA:CPU has the memory kinds ('device', 'pinned_host', 'unpinned_host' per device), compiles
transfers between them and runs them; what it does not do is split its memory analysis by memory
space (`host_argument_size_in_bytes` stays 0: host arguments are counted with the device's), and
its lowering drops activation-offload transfers (the policy is traced, but both spaces are the
same RAM). The tests check the rest against independent references: the run without offload, the
bytes of the arrays' own shards, and the compiled module's entry layout (`S(5)` = host space).
"""

import json
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer, memory, offload
from jaxtrain.api import build_task
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.mesh import shard_batch

from .test_lm_task import leaves, load_config, two_steps

MESH = dict(data=2, fsdp=4)
# element sizes of the HLO types a train state holds
HLO_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}


def lm(**overrides):
    c = load_config("lm", **overrides)
    c.mesh.update(MESH)
    return c


def shard_bytes(tree) -> int:
    """Bytes of device 0's shards of a tree of arrays (what one device holds)."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def host_space_argument_bytes(compiled) -> int:
    """Bytes of the entry parameters the compiled module places in host memory (layout S(5))."""
    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", compiled.as_text()).group(1)
    total = 0
    for dtype, dims, tiling in re.findall(r"(\w+)\[([\d,]*)\]\{([^}]*)\}", layout):
        if "S(5)" in tiling:
            total += HLO_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def test_offloaded_optimizer_state_trains_the_same_from_host_memory():
    base, off = Trainer(lm()), Trainer(lm(optim__offload_state=True))
    it = base.task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]
    s0, m0 = two_steps(base, batches)
    s1, m1 = two_steps(off, batches)
    np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m0], rtol=1e-6)
    for x, y in zip(leaves(s1.params), leaves(s0.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)
    for x, y in zip(leaves(s1.opt_state), leaves(s0.opt_state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)

    # the same sharding, in host memory; the arrays live there; params stay on the device
    for s, d in zip(jax.tree.leaves(off.state_shardings.opt_state),
                    jax.tree.leaves(base.state_shardings.opt_state), strict=True):
        assert (s.memory_kind, s.spec) == ("pinned_host", d.spec)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(s1.opt_state)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(s1.params)} == {"device"}

    # the compiled step's device-resident arguments drop by the optimizer state's share
    batch = shard_batch(batches[0], base.mesh)
    c0, c1 = base.compiled_step(s0, batch), off.compiled_step(s1, batch)
    moved = shard_bytes(s1.opt_state)
    assert moved > shard_bytes(s1.params)  # adam: two moments per param (and a count)
    assert c0.memory.get("argument_pinned_host", 0) == 0
    assert c0.memory["argument_device"] == c0.memory["argument"]  # the split adds up
    assert c1.memory["argument_pinned_host"] == moved == host_space_argument_bytes(c1.fn)
    assert c1.memory["argument_device"] == c0.memory["argument_device"] - moved
    assert host_space_argument_bytes(c0.fn) == 0
    if c1.memory["host_argument"]:  # a backend that splits its analysis by memory space
        assert c1.memory["argument"] == c0.memory["argument"] - moved
    else:  # XLA:CPU counts host arguments with the device's
        assert c1.memory["argument"] == c0.memory["argument"]


def test_offloaded_params_resume_from_a_checkpoint_and_log_memory(tmp_path):
    settings = dict(train__steps=4, checkpoint__every=2, eval__every=0, train__log_every=1)
    on_device = Trainer(lm(**settings), str(tmp_path / "device"))
    straight = on_device.train()
    cut = lm(model__offload_params=True, optim__offload_state=True, **settings)
    first = Trainer(cut, str(tmp_path / "host")).train(stop_at_step=2)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(first.final_state.params)} == {
        "pinned_host"}
    # the checkpoint is an ordinary one: it restores onto host or device shardings alike
    host = Trainer(cut, str(tmp_path / "host"))
    ckpt = Checkpointer(str(tmp_path / "host" / "checkpoints"))
    for trainer, kind in ((host, "pinned_host"), (on_device, "device")):
        state, _ = ckpt.restore(2, trainer.abstract_state, trainer.state_shardings,
                                trainer.train_iterator())
        assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)} == {kind}
        for x, y in zip(leaves(state.params), leaves(first.final_state.params), strict=True):
            np.testing.assert_array_equal(x, y)
    ckpt.close()
    resumed = host.train()  # restores onto host shardings
    assert [s for s, _ in resumed.loss_history] == [3, 4]
    np.testing.assert_allclose([loss for _, loss in first.loss_history + resumed.loss_history],
                               [loss for _, loss in straight.loss_history], rtol=1e-5)
    state = resumed.final_state
    for field in ("params", "opt_state"):
        assert {x.sharding.memory_kind for x in jax.tree.leaves(getattr(state, field))} == {
            "pinned_host"}, field
    for x, y in zip(leaves(state.params), leaves(straight.final_state.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # the final evaluation ran on the offloaded params, and matches the run without offload
    np.testing.assert_allclose(resumed.metrics[-1]["eval/val/loss"],
                               straight.metrics[-1]["eval/val/loss"], rtol=1e-5)

    records = [json.loads(line) for line in open(tmp_path / "host" / "metrics.jsonl")]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert 0.01 < r["perf/host_rss_gib"] < 1024, r  # this process: tens of MB to GBs
    stats = jax.devices()[0].memory_stats()
    assert ("perf/peak_memory_gib" in train[0]) == bool(stats and "peak_bytes_in_use" in stats)


def test_memory_metrics_take_the_largest_device_and_read_host_rss():
    def fake(stats):
        return types.SimpleNamespace(memory_stats=lambda: stats)

    out = memory.memory_metrics([fake({"peak_bytes_in_use": 3 * 2**30, "bytes_in_use": 2**30}),
                                 fake({"peak_bytes_in_use": 2**30, "bytes_in_use": 2**29})])
    assert out["perf/peak_memory_gib"] == 3.0 and out["perf/memory_in_use_gib"] == 1.0
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    assert abs(out["perf/host_rss_gib"] * 2**30 - rss) < 256 * 2**20  # read the same way, 256 MB
    assert set(memory.memory_metrics([fake(None)])) == {"perf/host_rss_gib"}  # XLA:CPU


def test_argument_bytes_count_what_the_executable_takes():
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    x = jax.device_put(np.ones((4, 8), np.float32), host)
    unused = {"u": jnp.ones(16)}  # pruned by jit: takes no memory
    compiled = jax.jit(lambda a, b, c, d: (jax.device_put(a, jax.memory.Space.Device) + c, d),
                       ).lower(x, unused, jnp.ones(8), jnp.ones(3, jnp.int32)).compile()
    split = memory.step_memory(compiled)
    assert (split["argument_pinned_host"], split["argument_device"]) == (4 * 8 * 4, 8 * 4 + 3 * 4)


def test_offload_needs_host_memory_on_every_device():
    memories = [types.SimpleNamespace(kind="device")]
    device = types.SimpleNamespace(addressable_memories=lambda: memories, platform="fake")
    with pytest.raises(ConfigError, match=r"model.offload_params=True, optim.offload_state=True"
                                          r".*no 'pinned_host' memory"):
        offload.check_supported([device], ("params", "opt_state"))
    offload.check_supported([device], ())  # nothing offloaded: nothing to check
    offload.check_supported(jax.devices(), ("params", "opt_state"))  # XLA:CPU has it


def test_activation_offload_policy_gives_the_same_loss_and_gradients():
    def loss_and_grads(policy):
        task, _ = build_task(load_config("lm", model__remat_policy=policy))
        params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
        batch = next(task.train_iterator(seed=0, batch_size=8, process_index=0,
                                         process_count=1))
        batch = jax.tree.map(jnp.asarray, batch)
        fn = jax.value_and_grad(task.loss_fn, has_aux=True)
        rng, frozen = jax.random.PRNGKey(1), nn.unbox(task.init_frozen(jax.random.PRNGKey(2)))
        jaxpr = str(jax.make_jaxpr(fn)(params, batch, rng, frozen))
        (loss, _), grads = jax.jit(fn)(params, batch, rng, frozen)
        return float(loss), grads, jaxpr

    loss0, grads0, jaxpr0 = loss_and_grads("none")
    for policy in ("offload_dots", "offload_attention_out"):
        loss, grads, jaxpr = loss_and_grads(policy)
        # what the policy keeps really is sent to host memory between forward and backward
        assert re.search(r"f32<host>\[\d+,\d+", jaxpr), policy
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert "<host>" not in jaxpr0
