"""Deterministic, per-host, resumable iteration over a random-access source (grain)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np


def train_iterator(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless, reshuffled-every-epoch batches of this host's share of `source`.

    Host h reads rows h, h+P, h+2P, ...; `batch_size` is per host. The iterator's
    `get_state()/set_state()` make a resumed run see exactly the batches it would have seen.
    """
    if len(source) // process_count < batch_size:
        raise ValueError(
            f"Per-host batch size {batch_size} is larger than this host's share of the data "
            f"({len(source)} rows / {process_count} hosts): use a smaller batch or more data."
        )
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.seed(seed).shuffle().repeat(None).batch(batch_size, drop_remainder=True)
    return iter(ds)


def eval_batches(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass in order; the last batch is padded by repeating row 0 and carries `valid`
    (1 for real rows, 0 for padding) so metrics can drop the padding."""
    n = len(source)
    per_host = -(-n // process_count)
    num_batches = -(-per_host // batch_size)
    for b in range(num_batches):
        rows, valid = [], []
        for j in range(batch_size):
            local = b * batch_size + j
            index = local * process_count + process_index
            ok = local < per_host and index < n
            rows.append(source[index if ok else 0])
            valid.append(ok)
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["valid"] = np.asarray(valid, dtype=bool)
        yield batch
