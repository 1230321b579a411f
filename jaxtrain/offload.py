"""Host offload of train-state fields with JAX memory kinds.

`optim.offload_state=True` keeps the optimizer state, `model.offload_params=True` the parameters,
in host memory (memory kind ``pinned_host``) under the same sharding as on the device: each
device's shard lives in its host's RAM. The jitted step brings them to the device for the
forward/backward and the update (:func:`on_device`: ``jax.device_put`` to the device memory space
inside the step) and its out-shardings send the new values back to host memory, so between steps
the device holds neither. Checkpoints need nothing special: Orbax saves host arrays and restores
onto the host shardings it is given.

Why device_put and not ``jax.experimental.compute_on('device_host')`` (the update run by the
host's CPU): XLA:CPU runs both, but there the host and the device are the same processor, so
nothing could be learned about host compute; device_put is the documented, non-experimental path
on every backend with memory kinds, and gives the same numbers as without offload (tested: same
losses, params and optimizer state).

What it saves: the step's arguments and results leave the device (its device-resident argument
bytes drop by the offloaded share, :func:`jaxtrain.memory.argument_bytes`). Inside the step the
offloaded tree is brought to the device for its use (XLA schedules the copies), so the step's
temporaries may still hold it; how much of that XLA overlaps is the accelerator compiler's
choice and was not measured here (no GPU/TPU at hand; XLA:CPU has one memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

from jaxtrain.errors import ConfigError

HOST = "pinned_host"
# TrainState field -> the config key that offloads it.
OFFLOAD_KEYS = {"params": "model.offload_params", "opt_state": "optim.offload_state"}


def offloaded_fields(config: Any) -> tuple[str, ...]:
    """The TrainState fields the config keeps in host memory (`model.offload_params`,
    `optim.offload_state`); a model config without the key never offloads."""
    fields = []
    if config.model.get("offload_params", False):
        fields.append("params")
    if config.optim.get("offload_state", False):
        fields.append("opt_state")
    return tuple(fields)


def check_supported(devices: Iterable[jax.Device], fields: Iterable[str]) -> None:
    """Every device must address `pinned_host` memory, else a ConfigError naming the key."""
    fields = list(fields)
    if not fields:
        return
    for device in devices:
        kinds = [m.kind for m in device.addressable_memories()]
        if HOST not in kinds:
            keys = ", ".join(f"{OFFLOAD_KEYS[f]}=True" for f in fields)
            raise ConfigError(
                f"{keys}: device {device} ({device.platform}) has no {HOST!r} memory (it has "
                f"{kinds}), so nothing can be offloaded to the host. Set them to False.")


def host_shardings(shardings: Any, fields: Iterable[str]) -> Any:
    """`shardings` (a TrainState of shardings) with the `fields` moved to host memory: the
    same mesh and partition specs, memory kind ``pinned_host``."""
    moved = {f: jax.tree.map(lambda s: s.with_memory_kind(HOST), getattr(shardings, f))
             for f in fields}
    return shardings.replace(**moved) if moved else shardings


def to_device(tree: Any) -> Any:
    """Inside a jitted function: `tree` moved to device memory (sharding unchanged)."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def params_on_device(params: Any, fields: Iterable[str]) -> Any:
    """Inside a jitted function: `params` on the device when they are offloaded (eval steps)."""
    return to_device(params) if "params" in tuple(fields) else params


def on_device(step_fn: Callable, fields: Iterable[str]) -> Callable:
    """`step_fn(state, batch)` with the offloaded `fields` of `state` moved to the device first.
    The jit's out-shardings (host memory for those fields) move the new values back."""
    fields = tuple(fields)
    if not fields:
        return step_fn

    def step(state, batch):
        moved = {f: to_device(getattr(state, f)) for f in fields}
        return step_fn(state.replace(**moved), batch)

    return step
