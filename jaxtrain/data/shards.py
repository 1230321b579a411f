"""ArrayRecord shards of rows: a compact record encoding, a shard writer and a random-access
reader (grain reads the shards with ``grain.sources.ArrayRecordDataSource``).

Record encoding (:func:`encode_record` / :func:`decode_record`), no pickle::

    b"JTR1" | uint32 little-endian n | n bytes of JSON header | payload

The header is the row (a dict) with every numpy array replaced by ``{"$array": [dtype, shape,
start, length]}`` and every bytes value by ``{"$bytes": [start, length]}``, pointing into the
payload; strings, numbers, lists and dicts stay JSON. Decoding reads arrays without a copy
(``np.frombuffer`` over the record), so a stored uint8 ``[H, W, 3]`` image costs one read.

Shards (:class:`ShardWriter`): ``{split}-{k:05d}-of-{n:05d}.array_record``, a new one every
``rows_per_shard`` rows, written with ``group_size:1`` (each record individually seekable: the
random access grain's shuffling needs). :class:`ShardRows` reads them back by global index.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"JTR1"
WRITER_OPTIONS = "group_size:1,uncompressed"


def encode_record(row: dict[str, Any]) -> bytes:
    """The bytes of one row (module docstring): arrays and bytes go to the payload."""
    payload: list[bytes] = []
    size = 0

    def put(value: Any) -> Any:
        nonlocal size
        if isinstance(value, np.ndarray):
            data = np.ascontiguousarray(value).tobytes()
            payload.append(data)
            size += len(data)
            return {"$array": [value.dtype.str, list(value.shape), size - len(data), len(data)]}
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            payload.append(data)
            size += len(data)
            return {"$bytes": [size - len(data), len(data)]}
        if isinstance(value, dict):
            return {str(k): put(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [put(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    header = json.dumps(put(row), separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *payload])


def decode_record(record: bytes) -> dict[str, Any]:
    """The row :func:`encode_record` wrote (arrays are read-only views of ``record``)."""
    if record[:4] != MAGIC:
        raise ValueError(f"not a jaxtrain shard record (starts with {bytes(record[:4])!r}, "
                         f"expected {MAGIC!r}); the shard was written by something else")
    (n,) = struct.unpack_from("<I", record, 4)
    start = 8 + n
    view = memoryview(record)

    def get(value: Any) -> Any:
        if isinstance(value, dict):
            if "$array" in value:
                dtype, shape, offset, length = value["$array"]
                a = np.frombuffer(view[start + offset:start + offset + length], np.dtype(dtype))
                return a.reshape(shape)
            if "$bytes" in value:
                offset, length = value["$bytes"]
                return bytes(view[start + offset:start + offset + length])
            return {k: get(v) for k, v in value.items()}
        if isinstance(value, list):
            return [get(v) for v in value]
        return value

    return get(json.loads(view[8:start].tobytes()))


def shard_name(split: str, k: int, n: int) -> str:
    return f"{split}-{k:05d}-of-{n:05d}.array_record"


class ShardWriter:
    """Writes the rows of one split into ``out`` as ArrayRecord shards of ``rows_per_shard``
    rows. :meth:`close` renames them to ``{split}-k-of-n`` names and returns those names."""

    def __init__(self, out: str, split: str, rows_per_shard: int) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1; got {rows_per_shard}")
        self.out, self.split, self.rows_per_shard = out, split, rows_per_shard
        self.paths: list[str] = []
        self.rows = 0
        self._writer = None

    def write(self, row: dict[str, Any]) -> None:
        self.write_encoded(encode_record(row))

    def write_encoded(self, record: bytes) -> None:
        """Append a record :func:`encode_record` made."""
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.rows % self.rows_per_shard == 0:
            self._close_writer()
            path = os.path.join(self.out, f".{self.split}-{len(self.paths):05d}.tmp")
            self.paths.append(path)
            self._writer = ArrayRecordWriter(path, WRITER_OPTIONS)
        self._writer.write(record)
        self.rows += 1

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        """The shard file names (relative to ``out``), in order."""
        self._close_writer()
        names = [shard_name(self.split, k, len(self.paths)) for k in range(len(self.paths))]
        for path, name in zip(self.paths, names, strict=True):
            os.replace(path, os.path.join(self.out, name))
        return names


class ShardRows(Sequence):
    """Random access to the decoded rows of ArrayRecord shards (grain's
    ``ArrayRecordDataSource``; it pickles for grain's worker processes). ``indices`` keeps
    only those rows, in that order."""

    def __init__(self, paths: Sequence[str], indices: np.ndarray | None = None) -> None:
        import grain

        self.paths = list(paths)
        self.source = grain.sources.ArrayRecordDataSource(self.paths)
        self.indices = None if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        j = i if self.indices is None else int(self.indices[i])
        return decode_record(self.source[j])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ShardRows:
        """The rows at ``indices`` (of this sequence), in that order."""
        base = np.arange(len(self.source)) if self.indices is None else self.indices
        return ShardRows(self.paths, base[np.asarray(indices, np.int64)])
