"""Where examples come from: one source interface for every kind of data.

A source is named by one string (``data.name``, ``data.source``, ``zero_shot.name``):

- a built-in generator of the data kind (``"shapes"``, ``"shakespeare"``, ``"builtin"``): each kind
  passes its own as a :class:`Builtin`, with its splits;
- a local file: ``.json``/``.jsonl``/``.csv``/``.parquet``/``.arrow``/``.txt`` (a ``.txt``
  file is one example, in the column ``text``);
- a local directory: ``save_to_disk`` output (a ``Dataset``, or a ``DatasetDict`` and its
  splits), or any folder ``datasets.load_dataset`` reads: data files of one format (each
  ``.txt`` file one example), an ``imagefolder`` (images + ``metadata.jsonl``), split folders
  or split-named files (``train.jsonl``, ``validation.jsonl``);
- any other name: a Hugging Face hub dataset and its splits (the network or a warm cache).

``open_source(name).read(split)`` gives the examples of a split, a ``datasets.Dataset`` or a
sequence of dicts, or None when the source has no such split. A source has splits of its own
(built-ins, hub datasets, a saved ``DatasetDict``, a folder with split names) or is *undivided*
(a file, a folder of plain data files, a saved ``Dataset``): its one split is ``"train"``, and
each kind holds out its eval rows by its own rule: :func:`split_examples` for the language-model
kinds (text, chat, preference: every 50th row), :mod:`jaxtrain.data.pair_sources` for pairs
(an eval split, else the last fraction). Examples then become rows (per kind) and the rows
batches (:mod:`jaxtrain.data.pipeline`).

Relative paths inside examples (image files) resolve against ``source.base_dir``: the file's
folder, or the directory.

Bad data in a local file (:mod:`jaxtrain.data.sanity`, ``data.on_bad_row``): an empty file is
an error ("has no rows"); a line that does not parse (bad JSON, not UTF-8, the wrong number of
CSV fields) is an error naming the file, the line and the problem, or, with
``on_bad_row="skip"``, is dropped (:mod:`jaxtrain.data.file_lines`) and reported in one
warning. ``LocalSource.row_numbers(split)`` then maps the rows kept to their rows in the file,
so later messages still name the file's rows (:func:`split_rows`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np

from jaxtrain.data import file_lines
from jaxtrain.data.sanity import BadRows, check_policy
from jaxtrain.errors import ConfigError
from jaxtrain.tokenizer_files import hub_offline, looks_like_path

if TYPE_CHECKING:
    import datasets

# The examples of a split: a datasets.Dataset, or a random-access sequence of dicts.
Examples = Union["datasets.Dataset", Sequence[Mapping[str, Any]]]

LOCAL_FORMATS: dict[str, str] = {  # file extension -> datasets builder
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
    ".txt": "text",
}
SAVED_FILES = ("state.json", "dataset_dict.json")  # written by Dataset(Dict).save_to_disk
SPLITS: tuple[str, ...] = ("train", "validation", "all")  # of an undivided source (LM kinds)
LOCAL_VALIDATION_EVERY = 50


class Source(Protocol):
    """A named source of examples (see the module docstring)."""

    name: str
    base_dir: str | None  # relative paths in the examples resolve against it

    @property
    def divided(self) -> bool:
        """Whether the source has splits of its own (else its one split is "train")."""
        ...

    def read(self, split: str) -> Examples | None:
        """The examples of ``split``; None when the source has no such split."""
        ...

    def describe_splits(self) -> str:
        """The source's splits, for messages."""
        ...


@dataclasses.dataclass(frozen=True)
class Builtin:
    """A kind's built-in data: ``generate(split)`` for each of ``splits``."""

    name: str
    generate: Callable[[str], Examples]
    splits: tuple[str, ...]
    base_dir: str | None = None
    divided: bool = True

    def read(self, split: str) -> Examples | None:
        return self.generate(split) if split in self.splits else None

    def describe_splits(self) -> str:
        return f"the built-in data {self.name!r} has the splits {list(self.splits)}"


