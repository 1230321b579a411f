"""Up-front checks of contrastive pair rows: run when a part of a dataset is loaded, so bad
rows are found before the train step compiles, not mid-training.

:func:`row_problems` finds, for a ``datasets.Dataset`` part:

- in every row, each role's cell (query, positive, negatives; :mod:`jaxtrain.data.pair_config`):
  a text that is missing or not a string; an image that is missing, a URL, or a path to a file
  that does not exist (relative paths resolve against the source's folder; a stat per row);
  a negatives list shorter than ``num_negatives`` (each of its items checked the same way);
- in a sample of rows, images that do not decode: the first :data:`SAMPLE_FIRST` rows and
  :data:`SAMPLE_RANDOM` more drawn with a fixed seed from the rest (rows already bad excluded),
  so the sample depends only on the data.

It returns ``{row index: problem}``; what to do with them is ``data.on_bad_row``'s
(:mod:`jaxtrain.data.sanity`, applied by :mod:`jaxtrain.data.pair_sources`). A corrupt image
outside the sample is found when its row is prepared (:mod:`jaxtrain.data.pair_rows`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtrain.data.images import decode_image

if TYPE_CHECKING:  # imported where cells are checked (datasets brings it; benchmarks lack it)
    import pyarrow as pa

SAMPLE_FIRST = 16  # rows decoded from the start of a part
SAMPLE_RANDOM = 16  # and drawn from the rest
SAMPLE_SEED = 0x5A3D1E  # the draw's seed: the sample depends on the data only


def _column(ds: Any, col: str) -> pa.ChunkedArray:
    """The arrow column ``col`` of a dataset (no copy unless it is a selection of rows)."""
    if getattr(ds, "_indices", None) is None:  # a plain (or contiguously sliced) table
        return ds.data.table.column(col)
    return ds.select_columns([col]).with_format("arrow")[:].column(col)


def _values(chunk: pa.Array) -> list[tuple[Any, bool]]:
    """(the cell without its bytes, whether it holds bytes) of each cell of an arrow chunk."""
    import pyarrow as pa

    kind = chunk.type
    if isinstance(kind, pa.BaseExtensionType) and kind.extension_name == "arrow.json":
        return [(None if v is None else json.loads(v), False)
                for v in chunk.storage.to_pylist()]
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        n, valid = len(chunk), chunk.is_valid().to_pylist()
        paths = chunk.field("path").to_pylist() if "path" in names else [None] * n
        has = chunk.field("bytes").is_valid().to_pylist() if "bytes" in names else [False] * n
        return [({"path": p} if v else None, h and v)
                for p, h, v in zip(paths, has, valid, strict=True)]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return [(None, v) for v in chunk.is_valid().to_pylist()]
    return [(v, False) for v in chunk.to_pylist()]


def text_problem(value: Any) -> str | None:
    """Why a text cell is bad, or None."""
    if value is None:
        return "is missing (null)"
    if not isinstance(value, str):
        return f"is a {type(value).__name__} ({str(value)[:60]!r}), not a string"
    return None


def image_problem(value: Any, has_bytes: bool, base_dir: str | None) -> str | None:
    """Why an image cell is bad without decoding it (missing, a URL, no such file), or None."""
    if has_bytes or isinstance(value, bytes | bytearray | np.ndarray):
        return None
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return None
        value = value.get("path")
    if value is None or value == "":
        return "is missing (null or an empty path)"
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not an image (bytes, a path or a {{'bytes', " \
               "'path'}} dict)"
    if value.startswith(("http://", "https://")):
        return f"is the URL {value!r}; download the images and store paths or bytes"
    full = os.path.expanduser(value)
    if not os.path.isabs(full) and base_dir:
        full = os.path.join(base_dir, full)
    if not os.path.exists(full):
        where = f" (resolved against {base_dir!r})" if base_dir and full != value else ""
        return f"is the image file {value!r}{where}, which does not exist"
    return None


def _cell_problems(chunk: pa.Array, kind: str, base_dir: str | None
                   ) -> Iterator[tuple[int, str]]:
    for i, (value, has_bytes) in enumerate(_values(chunk)):
        problem = text_problem(value) if kind == "text" else image_problem(value, has_bytes,
                                                                            base_dir)
        if problem is not None:
            yield i, problem


def _item_problem(items: list[Any], kind: str, base_dir: str | None) -> str | None:
    for k, item in enumerate(items):
        problem = text_problem(item) if kind == "text" else image_problem(item, False, base_dir)
        if problem is not None:
            return f"has a bad item {k}: it {problem}"
    return None


def _list_problems(chunk: pa.Array, kind: str, base_dir: str | None, num_negatives: int
                   ) -> Iterator[tuple[int, str]]:
    """Bad cells of a list column chunk: not a list, too short, or an item bad."""
    import pyarrow as pa

    if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
        lengths = chunk.value_lengths().to_pylist()
        offsets = chunk.offsets.to_numpy(zero_copy_only=False)
        items = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        first_bad: dict[int, str] = {}
        for j, problem in _cell_problems(items, kind, base_dir):
            row = int(np.searchsorted(offsets, offsets[0] + j, side="right") - 1)
            first_bad.setdefault(
                row, f"has a bad item {offsets[0] + j - offsets[row]}: it {problem}")
        cells = [(length, first_bad.get(i)) for i, length in enumerate(lengths)]
    else:  # a JSON column: python values
        cells = [(len(v), _item_problem(v, kind, base_dir)) if isinstance(v, list) else
                 (None, "is missing (null)" if v is None else
                  f"is a {type(v).__name__}, not a list") for v, _ in _values(chunk)]
    for i, (length, problem) in enumerate(cells):
        if problem is None and (length or 0) < num_negatives:
            problem = (f"has {length or 0} negatives, fewer than num_negatives="
                       f"{num_negatives} (use fewer negatives or drop the row)")
        if problem is not None:
            yield i, problem


def sample_rows(num_rows: int, exclude: set[int]) -> list[int]:
    """The rows whose images are decoded: the first :data:`SAMPLE_FIRST` rows not in
    ``exclude``, and :data:`SAMPLE_RANDOM` drawn from the rest with :data:`SAMPLE_SEED`."""
    first, rest = [], []
    for i in range(num_rows):
        if i in exclude:
            continue
        if len(first) < SAMPLE_FIRST:
            first.append(i)
        else:
            rest.append(i)
    rng = np.random.default_rng(SAMPLE_SEED)
    drawn = rng.choice(len(rest), min(SAMPLE_RANDOM, len(rest)), replace=False) if rest else []
    return first + sorted(rest[int(k)] for k in drawn)


def row_problems(examples: Any, columns: dict[str, str], kinds: dict[str, str],
                 num_negatives: int, base_dir: str | None,
                 raw_row: Callable[[int], dict[str, Any]]) -> dict[int, str]:
    """``{row index: problem}`` of a dataset part (module docstring). ``columns``: role ->
    column; ``kinds``: role -> 'image' | 'text'; ``raw_row(i)``: row i's role -> raw cell."""
    problems: dict[int, str] = {}
    for role, col in columns.items():
        start = 0
        for chunk in _column(examples, col).chunks:
            found = (_list_problems(chunk, kinds[role], base_dir, num_negatives)
                     if role == "negatives" else _cell_problems(chunk, kinds[role], base_dir))
            what = (f"the negatives column {col!r}" if role == "negatives" else
                    f"the {role} {kinds[role]} in column {col!r}")
            for i, problem in found:
                problems.setdefault(start + i, f"{what} {problem}")
            start += len(chunk)
    images = [role for role in columns if kinds[role] == "image"]
    if images:
        for i in sample_rows(len(examples), set(problems)):
            raw = raw_row(i)
            for role in images:
                cells = raw[role] if role == "negatives" else [raw[role]]
                for k, cell in enumerate(cells):
                    try:
                        decode_image(cell, base_dir=base_dir)
                    except (ValueError, OSError) as e:
                        item = f" (item {k})" if role == "negatives" else ""
                        problems[i] = (f"the {role} image{item} in column {columns[role]!r} "
                                       f"cannot be decoded: {e}")
                        break
                if i in problems:
                    break
    return problems
