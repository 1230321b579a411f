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
- any other name: a Hugging Face hub dataset and its splits (the network or a warm cache);
- ``'<in-memory>'``: rows passed in code, ``jaxtrain.train(..., train_data=...)``
  (:mod:`jaxtrain.data.in_memory`, :mod:`jaxtrain.data.memory_source`).

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

Split specs (``data.split``, ``data.eval_split``) use the ``datasets`` split syntax: a split name
(``train_sft``), sliced by rows or percent (``train[10:200]``, ``train[:1%]``,
``train[-5%:]``), and ``+`` to join (``train+validation``). A slice of ``n`` rows selects rows
``[round(a), round(b))`` with percent bounds ``a = p / 100 * n`` (datasets' "closest"
rounding, via ``datasets.ReadInstruction``); an undivided source's ``"train"`` is first cut by the
held-out rule, then sliced.

Subsets (``data.subset``): the dataset config name (C4's ``"en"``): of a hub dataset, of a local
folder whose ``README.md`` lists ``configs:`` (datasets' metadata), or, in a local folder, the
sub-folder of that name (``corpus/en/train.jsonl``). A source of several subsets read without
one is an error listing them.

Streaming (``data.streaming``): :meth:`stream` gives a split as a ``datasets.IterableDataset``,
read as it is consumed, for corpora too large to download first (:mod:`jaxtrain.data.streaming`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np

from jaxtrain.data import file_lines
from jaxtrain.data.memory_source import lookup
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

    def __init__(self, name: str, path: str, on_bad_row: str = "error", subset: str = "") -> None:
        self.name, self.path, self.on_bad_row = name, path, check_policy(on_bad_row)
        self.config_name: str | None = None  # the datasets config (README.md configs) to load
        if subset:
            path = self.path = self._subset_path(subset)
        self._row_numbers: dict[str, np.ndarray] = {}  # split -> file rows kept, when some dropped
        self.base_dir = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
        if os.path.isfile(path) and os.path.splitext(path)[1].lower() not in LOCAL_FORMATS:
            raise ValueError(
                f"Cannot read the data file {name!r}: a local file must be one of "
                f"{sorted(LOCAL_FORMATS)} (or pass a dataset directory)."
            )

    def _subset_path(self, subset: str) -> str:
        """The folder of ``subset``: this folder (its README.md lists the config), or the
        sub-folder of that name; else a ConfigError listing the subsets."""
        configs = readme_configs(self.path)
        if subset in configs:
            self.config_name = subset
            return self.path
        folder = os.path.join(self.path, subset)
        if os.path.isdir(folder):
            return folder
        found = local_subsets(self.path)
        have = (f"its subsets are {found}" if found else "it has none (no README.md configs, no "
                "sub-folders of data): leave data.subset empty")
        raise ConfigError(f"data.subset {subset!r} is not a subset of the local dataset "
                          f"{self.name!r}; {have}.")

    def stream(self, split: str) -> datasets.IterableDataset | None:
        """The split ``split`` as a ``datasets.IterableDataset`` (read as it is consumed); None
        when the source has no such split. An undivided source's one split is ``"train"``."""
        import datasets

        if os.path.isfile(self.path):
            if split != "train":
                return None
            builder = LOCAL_FORMATS[os.path.splitext(self.path)[1].lower()]
            return datasets.load_dataset(builder, data_files=self.path, split="train",
                                         streaming=True, **_builder_kwargs({builder}))
        if any(os.path.exists(os.path.join(self.path, f)) for f in SAVED_FILES):
            ds = self._splits.get(split)  # memory-mapped arrow files: nothing is read yet
            return None if ds is None else ds.to_iterable_dataset()
        builders = _folder_builders(self.path)
        files = self.split_files(split)  # <split>.jsonl, <split>/*: read without the others
        if files:
            (builder,) = builders
            return datasets.load_dataset(builder, data_files=files, split="train",
                                         streaming=True, **_builder_kwargs(builders))
        try:
            return datasets.load_dataset(self.path, self.config_name, split=split, streaming=True,
                                         **_builder_kwargs(builders))
        except ValueError as e:
            if _is_unknown_split(e):
                return None
            raise

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
            splits = dict(datasets.load_dataset(self.path, self.config_name,
                                                **_builder_kwargs(builders)))
            for ds in splits.values():
                check_utf8(ds)
            return splits
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; re-raised with the fix
            if "Config name is missing" in str(e):
                raise ConfigError(
                    f"The local dataset {self.name!r} has several subsets: set data.subset to one "
                    f"of {local_subsets(self.path)}."
                ) from e
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
        if os.path.isfile(os.path.join(self.path, "dataset_dict.json")) or self.config_name:
            return True
        if "_splits" in self.__dict__ or not os.path.isdir(self.path) or readme_configs(
                self.path) or os.path.isfile(os.path.join(self.path, "state.json")):
            return list(self._splits) != ["train"]
        # A folder of data files: its split names from the file names, nothing read (streaming)
        from datasets.data_files import get_data_patterns

        try:
            return [str(k) for k in get_data_patterns(self.path)] != ["train"]
        except Exception:  # noqa: BLE001 - no data files, ...: read it to say what is wrong
            return list(self._splits) != ["train"]

    def read(self, split: str) -> Examples | None:
        found = self._splits.get(split)
        if found is None and self.split_files(split):
            import datasets

            (builder,) = _folder_builders(self.path) or {"json"}
            found = datasets.load_dataset(builder, data_files=self.split_files(split),
                                          split="train", **_builder_kwargs({builder}))
        return found

    def split_files(self, split: str) -> list[str]:
        """The data files named for ``split`` (``<split>.jsonl``, ``<split>/*``) in a folder of
        data files, for split names datasets does not infer (``train_sft``)."""
        if not os.path.isdir(self.path) or self.config_name or any(
                os.path.exists(os.path.join(self.path, f)) for f in SAVED_FILES):
            return []
        folder = os.path.join(self.path, split)
        named = [os.path.join(self.path, f) for f in sorted(os.listdir(self.path))
                 if os.path.splitext(f)[0] == split and os.path.splitext(f)[1].lower()
                 in LOCAL_FORMATS]
        if os.path.isdir(folder):
            named += [os.path.join(root, f) for root, _, files in sorted(os.walk(folder))
                      for f in sorted(files) if os.path.splitext(f)[1].lower() in LOCAL_FORMATS]
        return named

    def _file_splits(self) -> list[str]:
        """Split names given by file or folder names that datasets did not infer."""
        if not os.path.isdir(self.path):
            return []
        stems = {os.path.splitext(f)[0] if os.path.isfile(os.path.join(self.path, f)) else f
                 for f in os.listdir(self.path) if not f.startswith((".", "README"))}
        return sorted(s for s in stems if s not in self._splits and self.split_files(s))

    def row_numbers(self, split: str) -> np.ndarray | None:
        """The file rows of the rows of ``split`` when bad lines were dropped, else None (the
        rows are the file's)."""
        self._splits  # noqa: B018 - reading the file sets them
        return self._row_numbers.get(split)

    def describe_splits(self) -> str:
        return f"{self.name!r} has the splits {list(self._splits) + self._file_splits()}"


def readme_configs(path: str) -> list[str]:
    """The config names a local dataset folder's ``README.md`` lists (datasets' metadata
    ``configs:``), in order; [] without one."""
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return []
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return []
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    return re.findall(r"^\s*-\s*config_name:\s*['\"]?([^'\"\s]+)", header, flags=re.M)


def local_subsets(path: str) -> list[str]:
    """The subsets of a local dataset folder: its README.md configs, else its sub-folders that
    hold data files or a saved dataset."""
    configs = readme_configs(path)
    if configs or not os.path.isdir(path):
        return configs
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and (
        _folder_builders(os.path.join(path, d))
        or any(os.path.exists(os.path.join(path, d, f)) for f in SAVED_FILES)))


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
    subset: str = ""  # the dataset config name (data.subset); "" = its default
    # datasets' message for the last unknown split (it lists the splits)
    _missing: str = dataclasses.field(default="", init=False, repr=False)

    def read(self, split: str) -> Examples | None:
        return self._load(split, streaming=False)

    def stream(self, split: str) -> datasets.IterableDataset | None:
        """The split as a ``datasets.IterableDataset``, downloaded as it is consumed."""
        return self._load(split, streaming=True)

    def _load(self, split: str, streaming: bool) -> Any:
        import datasets

        try:
            return datasets.load_dataset(self.name, self.subset or None, split=split,
                                         streaming=streaming)
        except Exception as e:  # noqa: BLE001 - ConnectionError, DatasetNotFoundError, ...
            if _is_unknown_split(e):
                self._missing = str(e)
                return None
            if "Config name is missing" in str(e) or "BuilderConfig" in str(e):
                raise ConfigError(
                    f"The dataset {self.name!r} needs a valid data.subset (now "
                    f"{self.subset!r}): {e}"
                ) from e
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
                on_bad_row: str = "error", subset: str = "") -> Source:
    """The source ``name`` names: one of the kind's ``builtins``, a local file or directory, or
    a hub dataset (module docstring). Nothing is read yet. ``on_bad_row``: what a local file's
    unparseable lines do ('error' | 'skip', :mod:`jaxtrain.data.sanity`); ``subset``: the
    dataset config (module docstring)."""
    in_memory = lookup(name)  # rows passed in code (train_data=, eval_data=)
    if in_memory is not None:
        return in_memory
    builtins = builtins or {}
    if name in builtins:
        if subset:
            raise ConfigError(f"data.subset {subset!r}: the built-in data {name!r} has no "
                              "subsets; leave data.subset empty.")
        return builtins[name]
    path = os.path.expanduser(name)
    if os.path.exists(path):
        if subset and os.path.isfile(path):
            raise ConfigError(f"data.subset {subset!r}: the data file {name!r} has no subsets; "
                              "leave data.subset empty, or name a dataset folder.")
        return LocalSource(name, path, on_bad_row, subset)
    if looks_like_path(name) or os.path.splitext(name)[1].lower() in LOCAL_FORMATS:
        raise ValueError(
            f"The data source {name!r} looks like a local path but does not exist: check the "
            "path, or name a hub dataset (owner/name)."
        )
    return HubSource(name, tuple(builtins), subset=subset)


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


SPLIT_PART = re.compile(r"^\s*([\w.-]+)\s*(\[[^\]]*\])?\s*$")


def parse_split(spec: str) -> list[tuple[str, str]]:
    """``"train[:10%]+validation"`` -> ``[("train", "[:10%]"), ("validation", "")]``; a
    ConfigError for a malformed spec (module docstring)."""
    parts = [SPLIT_PART.match(p) for p in spec.split("+")] if spec else [None]
    if not all(parts):
        raise ConfigError(
            f"The split {spec!r} is not a split spec: use a split name, optionally sliced, and "
            "'+' to join, e.g. 'train', 'train_sft', 'train[:1%]', 'train[10:200]', "
            "'train+validation'."
        )
    return [(m.group(1), m.group(2) or "") for m in parts]


def slice_indices(spec: str, name: str, bounds: str, num_rows: int) -> np.ndarray:
    """Row indices of ``name + bounds`` (e.g. ``"[:10%]"``) in a split of ``num_rows`` rows, as
    datasets' split syntax selects them (``datasets.ReadInstruction``)."""
    if not bounds:
        return np.arange(num_rows)
    from datasets import ReadInstruction

    try:
        (absolute,) = ReadInstruction.from_spec(f"x{bounds}").to_absolute({"x": num_rows})
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"The split {spec!r}: bad slice {name + bounds!r} of {num_rows} rows "
                          f"({e}). Use e.g. {name}[:10%] or {name}[10:200].") from e
    return np.arange(absolute.from_, absolute.to)


