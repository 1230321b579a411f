"""Deterministic, per-host, resumable iteration over a random-access source (grain)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
    transform: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> grain.DatasetIterator:
    """Endless, reshuffled-every-epoch batches of this host's rows of each global batch.

    The global stream is `source` shuffled (a new order every epoch) and cut into global batches
    of `batch_size * process_count` rows; host h reads only rows [h*B, (h+1)*B) of each, so the
    global batch is the same whatever the number of hosts, and so is a run's data order.
    The iterator's `get_state()/set_state()` make a resumed run see exactly the batches it would
    have seen; its position counts global batches, so it means the same on any number of hosts.
    `transform(step, batch)` reshapes batch `step` (e.g. a sequence-length curriculum); it must
    treat every row alike, so that it means the same on every host.
    """
    if len(source) < batch_size * process_count:
        raise ValueError(
            f"The global batch ({batch_size} x {process_count} hosts) is larger than the data "
            f"({len(source)} rows): use a smaller batch or more data."
        )
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    if transform is not None:
        ds = ds.map_with_index(transform)
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


class ArrayRows(Sequence):
    """Random-access rows over a dict of arrays sharing their leading (row) dimension."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Row arrays must have the same number of rows; got {sizes}.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_rows = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not -self.num_rows <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.num_rows} rows")
        return {k: v[index] for k, v in self.arrays.items()}
