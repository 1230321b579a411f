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
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np

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
    """A local file or directory, read (once, on first use) into its splits."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path
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
            builder = LOCAL_FORMATS[os.path.splitext(self.path)[1].lower()]
            return {"train": datasets.load_dataset(builder, data_files=self.path, split="train",
                                                   **_builder_kwargs({builder}))}
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
            return dict(datasets.load_dataset(self.path, **_builder_kwargs(builders)))
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; re-raised with the fix
            raise ValueError(
                f"Could not load the local dataset directory {self.name!r} ({type(e).__name__}: "
                f"{e}). Use a save_to_disk directory, an imagefolder (images + metadata.jsonl), "
                f"or a folder of {'/'.join(sorted(LOCAL_FORMATS))} files."
            ) from e

    @property
    def divided(self) -> bool:
        is_dict = os.path.isfile(os.path.join(self.path, "dataset_dict.json"))
        return is_dict or list(self._splits) != ["train"]

    def read(self, split: str) -> Examples | None:
        return self._splits.get(split)

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


def open_source(name: str, *, builtins: Mapping[str, Source] | None = None) -> Source:
    """The source ``name`` names: one of the kind's ``builtins``, a local file or directory, or
    a hub dataset (module docstring). Nothing is read yet."""
    builtins = builtins or {}
    if name in builtins:
        return builtins[name]
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return LocalSource(name, path)
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


def split_examples(source: Source, split: str) -> Examples:
    """The examples of ``split`` by the language-model kinds' rule.

    A source with splits of its own gives that split. An undivided one is split by row index
    (:func:`local_split_indices`) into ``"train"`` and ``"validation"``; ``"all"`` is every row,
    e.g. to use a separate validation file.
    """
    if source.divided:
        examples = source.read(split)
        if examples is None:
            raise ValueError(f"Unknown split {split!r}: {source.describe_splits()}. Use one of "
                             "its splits.")
        return examples
    if split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r} for the local source {source.name!r}; expected one of "
            f"{SPLITS} (it has no splits of its own: every 50th row is 'validation')."
        )
    whole = source.read("train")
    return select(whole, local_split_indices(len(whole), split))


def read_examples(name: str, split: str, *, builtins: Mapping[str, Source] | None = None,
                  n: int | None = None) -> list[dict[str, Any]]:
    """At most ``n`` examples (None: all) of ``split`` of the source ``name`` as dicts, split by
    :func:`split_examples`."""
    examples = split_examples(open_source(name, builtins=builtins), split)
    return to_dicts(examples if n is None else take(examples, n))


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
