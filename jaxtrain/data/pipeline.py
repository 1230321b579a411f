"""Deterministic, per-host, resumable iteration over a random-access source (grain)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import flags

if TYPE_CHECKING:  # grain is imported when an iterator is built (benchmarks run without it)
    import grain


def train_iterator(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    transform: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    row_map: Callable[[int, Any], dict[str, np.ndarray]] | None = None,
    workers: int = 0,
    prefetch: int | None = None,
) -> grain.DatasetIterator:
    """Endless, reshuffled-every-epoch batches of this host's rows of each global batch.

    The global stream is `source` shuffled (a new order every epoch) and cut into global batches
    of `batch_size * process_count` rows; host h reads only rows [h*B, (h+1)*B) of each, so the
    global batch is the same whatever the number of hosts, and so is a run's data order.
    The iterator's `get_state()/set_state()` make a resumed run see exactly the batches it would
    have seen; its position counts global batches, so it means the same on any number of hosts.
    `transform(step, batch)` reshapes batch `step` (e.g. a sequence-length curriculum); it must
    treat every row alike, so that it means the same on every host.

    `row_map(position, row)` turns a source row into the row that is batched (decoding,
    augmentation); `position` is the row's index in the global stream (epoch * len(source) +
    rank in that epoch's order), the same on any number of hosts and after a resume, so
    randomness drawn from (seed, position) makes the run reproducible and differs across epochs.
    It is run lazily, only on this host's rows.
    `workers > 0` prepares batches in that many grain worker processes (spawned: `source` and
    the callables must pickle), `prefetch` batches ahead each; the order and the state are the
    same as with `workers=0`. With `workers=0`, `prefetch=n` prepares up to n batches ahead in
    n threads (0: synchronously, in the calling thread); None keeps grain's default read options.
    """
    if len(source) < batch_size * process_count:
        raise ValueError(
            f"The global batch ({batch_size} x {process_count} hosts) is larger than the data "
            f"({len(source)} rows): use a smaller batch or more data."
        )
    if workers < 0 or (prefetch is not None and prefetch < 0):
        raise ValueError(f"workers and prefetch must be >= 0; got {workers}, {prefetch}.")
    import grain

    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    if row_map is not None:
        ds = ds.map_with_index(row_map)
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    if transform is not None:
        ds = ds.map_with_index(transform)
    if workers > 0:
        from jaxtrain.data.spawn import check_spawn_safe

        check_spawn_safe(f"data.workers={workers}")  # an unguarded script: an error, not a hang
        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (not under app.run)
            flags.FLAGS.mark_as_parsed()
        per_worker = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        options = grain.MultiprocessingOptions(num_workers=workers,
                                               per_worker_buffer_size=max(1, prefetch or 1))
        return iter(ds.to_iter_dataset(per_worker).mp_prefetch(options))
    if prefetch is not None:
        return iter(ds.to_iter_dataset(
            grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))
    return iter(ds)


def eval_batches(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    row_map: Callable[[int, Any], dict[str, np.ndarray]] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass in order; the last batch is padded by repeating row 0 and carries `valid`
    (1 for real rows, 0 for padding) so metrics can drop the padding.

    `row_map(index, row)`, if given, turns source row `index` into the row that is batched."""
    def row(index: int) -> dict[str, np.ndarray]:
        return source[index] if row_map is None else row_map(index, source[index])

    n = len(source)
    per_host = -(-n // process_count)
    num_batches = -(-per_host // batch_size)
    padding = None
    for b in range(num_batches):
        rows, valid = [], []
        for j in range(batch_size):
            local = b * batch_size + j
            index = local * process_count + process_index
            ok = local < per_host and index < n
            if not ok and padding is None:
                padding = row(0)
            rows.append(row(index) if ok else padding)
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
