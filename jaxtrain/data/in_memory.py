"""Data passed in code: ``jaxtrain.train(config, workdir, train_data=..., eval_data=...)``.

A container of rows, in the columns the task's files have, becomes a data source of the run
(:mod:`jaxtrain.data.sources`), so it is read, validated and split exactly like a file of the
same rows: the same checks and the same errors, which name the row's index instead of a file
line. Containers: a Hugging Face ``datasets.Dataset``, a list (or tuple) of dicts, or a pandas
``DataFrame``; anything else, or rows without the task's columns, is an error naming the
container's type, the columns the task expects and the columns found.

What the task reads (:func:`bind` rewrites the config's data keys to the in-memory source):

* ``clip`` (CLIP / SigLIP / embedder, contrastive pairs): ``data.name`` is the source, its split
  ``train_data`` trains and ``eval_data`` (when given) is the held-out split of the retrieval
  evaluators; without ``eval_data`` the last ``data.eval_fraction`` of ``train_data`` is held
  out, as for a file. Columns: ``data.image_column`` + ``data.text_column`` (i2t / t2i),
  ``data.query_column`` + ``data.positive_column`` (t2t / i2i), ``data.negatives_column`` (a
  list per row) with ``contrastive.num_negatives > 0``. Images: PIL images, numpy arrays
  (``[H, W, 3]`` uint8, or float in [0, 1]; encoded losslessly as PNG), encoded bytes,
  ``{"bytes", "path"}`` dicts, or paths (relative ones resolve against the working directory).
  Zero-shot evaluation reads its own labelled set, as configured.
* ``lm`` and ``dpo``: ``data.source`` names the in-memory source. With ``eval_data``, every
  row of ``train_data`` trains (its split ``train_data``) and ``eval_data`` is the held-out set
  (its split ``eval_data``); without it, every 50th row of ``train_data`` is held out, as for a
  file (or ``data.eval_source``, if the config sets one, is read whole); ``eval_data`` alone
  is ``data.eval_source`` beside the configured ``data.source``. Columns: ``data.text_field``
  (text), a chat format (``messages``, ...: :mod:`jaxtrain.data.chat`) for
  ``data.kind='chat'``, preference pairs (``prompt`` / ``chosen`` / ``rejected``, or the chat
  form: :mod:`jaxtrain.data.preference`) for ``dpo``. Packing, truncation and caps
  (``data.max_documents``) apply as for files; text rows are built in memory
  (``data.token_store = 'memory'``: a token store on disk is keyed by the source's name, which
  in-memory data does not own).

The source (:mod:`jaxtrain.data.memory_source`) lives in this process only, registered under a
name like ``'<in-memory>'`` while the trainer or its tasks reference it. A config that names one
after that (a workdir's config read by another process) is an error saying to pass the data
again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.data.memory_source import InMemorySource, register
from jaxtrain.errors import ConfigError

TRAIN, EVAL = "train_data", "eval_data"  # the split names of a pair source (and the kwargs)
CONTAINERS = "a datasets.Dataset, a list of dicts or a pandas DataFrame"


# ----------------------------------------------------------------------------------------------
# What a task expects


def task_kind(config: ml_collections.ConfigDict) -> str:
    """'pairs' (contrastive: ``data.name``) or 'lm' (lm, dpo: ``data.source``), by the data
    keys; a ConfigError for a task that reads neither."""
    data = config.get("data")
    if data is not None and "name" in data and "image_column" in data:
        return "pairs"
    if data is not None and "source" in data and "eval_source" in data:
        return "lm"
    raise ConfigError(
        f"train_data / eval_data: the task {config.get('task')!r} reads neither data.name "
        "(contrastive pairs) nor data.source + data.eval_source (language-model kinds), so "
        "in-memory data has nowhere to go. Pass it to a built-in task (clip, lm, dpo), or "
        "give your task a data.source key read through jaxtrain.data.sources.")


def expected_columns(config: ml_collections.ConfigDict) -> tuple[list[str] | None, str]:
    """(the columns every row must have, or None when the task takes several formats; a
    description of the columns, for messages)."""
    d = config.data
    if task_kind(config) == "pairs":
        from jaxtrain.data.pair_config import column_keys

        mode, negatives = config.contrastive.mode, config.contrastive.num_negatives
        cols = [d[key] for key in column_keys(mode, negatives).values()]
        return cols, (f"{cols} (contrastive.mode {mode!r}, {negatives} negatives: the "
                      "data.*_column keys)")
    if config.task == "dpo":
        from jaxtrain.data.preference import PREFERENCE_FORMATS_HELP

        return None, f"preference pairs: {PREFERENCE_FORMATS_HELP}"
    if d.kind == "chat":
        from jaxtrain.data.chat import FORMATS_HELP

        return None, f"conversations (data.kind='chat'): {FORMATS_HELP}"
    return [d.text_field], f"[{d.text_field!r}] (data.text_field: one document per row)"


# ----------------------------------------------------------------------------------------------
# Containers -> examples


def _is_dataframe(data: Any) -> bool:
    return type(data).__module__.startswith("pandas") and hasattr(data, "to_dict") and \
        hasattr(data, "columns")


def _plain(value: Any) -> Any:
    """A DataFrame cell as a file's row would hold it: object arrays (lists read from parquet)
    as lists, missing values (NaN, NA, NaT) as None; numeric arrays (images) kept."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