class LocalSource:
    """A local file or directory, read (once, on first use) into its splits; bad lines of a file
    are an error or, with ``on_bad_row="skip"``, dropped (module docstring)."""

    def __init__(self, name: str, path: str, on_bad_row: str = "error") -> None:
        self.name, self.path, self.on_bad_row = name, path, check_policy(on_bad_row)
        self._row_numbers: dict[str, np.ndarray] = {}  # split -> file rows kept, when some dropped
        self.base_dir = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
        if os.path.isfile(path) and os.path.splitext(path)[1].lower() not in LOCAL_FORMATS:
            raise ValueError(
                f"Cannot read the data file {name!r}: a local file must be one of "
                f"{sorted(LOCAL_FORMATS)} (or pass a dataset directory)."
            )

    @functools.cached_property
    def _splits(self) -> dict[str, datasets.Dataset]:
        import datasets

        if os.path.isfile(self.path):
            return {"train": self._read_file()}
        if any(os.path.exists(os.path.join(self.path, f)) for f in SAVED_FILES):
            saved = datasets.load_from_disk(self.path)
            return dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
        builders = _folder_builders(self.path)
        if len(builders) > 1:
            raise ValueError(
                f"The directory {self.name!r} mixes file formats ({sorted(builders)}); use one "
                "format."
            )
        try:
            splits = dict(datasets.load_dataset(self.path, **_builder_kwargs(builders)))
            for ds in splits.values():
                check_utf8(ds)
            return splits
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; re-raised with the fix
            self._locate_in_folder(e)
            raise ValueError(
                f"Could not load the local dataset directory {self.name!r} ({type(e).__name__}: "
                f"{e}). Use a save_to_disk directory, an imagefolder (images + metadata.jsonl), "
                f"or a folder of {'/'.join(sorted(LOCAL_FORMATS))} files."
            ) from e

    def _read_file(self) -> datasets.Dataset:
        """The file's rows; bad lines are located and, with on_bad_row='skip', dropped."""
        builder = LOCAL_FORMATS[os.path.splitext(self.path)[1].lower()]
        try:
            ds = _load_file(builder, self.path)
            check_utf8(ds)
        except Exception as e:  # noqa: BLE001 - datasets/arrow raise many kinds: located below
            ds = self._read_despite(builder, e)
        if len(ds) == 0:
            raise ConfigError(f"The data file {self.name!r} has no rows: add rows to it, or "
                              "point the data source at another file.")
        return ds

    def _read_despite(self, builder: str, error: Exception) -> datasets.Dataset:
        """The rows of a file that ``datasets`` could not read: its bad lines found
        (:func:`jaxtrain.data.file_lines.scan`), then an error or a copy without them."""
        scan = file_lines.scan(self.path)
        where = f"the data file {self.name!r}"
        if not scan.bad:
            if scan.rows == 0:
                raise ConfigError(f"The data file {self.name!r} has no rows: add rows to it, "
                                  "or point the data source at another file.") from error
            raise ValueError(f"Could not read {where} ({type(error).__name__}: {error}). Check "
                             "that it is a valid file of its format.") from error
        if not scan.droppable:
            first = scan.bad[0]
            raise ConfigError(f"{first.label} of {where}: {first.problem}. Fix the file.") \
                from error
        bad = BadRows(self.on_bad_row, where)
        for line in scan.bad:
            bad.add(line.label, line.problem)  # raises at the first with on_bad_row='error'
        dropped = {line.row for line in scan.bad}
        kept = np.asarray([r for r in range(scan.rows) if r not in dropped], np.int64)
        if not len(kept):
            raise ConfigError(f"Every row of {where} is bad ({len(bad)} rows; the first: "
                              f"{scan.bad[0].label}: {scan.bad[0].problem}). Fix the file.")
        with tempfile.TemporaryDirectory(prefix="jaxtrain-good-rows-") as tmp:
            good = file_lines.write_good(self.path, scan.bad, tmp)
            ds = _load_file(builder, good, cache_dir=tmp, keep_in_memory=True)
        if len(ds) != len(kept):
            raise ValueError(f"Reading {where} without its {len(bad)} bad lines gave {len(ds)} "
                             f"rows, not the {len(kept)} expected.")
        self._row_numbers["train"] = kept
        bad.report(len(kept))
        return ds

    def _locate_in_folder(self, error: Exception) -> None:
        """ConfigError naming the first bad line of the folder's data files, if one has one
        (lines inside a folder are not dropped: on_bad_row='skip' reads single files)."""
        for root, _, files in sorted(os.walk(self.path)):
            for f in sorted(files):
                path = os.path.join(root, f)
                if os.path.splitext(f)[1].lower() not in file_lines.FORMATS:
                    continue
                bad = file_lines.scan(path).bad
                if bad:
                    raise ConfigError(
                        f"{bad[0].label} of the file {os.path.relpath(path, self.path)!r} in "
                        f"the dataset directory {self.name!r}: {bad[0].problem}. Fix or drop "
                        "the line (data.on_bad_row='skip' drops the bad lines of a single data "
                        "file, not of files inside a directory)."
                    ) from error

    @property
    def divided(self) -> bool:
        is_dict = os.path.isfile(os.path.join(self.path, "dataset_dict.json"))
        return is_dict or list(self._splits) != ["train"]

    def read(self, split: str) -> Examples | None:
        return self._splits.get(split)

    def row_numbers(self, split: str) -> np.ndarray | None:
        """The file rows of the rows of ``split`` when bad lines were dropped, else None (the
        rows are the file's)."""
        self._splits  # noqa: B018 - reading the file sets them
        return self._row_numbers.get(split)

    def describe_splits(self) -> str:
        return f"{self.name!r} has the splits {list(self._splits)}"


