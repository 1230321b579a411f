"""What every Hugging Face converter shares: reading and writing a transformers checkpoint
directory's safetensors weights (single file or shards + index), param-tree plumbing, and the
error for a state dict that does not fit the model."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy for safetensors)
import numpy as np

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"unsupported {CONFIG} value {key}={value!r}: {why}")


def same(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def f32(x: Any) -> np.ndarray:
    # Not np.ascontiguousarray: it turns 0-d arrays (CLIP's logit_scale) into shape [1].
    return np.asarray(x, dtype=np.float32, order="C")


def to_numpy(x: Any) -> np.ndarray:
    """A (possibly multi-host sharded) jax array or anything array-like as float32 numpy."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return f32(jax.device_get(x))


def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mappings -> {path tuple: leaf}."""
    if isinstance(tree, Mapping):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, (*prefix, str(k))))
        return out
    return {prefix: tree}


def mismatch_error(what: str, against: str, missing: list[str], unexpected: list[str],
                   shapes: list[str]) -> ValueError:
    """`what` does not match `against`: the missing / unexpected keys and shape mismatches."""
    def first(names: list[str]) -> str:
        more = f" ... (+{len(names) - 8} more)" if len(names) > 8 else ""
        return ", ".join(names[:8]) + more

    lines = [f"{what} does not match {against}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {first(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {first(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {first(shapes)}")
    return ValueError("\n".join(lines))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one file as float32 numpy (bf16 / f16 / f64 are cast)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return {name: f32(f.get_tensor(name)) for name in f.keys()}


def read_state(path: str, model_class: str) -> dict[str, np.ndarray]:
    """The float32 state dict of a transformers directory (`model.safetensors` or shards and
    their index). `model_class` (e.g. "CLIPModel") names the class in the conversion hint for
    a directory that holds only pickled PyTorch weights, which are never unpickled."""
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' (expected the transformers sharded "
                             "index format)")
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{index} lists shard {shard!r}, but {shard_path} does "
                                        "not exist (incomplete download?)")
            state.update(_read_safetensors(shard_path))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(f"{index} maps {absent[:5]} to shards that do not contain them")
        return state
    bins = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
            if os.path.isfile(os.path.join(path, n))]
    if bins:
        raise ValueError(
            f"{path} holds only pickled PyTorch weights ({bins[0]}); jaxtrain never unpickles "
            f"checkpoints. Convert them once to safetensors with transformers: {model_class}."
            f"from_pretrained({path!r}).save_pretrained(OUT_DIR, safe_serialization=True)")
    raise FileNotFoundError(
        f"no {SINGLE} or {INDEX} in {path} (found: {sorted(os.listdir(path))[:10]}); "
        "save the model with save_pretrained(..., safe_serialization=True)")


# The dtypes a transformers directory's weights are written in (config.json's torch_dtype)
WEIGHT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def cast_state(state: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """`state`'s float32 tensors as `dtype` (a name of :data:`WEIGHT_DTYPES`; round to nearest
    even), for writing. A ValueError for another name."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {dtype!r}")
    want = np.dtype(WEIGHT_DTYPES[dtype])
    return {k: v.astype(want) if v.dtype == np.float32 else v for k, v in state.items()}


def write_json(file: str, obj: Any) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _shards(state: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, value in state.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    return shards


def write_state(path: str, state: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """`state` as `model.safetensors`, or, when larger than `max_shard_bytes`, as numbered shards
    (`model-00001-of-00003.safetensors`, ...) + their index; weight files of an earlier save in
    `path` are removed."""
    from jaxtrain.file_modes import save_safetensors as save_file  # mode 0644, not 0600

    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name in (SINGLE, INDEX) or SHARD.match(name):
            os.remove(os.path.join(path, name))
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, os.path.join(path, SINGLE), metadata=metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, os.path.join(path, shard), metadata=metadata)
        weight_map.update(dict.fromkeys(names, shard))
    write_json(os.path.join(path, INDEX),
               {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
                "weight_map": weight_map})