def to_examples(data: Any, what: str, config: ml_collections.ConfigDict) -> Any:
    """``data`` (``what``: 'train_data' | 'eval_data') as the examples of a source: a
    ``datasets.Dataset`` as it is, a list of dicts (a DataFrame's records, missing cells None).
    TypeError for another container, ValueError for no rows or a row without the columns."""
    expected, description = expected_columns(config)
    columns: list[str]
    if type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise TypeError(
            f"{what} is a {type(data).__name__} (splits {list(data)}): pass one split, e.g. "
            f"{what}=ds['train'] (and eval_data=ds['test']). The task reads {description}.")
    if type(data).__name__ == "IterableDataset":
        raise TypeError(
            f"{what} is a datasets.IterableDataset: in-memory data must have a length (epochs, "
            "shuffling, exact resume); pass a datasets.Dataset (e.g. Dataset.from_generator), "
            f"or stream a file or hub dataset with data.streaming=True. The task reads "
            f"{description}.")
    if hasattr(data, "column_names") and hasattr(data, "select"):  # a datasets.Dataset
        examples, columns = data, list(data.column_names)
    elif _is_dataframe(data):
        columns = [str(c) for c in data.columns]
        examples = [{str(k): _plain(v) for k, v in row.items()}
                    for row in data.to_dict("records")]
    elif isinstance(data, list | tuple):
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise TypeError(
                    f"{what}[{i}] is a {type(row).__name__}, not a dict: {what} as a list must "
                    f"hold one dict per row, with the columns {description}.")
        examples = [dict(row) for row in data]
        columns = sorted({k for row in examples for k in row})
    else:
        raise TypeError(
            f"{what} is a {type(data).__module__}.{type(data).__name__}; expected {CONTAINERS} "
            f"with the columns the {config.task!r} task reads: {description}.")
    if len(examples) == 0:
        raise ValueError(f"{what} has no rows: there is nothing to "
                         f"{'train' if what == TRAIN else 'evaluate'} on.")
    if expected is not None:
        _check_columns(examples, columns, expected, what, description)
    return examples


def _check_columns(examples: Any, columns: list[str], expected: list[str], what: str,
                   description: str) -> None:
    """Every row has the expected columns (a Dataset's columns; each dict's keys)."""
    missing = [c for c in expected if c not in columns]
    if missing:
        raise ValueError(
            f"{what} lacks the column(s) {missing}: the task reads {description}. Its columns "
            f"are {columns}. Rename them, or set the data.*_column / data.text_field keys.")
    if isinstance(examples, list):
        for i, row in enumerate(examples):
            lacks = [c for c in expected if c not in row]
            if lacks:
                raise ValueError(
                    f"Row {i} of {what} lacks the column(s) {lacks} (its keys: {sorted(row)}); "
                    f"the task reads {description}. Give every row those keys.")


def _image_roles(config: ml_collections.ConfigDict) -> list[str]:
    """The columns of a pair config that hold images."""
    from jaxtrain.data.pair_config import column_keys, role_modalities

    c = config.contrastive
    kinds = role_modalities(c.mode)
    return [config.data[key] for role, key in column_keys(c.mode, c.num_negatives).items()
            if kinds[role] == "image"]


def _pil(value: Any, what: str, row: int, col: str) -> Any:
    from jaxtrain.data.images import open_image

    if isinstance(value, np.ndarray):
        try:
            return open_image(value)  # an array opens as a PIL image
        except ValueError as e:
            raise ValueError(f"Row {row} of {what}: the image in column {col!r}: {e}.") from e
    if isinstance(value, list):
        return [_pil(v, what, row, col) for v in value]
    return value