def _folder_builders(path: str) -> set[str]:
    """The datasets builders of the data files in a folder (recursively)."""
    found = set()
    for _, _, files in os.walk(path):
        found.update(LOCAL_FORMATS[ext] for ext in (os.path.splitext(f)[1].lower() for f in files)
                     if ext in LOCAL_FORMATS)
    return found


def _builder_kwargs(builders: set[str]) -> dict[str, Any]:
    return {"sample_by": "document"} if builders == {"text"} else {}  # a .txt file: one example


def _load_file(builder: str, path: str, **kwargs: Any) -> datasets.Dataset:
    import datasets

    return datasets.load_dataset(builder, data_files=path, split="train",
                                 **_builder_kwargs({builder}), **kwargs)


def check_utf8(ds: datasets.Dataset) -> None:
    """Raise (pyarrow.ArrowInvalid) when a string of ``ds`` is not valid UTF-8: the JSON reader
    loads such bytes as they are, and they would fail only when the row is read."""
    for batch in ds.data.table.to_batches():
        batch.validate(full=True)


def _is_unknown_split(e: Exception) -> bool:
    return isinstance(e, ValueError) and "Unknown split" in str(e)


@dataclasses.dataclass
class HubSource:
    """A Hugging Face hub dataset; each split is loaded when read."""

    name: str
    builtins: tuple[str, ...] = ()  # the kind's built-in names, offered in messages
    base_dir: str | None = None
    divided: bool = True
    # datasets' message for the last unknown split (it lists the splits)
    _missing: str = dataclasses.field(default="", init=False, repr=False)

    def read(self, split: str) -> Examples | None:
        import datasets

        try:
            return datasets.load_dataset(self.name, split=split)
        except Exception as e:  # noqa: BLE001 - ConnectionError, DatasetNotFoundError, ...
            if _is_unknown_split(e):
                self._missing = str(e)
                return None
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "it could not be downloaded"
            names = " / ".join(map(repr, self.builtins))
            builtin = f"the built-in {names} data and " if names else ""
            raise ValueError(
                f"The dataset {self.name!r} (split {split!r}) was not found locally and, as a "
                f"Hugging Face hub dataset, {why} ({type(e).__name__}: {e}). Check the name, or "
                f"download it first (run once with network access); {builtin}local "
                f"{'/'.join(sorted(LOCAL_FORMATS))} files or directories always work."
            ) from e

    def describe_splits(self) -> str:
        return f"the hub dataset {self.name!r}: {self._missing or 'see its dataset card'}"


def open_source(name: str, *, builtins: Mapping[str, Source] | None = None,
                on_bad_row: str = "error") -> Source:
    """The source ``name`` names: one of the kind's ``builtins``, a local file or directory, or
    a hub dataset (module docstring). Nothing is read yet. ``on_bad_row``: what a local file's
    unparseable lines do ('error' | 'skip', :mod:`jaxtrain.data.sanity`)."""
    builtins = builtins or {}
    if name in builtins:
        return builtins[name]
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return LocalSource(name, path, on_bad_row)
    if looks_like_path(name) or os.path.splitext(name)[1].lower() in LOCAL_FORMATS:
        raise ValueError(
            f"The data source {name!r} looks like a local path but does not exist: check the "
            "path, or name a hub dataset (owner/name)."
        )
    return HubSource(name, tuple(builtins))


# ----------------------------------------------------------------------------------------------
# The language-model kinds' split rule


def local_split_indices(num_rows: int, split: str) -> np.ndarray:
    """Row indices of ``split`` in an undivided source of ``num_rows`` rows (deterministic).

    Every 50th row (index % 50 == 49) is validation; with fewer than 50 rows (but at least 2),
    the last row is. ``"all"`` is every row.
    """
    index = np.arange(num_rows)
    if split == "all":
        return index
    validation = index % LOCAL_VALIDATION_EVERY == LOCAL_VALIDATION_EVERY - 1
    if not validation.any() and num_rows >= 2:
        validation[-1] = True
    return index[validation if split == "validation" else ~validation]


