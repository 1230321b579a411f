import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrain.config import ConfigError
from jaxtrain.mesh import _fit, data_parallel_size, make_mesh, mesh_shape, shard_batch


def test_mesh_shape_resolves_the_rest():
    assert mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1, 1)
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2, 1)
    assert mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1) == (1, 1, 1, 1)
    assert mesh_shape({"data": 2, "expert": -1}, 8) == (2, 1, 1, 4)
    with pytest.raises(ConfigError, match="needs 6 devices but 8"):
        mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="do not divide"):
        mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="Unknown mesh axes"):
        mesh_shape({"data": -1, "pipeline": 2}, 8)


def test_dimensions_that_do_not_divide_are_replicated():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert _fit(P("fsdp", "tensor"), (8, 6), mesh) == P("fsdp", "tensor")
    assert _fit(P("fsdp", "tensor"), (7, 6), mesh) == P(None, "tensor")
    assert _fit(P(("data", "fsdp"),), (6,), mesh) == P(None)
    assert _fit(P(), (3, 3), mesh) == P(None, None)


def test_shard_batch_splits_the_leading_axis_over_data_axes():
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    assert data_parallel_size(mesh) == 8
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = shard_batch({"x": x}, mesh)
    np.testing.assert_array_equal(jax.device_get(batch["x"]), x)
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 3)}


def test_fsdp_shards_params_and_optimizer_state_over_8_devices():
    """Per-device parameter + optimizer bytes shrink ~1/N under FSDP (1-D params replicate)."""
    from jaxtrain import Trainer
    from tests.test_trainer import clip_config

    def device0_bytes(mesh):
        cfg = clip_config(vision_width=64, text_width=64)
        cfg.mesh.update(mesh)
        trainer = Trainer(cfg)
        state = trainer.init_state()
        first = jax.devices()[0]
        total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
        mine = sum(s.data.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                   for s in x.addressable_shards if s.device == first)
        mu = state.opt_state[1].inner_states["default"].inner_state[0].mu
        fc1 = state.params["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
        assert mu["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding == \
            fc1.sharding
        return mine / total

    assert device0_bytes({"data": -1, "fsdp": 1, "tensor": 1}) == 1.0
    assert device0_bytes({"data": 1, "fsdp": -1, "tensor": 1}) < 1 / 8 + 0.03
    assert device0_bytes({"data": 1, "fsdp": 4, "tensor": 2}) < 1 / 8 + 0.03
