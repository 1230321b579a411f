"""Device mesh, logical-axis rules and shardings.

Parameters carry logical axis names ('embed', 'mlp', ...); :data:`DEFAULT_RULES` maps them to mesh
axes. A logical dimension whose size does not divide by its mesh axes is replicated instead, so a
small model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxtrain.axes import BATCH_AXES, MESH_AXES
from jaxtrain.errors import ConfigError
from jaxtrain.tree import key_name

# logical name -> mesh axes. First match wins (flax semantics); unknown names are replicated.
# Parameter names: embed, mlp, heads, kv_heads, head_dim, vocab, expert, layers (scan), ...
# Activation names (active while the step is traced): batch, length, act_*.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("expert_batch", ("data", "fsdp")),  # rows inside an MoE layer: experts take `expert`
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("act_embed", None),
    ("head_dim", None),
    ("layers", None),
    ("kv", None),
    ("length", None),
    ("norm", None),
    ("patch", None),
    ("pos", None),
)


# Keys of the config's `mesh` block that are settings, not axis sizes (left out of the shape).
MESH_OPTIONS = ("shard_optimizer",)


def mesh_axes(mesh_config: Mapping[str, int | bool]) -> dict[str, int]:
    """The axis sizes of a config's `mesh` block, without its settings (:data:`MESH_OPTIONS`)."""
    return {k: v for k, v in mesh_config.items() if k not in MESH_OPTIONS}


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve the config's axis sizes (-1 = the rest) against `num_devices`; settings such as
    `shard_optimizer` in the same block are ignored."""
    axes = mesh_axes(axes)
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"Unknown mesh axes {sorted(unknown)}; valid: {MESH_AXES}.")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {dict(axes)}: the fixed axes ({fixed} devices) do not divide the "
                f"{num_devices} available devices."
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(axes)} needs {math.prod(sizes)} devices but {num_devices} are available; "
            "set one axis to -1 to use the rest."
        )
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(axes, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over the data axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide evenly (replicate that dimension)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def logical_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of (boxed, logically partitioned) abstract params."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(abstract_boxed)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch → global jax.Arrays split over the data axes (multi-host safe)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def _keys(path) -> tuple[str, ...]:
    return tuple(key_name(k) for k in path)


def _names(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def split_over(sharding: NamedSharding, shape: tuple[int, ...], axis: str) -> NamedSharding:
    """`sharding` further split over the mesh axis `axis` (ZeRO: optimizer state over `data`).

    The axis goes to the largest dimension d (the leftmost of equal ones) with
    d % (size(axis) * prod(sizes of the axes already on d)) == 0, so each device holds
    1/size(axis) of what it held. Unchanged (replicated over `axis`) when `axis` has size 1, is
    already used, or divides no dimension (scalars, odd sizes). The memory kind is kept."""
    mesh = sharding.mesh
    size = mesh.shape[axis]
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if size == 1 or any(axis in _names(e) for e in spec):
        return sharding
    fits = [i for i, (dim, e) in enumerate(zip(shape, spec, strict=True))
            if dim % (size * math.prod(mesh.shape[a] for a in _names(e))) == 0]
    if not fits:
        return sharding
    best = max(fits, key=lambda i: (shape[i], -i))
    new = list(spec)
    new[best] = (*_names(spec[best]), axis) if _names(spec[best]) else axis
    return NamedSharding(mesh, PartitionSpec(*new), memory_kind=sharding.memory_kind)


def shardings_like_params(abstract_tree, abstract_params, param_shardings, mesh: Mesh,
                          split_axis: str | None = None):
    """Shardings for a tree holding copies of the params (optimizer moments): a leaf whose path
    ends with a parameter's path and has its shape gets that parameter's sharding, any other
    leaf (counts, factored statistics) is replicated. `split_axis` (e.g. 'data', for
    `mesh.shard_optimizer`): every leaf is further split over that axis (:func:`split_over`),
    so the params stay replicated over it and their optimizer state does not."""
    by_path = {
        _keys(p): (x.shape, s)
        for (p, x), s in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }

    def pick(path, x):
        keys = _keys(path)
        for start in range(len(keys)):
            shape, sharding = by_path.get(keys[start:], (None, None))
            if shape == x.shape:
                return sharding
        return replicated(mesh)

    shardings = jax.tree_util.tree_map_with_path(pick, abstract_tree)
    if split_axis is None:
        return shardings
    return jax.tree.map(lambda s, x: split_over(s, x.shape, split_axis), shardings, abstract_tree)