def split_rows(source: Source, split: str) -> tuple[Examples, np.ndarray]:
    """(the examples of the split spec ``split`` by the language-model kinds' rule, each one's
    row number in the source's split, for messages).

    A source with splits of its own gives that split. An undivided one is split by row index
    (:func:`local_split_indices`) into ``"train"`` and ``"validation"``; ``"all"`` is every row,
    e.g. to use a separate validation file. Slices (``train[:1%]``) and joins (``a+b``) apply
    to those (:func:`parse_split`).
    """
    parts = parse_split(split)
    if len(parts) == 1 and not parts[0][1]:
        return _named_split_rows(source, split.strip())
    pieces = []
    for name, bounds in parts:
        examples, rows = _named_split_rows(source, name)
        index = slice_indices(split, name, bounds, len(examples))
        pieces.append((select(examples, index), rows[index]))
    return concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


def read_spec(source: Source, spec: str) -> Examples | None:
    """``source.read`` of a split spec (``train[:10%]``, ``a+b``; :func:`parse_split`) of the
    source's own splits; None when a named split is missing."""
    parts = []
    for name, bounds in parse_split(spec):
        examples = source.read(name)
        if examples is None:
            return None
        parts.append(select(examples, slice_indices(spec, name, bounds, len(examples)))
                     if bounds else examples)
    return concatenate(parts)