def source_rows(source: Source, split: str, num_rows: int) -> np.ndarray:
    """The row numbers (for messages) of the ``num_rows`` examples of ``source.read(split)``:
    their rows in the file when a local file's bad lines were dropped, else 0, 1, 2, ..."""
    rows = source.row_numbers(split) if isinstance(source, LocalSource) else None
    return np.arange(num_rows) if rows is None else rows


def split_rows(source: Source, split: str) -> tuple[Examples, np.ndarray]:
    """(the examples of ``split`` by the language-model kinds' rule, each one's row number in
    the source's split, for messages).

    A source with splits of its own gives that split. An undivided one is split by row index
    (:func:`local_split_indices`) into ``"train"`` and ``"validation"``; ``"all"`` is every row,
    e.g. to use a separate validation file.
    """
    if source.divided:
        examples = source.read(split)
        if examples is None:
            raise ValueError(f"Unknown split {split!r}: {source.describe_splits()}. Use one of "
                             "its splits.")
        return examples, source_rows(source, split, len(examples))
    if split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r} for the local source {source.name!r}; expected one of "
            f"{SPLITS} (it has no splits of its own: every 50th row is 'validation')."
        )
    whole = source.read("train")
    index = local_split_indices(len(whole), split)
    return select(whole, index), source_rows(source, "train", len(whole))[index]


def split_examples(source: Source, split: str) -> Examples:
    """The examples of ``split`` by the language-model kinds' rule (:func:`split_rows`)."""
    return split_rows(source, split)[0]


def read_rows(name: str, split: str, *, builtins: Mapping[str, Source] | None = None,
              n: int | None = None, on_bad_row: str = "error"
              ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(at most ``n`` examples (None: all) of ``split`` of the source ``name`` as dicts, split by
    :func:`split_rows`, and their row numbers for messages)."""
    examples, rows = split_rows(open_source(name, builtins=builtins, on_bad_row=on_bad_row),
                                split)
    if n is not None:
        examples, rows = take(examples, n), rows[:n]
    return to_dicts(examples), rows


def read_examples(name: str, split: str, *, builtins: Mapping[str, Source] | None = None,
                  n: int | None = None, on_bad_row: str = "error") -> list[dict[str, Any]]:
    """At most ``n`` examples (None: all) of ``split`` of the source ``name`` as dicts, split by
    :func:`split_rows`."""
    return read_rows(name, split, builtins=builtins, n=n, on_bad_row=on_bad_row)[0]


# ----------------------------------------------------------------------------------------------
# Examples: a datasets.Dataset or a sequence of dicts


def _is_dataset(examples: Examples) -> bool:
    return hasattr(examples, "column_names") and hasattr(examples, "select")


def select(examples: Examples, indices: Sequence[int] | np.ndarray) -> Examples:
    """The examples at ``indices``, in that order."""
    if _is_dataset(examples):
        return examples.select(indices)
    return [examples[int(i)] for i in indices]


def take(examples: Examples, n: int) -> Examples:
    """The first ``n`` examples (all when there are fewer)."""
    return select(examples, range(min(n, len(examples))))


def column_names(examples: Examples) -> list[str]:
    """The columns (a dataset's, or the keys of the first dict)."""
    if _is_dataset(examples):
        return list(examples.column_names)
    return list(examples[0]) if len(examples) else []


def column(examples: Examples, name: str) -> list[Any]:
    """The values of one column, in order."""
    if _is_dataset(examples):
        return list(examples[name])
    return [row[name] for row in examples]


def to_dicts(examples: Examples) -> list[dict[str, Any]]:
    """The examples as a list of dicts."""
    return examples.to_list() if _is_dataset(examples) else [dict(e) for e in examples]


def split_source(data: Any, split: str) -> tuple[str, str]:
    """(source name, split to read) for `split` of a data config with ``source`` and
    ``eval_source`` keys: a separate ``eval_source`` is the eval set, read whole (``"all"``)."""
    if split != "train" and data.eval_source:
        return data.eval_source, "all"
    return data.source, split


def package_dir(package: str) -> str:
    """Directory of an installed package (the files of built-in data), found without importing
    it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"The package {package!r} is not installed; it is a jaxtrain dependency "
            f"(pip install {package.replace('_', '-')})."
        )
    return list(spec.submodule_search_locations)[0]
