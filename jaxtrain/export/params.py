"""The params as files: one flat safetensors file (the bundle's), or a params-only jaxtrain
checkpoint (`--params_out`, which `init_from` and `distill.teacher` accept)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtrain.tree import nest, path_str


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
    from safetensors.numpy import save_file

    flat = flatten_params(params)
    save_file(flat, path, metadata={"format": "jaxtrain", "layout": "'/'-joined param paths"})
    return flat


def load_safetensors(path: str) -> dict:
    """The nested params of a file written by :func:`save_safetensors`."""
    from safetensors.numpy import load_file

    return nest(load_file(path))