def concatenate(parts: Sequence[Examples]) -> Examples:
    """The examples of ``parts`` one after another."""
    if len(parts) == 1:
        return parts[0]
    if all(_is_dataset(p) for p in parts):
        import datasets

        return datasets.concatenate_datasets(list(parts))
    return [e for p in parts for e in (to_dicts(p) if _is_dataset(p) else p)]


def _named_split_rows(source: Source, split: str) -> tuple[Examples, np.ndarray]:
    """:func:`split_rows` of one split name (no slice)."""
    if source.divided:
        examples = source.read(split)
        if examples is None:
            raise ValueError(f"Unknown split {split!r}: {source.describe_splits()}. Use one of "
                             "its splits (data.split, data.eval_split).")
        return examples, source_rows(source, split, len(examples))
    if split not in SPLITS and isinstance(source, LocalSource) and source.split_files(split):
        examples = source.read(split)  # a file named for the split: <split>.jsonl
        return examples, np.arange(len(examples))
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
              n: int | None = None, on_bad_row: str = "error", subset: str = ""
              ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(at most ``n`` examples (None: all) of ``split`` of the source ``name`` (its ``subset``)
    as dicts, split by :func:`split_rows`, and their row numbers for messages)."""
    examples, rows = split_rows(open_source(name, builtins=builtins, on_bad_row=on_bad_row,
                                            subset=subset), split)
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
    """(source name, split spec to read) for ``split`` ("train" or the held-out "validation")
    of a data config with ``source``, ``eval_source`` and optionally ``split``/``eval_split``
    keys: training reads ``data.split`` (default "train"); the held-out set is a separate
    ``eval_source`` read whole (``"all"``), else ``data.eval_split``, else "validation" (an
    undivided source's every 50th row)."""
    if split == "train":
        return data.source, data.get("split", "") or "train"
    if data.eval_source:
        return data.eval_source, "all"
    return data.source, data.get("eval_split", "") or split


def subset_of(data: Any, name: str) -> str:
    """``data.subset`` when ``name`` is ``data.source`` (a separate eval source has none)."""
    return data.get("subset", "") if name == data.source else ""


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
