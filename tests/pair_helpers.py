"""What the pair-data tests share: a data config, taking batches, comparing batches."""

from __future__ import annotations

import numpy as np

from jaxtrain.data import pair_config


def data_config(**overrides):
    """`config.data` of the contrastive task, no prefetch, with `overrides`."""
    d = pair_config.default_data_config()
    d.prefetch = 0
    for k, v in overrides.items():
        d[k] = v
    return d


def take(it, n: int) -> list:
    """The next `n` batches of `it`."""
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list, b: list, dtypes: bool = True) -> None:
    """Equal batch lists: same keys, equal arrays (and, with `dtypes`, equal dtypes)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for k in x:
            if dtypes:
                assert x[k].dtype == y[k].dtype, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