def _as_dataset(examples: Any, what: str, image_columns: Sequence[str] = ()) -> Any:
    """A list of dicts as a ``datasets.Dataset`` (numpy image arrays in ``image_columns`` as PIL
    images: an ``Image()`` feature, PNG-encoded); a Dataset as it is. A column of mixed types is
    an error naming the first row that differs."""
    import datasets

    if not isinstance(examples, list):
        return examples
    rows = [{k: (_pil(v, what, i, k) if k in image_columns else v) for k, v in row.items()}
            for i, row in enumerate(examples)]
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as e:  # noqa: BLE001 - arrow raises ArrowTypeError, ArrowInvalid, ...
        problem = _mixed_column(rows)
        if problem:
            raise ValueError(f"{what}: {problem}. Make every cell of a column one type "
                             "(or drop the rows).") from e
        raise ValueError(f"{what} cannot be held as a table ({type(e).__name__}: {e}). Give "
                         "every row the same columns, each of one type.") from e


def _kind(value: Any) -> str:
    return "image" if type(value).__module__.startswith("PIL") else type(value).__name__


def _mixed_column(rows: list[dict[str, Any]]) -> str:
    """Where a column first changes type (None is allowed anywhere), or ''."""
    first: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(rows):
        for k, v in row.items():
            if v is None:
                continue
            kind = _kind(v)
            if k not in first:
                first[k] = (i, kind)
            elif first[k][1] != kind:
                j, seen = first[k]
                return (f"row {i} holds a {kind} in column {k!r} ({str(v)[:60]!r}), row {j} a "
                        f"{seen}")
    return ""


# ----------------------------------------------------------------------------------------------
# The config


def bind(config: ml_collections.ConfigDict, train_data: Any = None, eval_data: Any = None
         ) -> tuple[ml_collections.ConfigDict, InMemorySource | None]:
    """(a copy of ``config`` whose data keys name an in-memory source of ``train_data`` /
    ``eval_data``, that source; keep it referenced while the run reads data). Both None:
    ``(config, None)``, unchanged. See the module docstring for the keys each task gets."""
    if train_data is None and eval_data is None:
        return config, None
    kind = task_kind(config)
    config = config.copy_and_resolve_references()
    d = config.data
    if d.get("streaming", False):
        raise ConfigError("data.streaming=True reads a file or hub dataset as training "
                          "consumes it; train_data / eval_data are already in memory: set "
                          "data.streaming=False.")
    train = None if train_data is None else to_examples(train_data, TRAIN, config)
    evals = None if eval_data is None else to_examples(eval_data, EVAL, config)
    with config.unlocked():
        if kind == "pairs":
            return _bind_pairs(config, train, evals)
        return _bind_lm(config, train, evals)


def _bind_pairs(config: ml_collections.ConfigDict, train: Any, evals: Any
                ) -> tuple[ml_collections.ConfigDict, InMemorySource]:
    if train is None:
        raise ConfigError(
            "eval_data without train_data: the clip task reads its train and held-out pairs "
            f"from one source (data.name = {config.data.name!r}); pass train_data too, or "
            "evaluate a file with evals.retrieval.source.")
    images = _image_roles(config)
    splits = {TRAIN: _as_dataset(train, TRAIN, images)}
    if evals is not None:
        splits[EVAL] = _as_dataset(evals, EVAL, images)
    source = register(splits, divided=True)
    d = config.data
    d.name, d.split, d.eval_split, d.subset = source.name, TRAIN, EVAL, ""
    return config, source


def _bind_lm(config: ml_collections.ConfigDict, train: Any, evals: Any
             ) -> tuple[ml_collections.ConfigDict, InMemorySource]:
    d = config.data
    if d.get("kind") == "synthetic":
        raise ConfigError("data.kind='synthetic' generates random tokens; for train_data / "
                          "eval_data set data.kind='text' (a text column) or 'chat' "
                          "(conversations).")
    if train is not None and evals is not None:  # every training row trains
        source = register({TRAIN: train, EVAL: evals}, divided=True)
        d.source, d.split, d.eval_source, d.eval_split = source.name, TRAIN, "", EVAL
    elif train is not None:  # held out like a file's: every 50th row (or data.eval_source)
        source = register({"train": train}, divided=False)
        d.source, d.split, d.eval_split = source.name, "train", ""
    else:  # the config's training source, this held-out set (read whole)
        source = register({"train": evals}, divided=False)
        d.eval_source = source.name
    if train is not None:
        d.subset = ""
    if "token_store" in d:
        d.token_store = "memory"
    return config, source
