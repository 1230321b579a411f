"""Pytree path names: `'text_model/encoder/layers_0/mlp/fc1/kernel'` for a key path, and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax


def key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """The '/'-joined names of a `jax.tree_util` key path."""
    return "/".join(key_name(k) for k in path)


def nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': x, ...} -> {'a': {'b': {'c': x}}, ...}: the inverse of naming leaves by
    :func:`path_str` (for nested-dict trees)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
