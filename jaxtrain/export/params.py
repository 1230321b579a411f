"""The params as files: one flat safetensors file (the bundle's), or a params-only jaxtrain
checkpoint (`--params_out`, which `init_from` and `distill.teacher` accept)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtrain.export.checks import ExportError
from jaxtrain.file_modes import save_safetensors as save_safetensors_file
from jaxtrain.tree import nest, path_str

# --dtype's values -> dtype names; the full names (checkpoint.save_dtype's) are accepted too
SAVE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def save_dtype(flag: str | None, config: Mapping[str, Any]) -> str:
    """The dtype params-only exports are written in: `flag` (--dtype: bf16 | fp16 | fp32, or
    bfloat16 | float16 | float32) when given, else the run's `checkpoint.save_dtype`; '' = as
    trained (the checkpoint's own dtypes)."""
    value = flag if flag else config.get("checkpoint", {}).get("save_dtype", "")
    name = SAVE_DTYPES.get(value, value)
    if name not in ("", *SAVE_DTYPES.values()):
        where = "--dtype" if flag else "the run's checkpoint.save_dtype"
        raise ExportError(f"{where} {value!r} is not a save dtype: use one of "
                          f"{', '.join(SAVE_DTYPES)} (or {', '.join(SAVE_DTYPES.values())}).")
    return name


def cast_params(params: Any, dtype: str) -> Any:
    """`params` with every floating leaf cast to `dtype` on the host (round to nearest even;
    '' = unchanged); integer leaves stay. Raises ExportError naming the first parameter whose
    finite values overflow `dtype` (float16: |x| > 65504)."""
    if not dtype:
        return params
    import jax.numpy as jnp
    from flax.core import meta

    target = jnp.dtype(dtype)

    def cast(path, x):
        x = np.asarray(jax.device_get(x))
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == target:
            return x
        with np.errstate(over="ignore"):
            y = x.astype(target)
        if np.any(np.isfinite(x) & ~np.isfinite(y.astype(np.float32))):
            raise ExportError(f"param {path_str(path)} has values beyond {dtype}'s range "
                              f"(max |x| = {float(np.max(np.abs(x))):.4g}): export it with "
                              "--dtype=bf16 or fp32.")
        return y

    return jax.tree_util.tree_map_with_path(cast, meta.unbox(params))


def export_params(path: str, params: Any, config: dict, step: int = 0) -> str:
    """Merged params + config as `<path>/checkpoints/<step>/{state,meta}` (what
    `jaxtrain.weights.read_run` reads), the config's LoRA off; returns the step directory.
    Refuses an existing one."""
    step_dir = os.path.join(os.path.abspath(path), "checkpoints", str(step))
    if os.path.exists(step_dir):
        raise FileExistsError(f"{step_dir} exists: export to a new directory.")
    ocp.PyTreeCheckpointer().save(os.path.join(step_dir, "state"), {"params": params})
    config = {**config, "lora": {**config.get("lora", {}), "rank": 0}}
    os.makedirs(os.path.join(step_dir, "meta"), exist_ok=True)
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        json.dump({"step": step, "config": config}, f)
    return step_dir


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """{'/'-joined path: host array} (boxed leaves unboxed), in jax's flattening order."""
    from flax.core import meta

    leaves = jax.tree_util.tree_flatten_with_path(meta.unbox(params))[0]
    return {path_str(p): np.asarray(jax.device_get(x), order="C") for p, x in leaves}


def save_safetensors(path: str, params: Any) -> dict[str, np.ndarray]:
    """`params` flattened by path into one safetensors file; returns the flat dict."""
    import ml_dtypes  # noqa: F401  (bfloat16 leaves)

    flat = flatten_params(params)
    save_safetensors_file(flat, path, metadata={"format": "jaxtrain",
                                                "layout": "'/'-joined param paths"})
    return flat


def load_safetensors(path: str) -> dict:
    """The nested params of a file written by :func:`save_safetensors`."""
    from safetensors.numpy import load_file

    return nest(load_file(path))
