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

Checks, when a part is loaded (before the train step compiles): it has rows (none is an
error); its columns exist and hold what the roles need (:func:`check_columns`); every row's
cells and a decoded sample of its images (:mod:`jaxtrain.data.pair_checks`), bad rows being an
error or dropped by ``data.on_bad_row`` (:mod:`jaxtrain.data.sanity`); an eval part of fewer
than :data:`~jaxtrain.data.sanity.MIN_EVAL_PAIRS` pairs draws a warning (recall@1 over one
pair is always 1.0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.data.images import ImagePreprocess
from jaxtrain.data.pair_checks import row_problems
from jaxtrain.data.pair_config import (
    PAIR_MODES,
    SHAPES,
    SHAPES_EVAL_SEED_OFFSET,
    column_keys,
    role_modalities,
)
from jaxtrain.data.sanity import MIN_EVAL_PAIRS, BadRows, check_eval_rows
from jaxtrain.data.shapes import NUM_COMBOS, ShapesPairs
from jaxtrain.data.sources import (
    Builtin,
    Examples,
    Source,
    open_source,
    read_spec,
    select,
    source_rows,
)
from jaxtrain.errors import ConfigError

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

    return open_source(d.name, builtins={SHAPES: Builtin(SHAPES, shapes, BUILTIN_SPLITS)},
                       on_bad_row=on_bad_row(d), subset=d.get("subset", ""))


def on_bad_row(d: ml_collections.ConfigDict) -> str:
    """``data.on_bad_row`` ('error' in configs written before it existed)."""
    return d.get("on_bad_row", "error")


@dataclasses.dataclass(frozen=True)
class Part:
    """The training or eval examples of a source, and where their rows are (for messages)."""

    examples: Examples
    columns: dict[str, str]  # role -> column of the examples
    rows: np.ndarray  # each example's row in the source's split (for messages)
    base_dir: str | None  # relative image paths resolve against it
    where: str  # "'name' (split 'x')", for messages
    # the run's image preprocessing -> the one for these examples (prepared shards hold
    # images already resized and cropped: jaxtrain.data.prepared_pairs); None = the run's
    adapt_image: Callable[[ImagePreprocess], ImagePreprocess] | None = None


def load_part(d: ml_collections.ConfigDict, which: str, *, mode: str, num_negatives: int,
              image_size: int, seed: int) -> Part:
    """The training (``which="train"``) or eval part of ``data.name``, with the hold-out rule
    (module docstring) and its columns checked against ``mode``. (Prepared shards and
    webdataset tars have their own readers: :mod:`jaxtrain.data.pair_parts` picks.)"""
    source = pair_source(d, mode=mode, num_negatives=num_negatives, image_size=image_size,
                         seed=seed)
    keys = column_keys(mode, num_negatives)
    if isinstance(source, Builtin):
        train = which == "train"
        examples = source.read(BUILTIN_SPLITS[not train])
        where = f"{d.name!r} ({'train' if train else 'held-out'})"
        if not train:
            check_eval_rows(where, len(examples), MIN_EVAL_PAIRS, "pair",
                            f"Raise data.eval_examples (up to {NUM_COMBOS})")
        return Part(examples, {role: role for role in keys}, np.arange(len(examples)), None,
                    where)
    train = read_spec(source, d.split)  # a split spec: 'train', 'train[:10%]', 'a+b'
    if train is None:
        raise ValueError(
            f"The dataset {d.name!r} has no split {d.split!r}; set data.split to one of its "
            "splits (a local file's only split is 'train')."
        )
    held_out = False
    if d.eval_split:
        evals = train if d.eval_split == d.split else read_spec(source, d.eval_split)
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
        raise ConfigError(
            f"{d.name!r} (split {d.split!r}) has {n} rows: too few to hold out an eval part. "
            "Use more data, or a separate eval set (data.eval_split, evals.<name>.source)."
        )
    if which == "train":
        ds, where, cap = train, f"split {d.split!r}", d.max_train_examples
        rows = source_rows(source, d.split, n)
        if held_out:
            ds, rows = select(ds, range(cut)), rows[:cut]
            where = f"split {d.split!r} less its held-out end"
    else:
        cap = d.max_eval_examples
        if held_out:
            ds, rows = select(train, range(cut, n)), source_rows(source, d.split, n)[cut:]
            where = f"split {d.split!r}, held-out rows {rows[0]}-{rows[-1]}"
        else:
            ds, where = evals, f"split {d.eval_split!r}"
            rows = source_rows(source, d.eval_split, len(ds))
    if cap and cap < len(ds):
        ds, rows = select(ds, range(cap)), rows[:cap]
    part = Part(ds, {}, rows, source.base_dir, f"{d.name!r} ({where})")
    if len(ds) == 0:
        raise ConfigError(f"{part.where} has no rows: there is nothing to "
                          f"{'train' if which == 'train' else 'evaluate'} on.")
    part = dataclasses.replace(part, columns=check_columns(part, d, mode, keys, num_negatives))
    part = check_rows(part, role_modalities(mode), num_negatives, on_bad_row(d))
    if which == "eval":
        check_eval_rows(part.where, len(part.examples), MIN_EVAL_PAIRS, "pair",
                        _more_eval_rows(d, held_out, n))
    return part


def _more_eval_rows(d: ml_collections.ConfigDict, held_out: bool, n: int) -> str:
    """How to get a bigger eval set, for messages."""
    ways = ["point evals.<name>.source at a larger set (read whole)"]
    if held_out:
        ways.insert(0, f"raise data.eval_fraction ({d.eval_fraction} of the {n} rows of split "
                       f"{d.split!r} are held out)")
    ways.insert(0, "set data.eval_split to a split with more rows")
    if d.max_eval_examples:
        ways.insert(0, f"raise data.max_eval_examples ({d.max_eval_examples})")
    return "For a meaningful eval: " + ", or ".join(ways)


def check_rows(part: Part, kinds: dict[str, str], num_negatives: int, policy: str) -> Part:
    """The part without its bad rows (:func:`jaxtrain.data.pair_checks.row_problems`), by
    ``data.on_bad_row``: the first is an error, or they are dropped with a warning."""
    raw = PairRows(part.examples, part.columns, rows=part.rows)
    problems = row_problems(part.examples, part.columns, kinds, num_negatives, part.base_dir,
                            raw.__getitem__)
    if not problems:
        return part
    bad = BadRows(policy, part.where)
    for i in sorted(problems):
        bad.add(f"Row {part.rows[i]}", problems[i])  # raises at the first with 'error'
    keep = np.asarray([i for i in range(len(part.examples)) if i not in problems], np.int64)
    if not len(keep):
        first = min(problems)
        raise ConfigError(f"Every row of {part.where} is bad ({len(problems)} rows; row "
                          f"{part.rows[first]}: {problems[first]}). Fix the data or the "
                          "data.*_column keys.")
    bad.report(len(keep))
    return dataclasses.replace(part, examples=select(part.examples, keep), rows=part.rows[keep])


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
        is_text = isinstance(feature, datasets.Json) or (  # Json: mixed, checked per row
            isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"))
        if kinds[role] == "text" and not is_text:
            raise ValueError(
                f"The {role} column {col!r} of {part.where} holds {feature}, not text strings; "
                f"set data.{keys[role]} to a text column."
            )
    return columns


class PairRows(Sequence):
    """Raw rows ``{"query", "positive"[, "negatives"], "__row__", "__index__"}`` of examples
    (``__row__``: the row's number in its split, for messages: ``rows[i]``, else ``offset +
    i``; ``__index__``: its index here). A dataset is read as arrow: nothing is decoded,
    images stay bytes/paths until the row is prepared."""

    def __init__(self, examples: Examples, columns: dict[str, str], offset: int = 0,
                 rows: np.ndarray | None = None) -> None:
        self.columns = dict(columns)
        self.is_dataset = hasattr(examples, "select_columns")
        if self.is_dataset:
            examples = examples.select_columns(sorted(set(columns.values()))).with_format("arrow")
        self.examples, self.offset = examples, offset
        self.rows = None if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        i = int(index)
        if not 0 <= i < len(self.examples):
            raise IndexError(f"row {index} out of range for {len(self.examples)} rows")
        row = self.examples[i].to_pylist()[0] if self.is_dataset else self.examples[i]
        out = {role: row[col] for role, col in self.columns.items()}
        out["__row__"] = self.offset + i if self.rows is None else int(self.rows[i])
        out["__index__"] = i
        return out
