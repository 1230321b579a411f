"""Where contrastive pairs come from: the source of ``data.name``, its train and eval parts, and
the column each role (query, positive, negatives) reads.

Sources (``data.name``, read through :mod:`jaxtrain.data.sources`)
-----------------------------------------------------------------
- ``"shapes"``: the built-in generated data (:class:`jaxtrain.data.shapes.ShapesPairs`): image
  + caption for i2t/t2i (exactly the examples of ``ShapesSource``), caption + paraphrase (another
  template) for t2t, two renderings of the same combination for i2i; hard negatives differ from
  the positive's combination in exactly one attribute. ``data.train_examples`` examples from
  ``seed``; the held-out set is one fresh rendering of each of ``data.eval_examples`` distinct
  combinations, from ``seed + 1_000_003`` (as the CLIP task always had).
- a Hugging Face hub dataset name, or a local dataset directory: ``save_to_disk`` output, or any
  folder ``datasets.load_dataset`` understands (e.g. an ``imagefolder`` with ``metadata.jsonl``);
- a local ``.jsonl``/``.json``/``.csv``/``.parquet``/``.arrow`` file (its one split is
  ``"train"``).

Image cells may be ``Image()`` features, bytes, ``{"bytes", "path"}`` dicts or paths; relative
paths resolve against the file's (or the local directory's) folder. Columns: ``image_column`` +
``text_column`` for i2t/t2i; ``query_column`` + ``positive_column`` for t2t/i2i;
``negatives_column`` (a list per row, at least ``num_negatives`` long) when ``num_negatives >
0``.

Splits: training reads ``data.split``; eval reads ``data.eval_split`` if the dataset has it,
else the last ``data.eval_fraction`` of ``data.split`` (then excluded from training).
``max_train_examples`` / ``max_eval_examples`` keep the first rows of each (0 = all). The
built-in data has its own train and held-out sets (those keys are for datasets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.data.pair_config import (
    PAIR_MODES,
    SHAPES,
    SHAPES_EVAL_SEED_OFFSET,
    column_keys,
    role_modalities,
)
from jaxtrain.data.shapes import ShapesPairs
from jaxtrain.data.sources import Builtin, Examples, Source, open_source, select

BUILTIN_SPLITS = ("train", "validation")  # the built-in data's train and held-out sets


def pair_source(d: ml_collections.ConfigDict, *, mode: str, num_negatives: int, image_size: int,
                seed: int) -> Source:
    """The source of ``data.name``: the built-in shapes pairs of ``mode``, or a dataset."""
    def shapes(split: str) -> ShapesPairs:
        train = split == "train"
        return ShapesPairs(
            d.train_examples if train else d.eval_examples, modalities=PAIR_MODES[mode],
            num_negatives=num_negatives, image_size=image_size,
            seed=seed if train else seed + SHAPES_EVAL_SEED_OFFSET, unique_combos=not train,
        )

    return open_source(d.name, builtins={SHAPES: Builtin(SHAPES, shapes, BUILTIN_SPLITS)})


@dataclasses.dataclass(frozen=True)
class Part:
    """The training or eval examples of a source, and where their rows are (for messages)."""

    examples: Examples
    columns: dict[str, str]  # role -> column of the examples
    offset: int  # index in the source's split of the first example (for error messages)
    base_dir: str | None  # relative image paths resolve against it
    where: str  # "'name' (split 'x')", for error messages


def load_part(d: ml_collections.ConfigDict, which: str, *, mode: str, num_negatives: int,
              image_size: int, seed: int) -> Part:
    """The training (``which="train"``) or eval part of ``data.name``, with the hold-out rule
    (module docstring) and its columns checked against ``mode``."""
    source = pair_source(d, mode=mode, num_negatives=num_negatives, image_size=image_size,
                         seed=seed)
    keys = column_keys(mode, num_negatives)
    if isinstance(source, Builtin):
        train = which == "train"
        return Part(source.read(BUILTIN_SPLITS[not train]), {role: role for role in keys}, 0,
                    None, f"{d.name!r} ({'train' if train else 'held-out'})")
    train = source.read(d.split)
    if train is None:
        raise ValueError(
            f"The dataset {d.name!r} has no split {d.split!r}; set data.split to one of its "
            "splits (a local file's only split is 'train')."
        )
    held_out = False
    if d.eval_split:
        evals = train if d.eval_split == d.split else source.read(d.eval_split)
    else:
        evals = None
    if evals is None:
        if d.eval_fraction > 0:
            held_out = True
        elif which == "eval":
            raise ValueError(
                f"The dataset {d.name!r} has no split {d.eval_split!r} and data.eval_fraction "
                "is 0: set data.eval_split to an existing split, or data.eval_fraction > 0 to "
                f"hold out the end of {d.split!r}."
            )
    n = len(train)
    cut = n - max(1, int(round(n * d.eval_fraction))) if held_out else n
    if held_out and cut < 1:
        raise ValueError(
            f"{d.name!r} (split {d.split!r}) has {n} rows: too few to hold out an eval part."
        )
    if which == "train":
        ds, offset, where, cap = train, 0, f"split {d.split!r}", d.max_train_examples
        if held_out:
            ds, where = select(ds, range(cut)), f"split {d.split!r} less its held-out end"
    else:
        cap = d.max_eval_examples
        if held_out:
            ds, offset = select(train, range(cut, n)), cut
            where = f"split {d.split!r}, held-out rows {cut}-{n - 1}"
        else:
            ds, offset, where = evals, 0, f"split {d.eval_split!r}"
    if cap and cap < len(ds):
        ds = select(ds, range(cap))
    if len(ds) == 0:
        raise ValueError(f"{d.name!r} ({where}) has no rows.")
    part = Part(ds, {}, offset, source.base_dir, f"{d.name!r} ({where})")
    columns = check_columns(part, d, mode, keys, num_negatives)
    return dataclasses.replace(part, columns=columns)


def _is_list(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.List | datasets.LargeList | list)


def _list_item(feature: Any) -> Any:
    return feature[0] if isinstance(feature, list) else feature.feature


def check_columns(part: Part, d: ml_collections.ConfigDict, mode: str, keys: dict[str, str],
                  num_negatives: int) -> dict[str, str]:
    """role -> column of a dataset part: the columns exist and hold what the roles need."""
    import datasets

    kinds = role_modalities(mode)
    columns = {role: d[key] for role, key in keys.items()}
    present = part.examples.column_names
    missing = {role: col for role, col in columns.items() if col not in present}
    if missing:
        need = ", ".join(f"{role} (data.{keys[role]} = {col!r})" for role, col in missing.items())
        raise ValueError(
            f"The retrieval mode {mode!r} (with {num_negatives} negatives) needs columns that "
            f"{part.where} lacks: {need}. Its columns are {present}. Set those data.*_column "
            "keys to existing columns, or use a mode the dataset supports."
        )
    features = part.examples.features
    for role, col in columns.items():
        feature = features[col]
        if role == "negatives":
            if not _is_list(feature):
                raise ValueError(
                    f"The negatives column {col!r} of {part.where} holds {feature}, not a list "
                    f"of {kinds[role]}s per row; data.negatives_column must be a list column."
                )
            feature = _list_item(feature)
        is_text = isinstance(feature, datasets.Value) and feature.dtype in (
            "string", "large_string")
        if kinds[role] == "text" and not is_text:
            raise ValueError(
                f"The {role} column {col!r} of {part.where} holds {feature}, not text strings; "
                f"set data.{keys[role]} to a text column."
            )
    if num_negatives:
        _check_negatives_length(part, columns["negatives"], num_negatives)
    return columns


def _check_negatives_length(part: Part, column: str, num_negatives: int) -> None:
    import pyarrow.compute as pc

    ds = part.examples
    if getattr(ds, "_indices", None) is not None:  # a selection: checked row by row
        return
    lengths = pc.list_value_length(ds.data.column(column)).to_numpy(zero_copy_only=False)
    short = np.nonzero(np.nan_to_num(lengths.astype(float), nan=0) < num_negatives)[0]
    if len(short):
        i = int(short[0])
        raise ValueError(
            f"Row {part.offset + i} of {part.where} has {int(np.nan_to_num(lengths[i]))} "
            f"negatives in column {column!r}, fewer than num_negatives={num_negatives} "
            f"({len(short)} rows are short). Use fewer negatives or drop those rows."
        )


class PairRows(Sequence):
    """Raw rows ``{"query", "positive"[, "negatives"], "__row__"}`` of examples (``__row__``:
    the row's index in its split, for messages). A dataset is read as arrow: nothing is decoded,
    images stay bytes/paths until the row is prepared."""

    def __init__(self, examples: Examples, columns: dict[str, str], offset: int = 0) -> None:
        self.columns = dict(columns)
        self.is_dataset = hasattr(examples, "select_columns")
        if self.is_dataset:
            examples = examples.select_columns(sorted(set(columns.values()))).with_format("arrow")
        self.examples, self.offset = examples, offset

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        i = int(index)
        if not 0 <= i < len(self.examples):
            raise IndexError(f"row {index} out of range for {len(self.examples)} rows")
        row = self.examples[i].to_pylist()[0] if self.is_dataset else self.examples[i]
        out = {role: row[col] for role, col in self.columns.items()}
        out["__row__"] = self.offset + i
        return out
