"""Pytree path names: `'text_model/encoder/layers_0/mlp/fc1/kernel'` for a key path."""

from __future__ import annotations

from collections.abc import Sequence
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
