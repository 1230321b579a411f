"""Memory figures: device and host memory in use (for the logs) and a compiled step's bytes per
memory space.

    perf/peak_memory_gib    max over this host's devices of memory_stats()['peak_bytes_in_use']
    perf/memory_in_use_gib  max over this host's devices of memory_stats()['bytes_in_use']
    perf/host_rss_gib       this process's resident set size (/proc/self/status VmRSS)

Backends that report no device statistics (XLA:CPU: ``device.memory_stats()`` is None) log the
host RSS only.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

GIB = 2.0**30


def host_rss_bytes() -> int:
    """This process's resident set size now (VmRSS of /proc/self/status); where there is no
    /proc (macOS), its peak from getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def memory_metrics(devices: Iterable[jax.Device]) -> dict[str, float]:
    """`perf/peak_memory_gib` and `perf/memory_in_use_gib` (the largest over `devices`, where
    the backend reports them) and `perf/host_rss_gib`."""
    out: dict[str, float] = {}
    stats = [s for s in (d.memory_stats() for d in devices) if s]
    for key, name in (("peak_bytes_in_use", "peak_memory_gib"),
                      ("bytes_in_use", "memory_in_use_gib")):
        values = [s[key] for s in stats if key in s]
        if values:
            out[f"perf/{name}"] = max(values) / GIB
    out["perf/host_rss_gib"] = host_rss_bytes() / GIB
    return out


def _shard_bytes(shape: tuple[int, ...], dtype: Any, sharding: Any) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def argument_bytes(compiled: Any) -> dict[str, int]:
    """Bytes of one device's shards of a compiled function's arguments, per memory kind
    (``{'device': ..., 'pinned_host': ...}``), from its input shardings and shapes.

    XLA:CPU's ``memory_analysis()`` counts host-memory arguments with the device's
    (``host_argument_size_in_bytes`` is 0 there), so the split comes from the compiled
    executable's input formats, which carry the memory kind XLA compiled for. Arguments the
    function does not use (pruned by jit: no sharding) take no memory and are not counted."""
    out: dict[str, int] = {}
    infos = jax.tree.leaves(compiled.args_info)
    formats = jax.tree.leaves(compiled.input_formats)
    for info, fmt in zip(infos, formats, strict=True):
        sharding = fmt.sharding
        if sharding is None:  # pruned
            continue
        kind = sharding.memory_kind or "device"
        out[kind] = out.get(kind, 0) + _shard_bytes(info.shape, info.dtype, sharding)
    return out


def step_memory(compiled: Any) -> dict[str, int]:
    """A compiled step's memory per device, in bytes: the backend's memory analysis
    (`argument`, `output`, `temp`, `host_argument`, ... as XLA reports them) and the argument
    bytes per memory kind (`argument_device`, `argument_pinned_host`, :func:`argument_bytes`)."""
    out: dict[str, int] = {}
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without one
        analysis = None
    for name in ("argument", "output", "alias", "temp", "generated_code", "host_argument",
                 "host_output", "host_alias", "host_temp"):
        value = getattr(analysis, f"{name}_size_in_bytes", None) if analysis else None
        if value is not None:
            out[name] = int(value)
    for kind, value in argument_bytes(compiled).items():
        out[f"argument_{kind}"] = value
    return out
