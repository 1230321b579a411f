"""Zero-shot classification: the labelled image set of the zero-shot evaluator, and its config.

Labelled images (preprocessed as the task's eval images, from its ``data`` block) with class
names and prompt token ids ``[C, M, T]`` from ``templates`` (``"a photo of a {}."``). The keys
(:func:`default_config`, the evaluator's block, e.g. ``config.evals.zero_shot``):

- ``name``: ``""`` = the shapes held-out images when ``data.name`` is shapes (else disabled),
  ``"none"`` = disabled, ``"shapes"``, or a dataset (any source of
  :mod:`jaxtrain.data.sources`: a hub name, a local directory or file);
- ``split``, ``image_column``, ``label_column``, ``max_examples`` (the first N images; 0 = all);
- ``class_names``, ``templates``: prompts are each template with each class name (underscores
  become spaces);
- ``attribute``: for shapes, the labelled attribute of the combination (default ``"shape"``: 4
  classes circle/square/triangle/cross).

For datasets, ``label_column`` holds a ``ClassLabel`` (names from the feature), integers with
``class_names`` given, or strings (classes: ``class_names`` if given, else the sorted distinct
strings). Classify an image by the class whose mean normalised prompt embedding is most similar
to the image's (CLIP's recipe).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.config import Rule
from jaxtrain.data import pipeline
from jaxtrain.data.images import ImagePreprocess
from jaxtrain.data.pair_config import (
    SHAPES,
    SHAPES_EVAL_SEED_OFFSET,
    check_crop,
    check_tokenizer,
    image_preprocess,
)
from jaxtrain.data.shapes import ATTRIBUTE_VALUES, CaptionTokenizer, ShapesSource
from jaxtrain.data.sources import open_source
from jaxtrain.data.tokenizers import TextTokenizer

DISABLED = "none"
PREFIX = "evals.zero_shot."  # where the keys live, for messages


def default_config() -> ml_collections.ConfigDict:
    """The zero-shot set's keys, with their defaults (see the module docstring)."""
    z = ml_collections.ConfigDict()
    z.name = ""  # '' = shapes held-out images if data.name is shapes, else off; 'none' = off
    z.split = "test"  # the dataset split
    z.image_column = "image"
    z.label_column = "label"  # ClassLabel, int (with class_names) or string labels
    z.class_names = ()  # names of classes 0..C-1; () = from the ClassLabel feature / strings
    z.templates = ("a photo of a {}.",)  # prompts; '{}' is replaced by the class name
    z.max_examples = 0  # keep the first N images; 0 = all
    z.attribute = "shape"  # shapes: the labelled attribute: shape | color | size | position
    return z


def config_rules(prefix: str = PREFIX) -> list[Rule]:
    """(key, predicate, rule) checks of :func:`default_config`'s keys under ``prefix``."""
    rules: list[Rule] = [
        ("templates", lambda v: len(v) > 0 and all(
            isinstance(t, str) and t.count("{}") == 1 for t in v),
         "must be a non-empty list of strings each with one '{}' for the class name"),
        ("max_examples", lambda v: v >= 0, "must be >= 0 (0 = all)"),
        ("attribute", lambda v: v in ATTRIBUTE_VALUES,
         f"must be one of {tuple(ATTRIBUTE_VALUES)}"),
    ]
    for key in ("image_column", "label_column"):
        rules.append((key, lambda v: bool(v), "must name a column"))
    return [(prefix + key, ok, rule) for key, ok, rule in rules]


class _ZeroShotRows(Sequence):
    """``rows[i] = {"image": float32 [S, S, 3], "label": int32}``."""

    def __init__(self, images: Sequence, labels: np.ndarray, image: ImagePreprocess,
                 where: str, column: str, base_dir: str | None = None,
                 prefix: str = PREFIX) -> None:
        self.images, self.labels, self.image = images, labels, image
        self.where, self.column, self.base_dir, self.prefix = where, column, base_dir, prefix

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        i = int(index)
        try:
            image = self.image(self.images[i], None, base_dir=self.base_dir)
        except ValueError as e:
            raise ValueError(
                f"Row {i} of {self.where}: cannot decode the image in column {self.column!r}: "
                f"{e}. Fix or drop the row, or set {self.prefix}image_column."
            ) from e
        return {"image": image, "label": self.labels[i]}


class _ShapesImages(Sequence):
    def __init__(self, source: ShapesSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self.source[int(index)]["image"]


class _ColumnCells(Sequence):
    def __init__(self, ds: Any, column: str) -> None:
        self.ds, self.column = ds.select_columns([column]).with_format("arrow"), column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return self.ds[int(index)].to_pylist()[0][self.column]


@dataclasses.dataclass
class ZeroShotSet:
    """Labelled images and class prompts for zero-shot classification.

    ``rows[i]`` is ``{"image": float32 [S, S, 3] (eval preprocessing), "label": int32}``;
    ``labels`` int32 ``[N]``; ``class_names`` the C names; ``prompts`` int32 ``[C, M, T]``:
    the M ``templates`` filled with each class name, tokenised. Classify an image by the class
    whose mean normalised prompt embedding is most similar to the image's (CLIP's recipe).
    """

    rows: Sequence
    labels: np.ndarray
    class_names: list[str]
    templates: tuple[str, ...]
    prompts: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1
                ) -> Iterator[dict[str, np.ndarray]]:
        """``{"image", "label", "valid"}`` batches, one pass, the last padded (as eval)."""
        return pipeline.eval_batches(self.rows, batch_size=batch_size,
                                     process_index=process_index, process_count=process_count)

    @property
    def images(self) -> np.ndarray:
        """All images stacked, float32 ``[N, S, S, 3]`` (small sets; else use batches)."""
        return np.stack([self.rows[i]["image"] for i in range(len(self))])


def _dataset_labels(ds: Any, z: ml_collections.ConfigDict, where: str, prefix: str
                    ) -> tuple[np.ndarray, list[str]]:
    import datasets

    feature = ds.features[z.label_column]
    given = [str(c) for c in z.class_names]
    values = ds.with_format("arrow")[z.label_column].to_pylist()
    if any(v is None for v in values):
        raise ValueError(f"Row {values.index(None)} of {where} has no label "
                         f"(column {z.label_column!r}); drop unlabelled rows.")
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if given:
            if len(given) != len(names):
                raise ValueError(
                    f"{prefix}class_names has {len(given)} names but the ClassLabel "
                    f"{z.label_column!r} of {where} has {len(names)} classes; give one name per "
                    "class, in label order, or () for the feature's names."
                )
            names = given
        labels = np.asarray(values, np.int64)
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = given or sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        unknown = [v for v in values if v not in index]
        if unknown:
            raise ValueError(f"The label {unknown[0]!r} of {where} is not in "
                             f"{prefix}class_names {names}.")
        labels = np.asarray([index[v] for v in values], np.int64)
    elif isinstance(feature, datasets.Value) and "int" in feature.dtype:
        if not given:
            raise ValueError(
                f"The label column {z.label_column!r} of {where} holds plain integers "
                f"({feature}), with no class names: set {prefix}class_names to the names "
                "of classes 0, 1, ..."
            )
        names, labels = given, np.asarray(values, np.int64)
    else:
        raise ValueError(
            f"The label column {z.label_column!r} of {where} holds {feature}; zero-shot needs a "
            f"ClassLabel, integer (with {prefix}class_names) or string label column."
        )
    bad = np.nonzero((labels < 0) | (labels >= len(names)))[0]
    if len(bad):
        raise ValueError(f"Row {int(bad[0])} of {where} has the label {int(labels[bad[0]])}, "
                         f"outside the {len(names)} classes.")
    return labels.astype(np.int32), names



def zero_shot_set(
    z: ml_collections.ConfigDict,
    data_cfg: ml_collections.ConfigDict,
    *,
    image_size: int,
    text_max_len: int,
    seed: int = 0,
    tokenizer: TextTokenizer | None = None,
    prefix: str = PREFIX,
) -> ZeroShotSet | None:
    """The zero-shot classification set of the block ``z``, or None when it is disabled.

    ``data_cfg`` is the task's ``data`` block: its image preprocessing (eval: no augmentation),
    its tokenizer (``tokenizer``, when given, is that one already loaded) and, for shapes, its
    held-out set: the images of the i2t eval set (``seed + 1_000_003``), labelled by
    ``z.attribute``. Datasets: ``z.split`` of ``z.name``. ``prefix`` is where ``z`` lives in the
    config (``"evals.zero_shot."``), for messages.
    """
    d = data_cfg
    name = z.name or (SHAPES if d.name == SHAPES else DISABLED)
    if name == DISABLED:
        return None
    check_tokenizer(d, text_max_len)
    check_crop(d, image_size)
    image = dataclasses.replace(image_preprocess(d, image_size), augment="none", hflip=False)
    if name == SHAPES:
        count = min(d.eval_examples, z.max_examples or d.eval_examples)
        source = ShapesSource(count, image_size=image_size,
                              max_text_len=CaptionTokenizer().min_max_len,
                              seed=seed + SHAPES_EVAL_SEED_OFFSET, unique_combos=True)
        names = list(ATTRIBUTE_VALUES[z.attribute])
        labels = np.asarray(
            [names.index(getattr(source.combo(i), z.attribute)) for i in range(len(source))],
            np.int32)
        images: Sequence = _ShapesImages(source)
        where, column, base_dir = "'shapes' (held-out)", "(generated)", None
    else:
        dataset = open_source(name)
        ds, base_dir = dataset.read(z.split), dataset.base_dir
        if ds is None:
            raise ValueError(f"The zero-shot dataset {name!r} has no split {z.split!r}; set "
                             f"{prefix}split to one of its splits.")
        where = f"{name!r} (split {z.split!r})"
        if z.label_column not in ds.column_names:
            raise ValueError(
                f"A zero-shot set needs labels, but {where} has no label column "
                f"{z.label_column!r}; its columns are {ds.column_names}. Set "
                f"{prefix}label_column, or {prefix}name = 'none' to disable it."
            )
        if z.image_column not in ds.column_names:
            raise ValueError(
                f"{where} has no image column {z.image_column!r}; its columns are "
                f"{ds.column_names}. Set {prefix}image_column."
            )
        if z.max_examples and z.max_examples < len(ds):
            ds = ds.select(range(z.max_examples))
        labels, names = _dataset_labels(ds, z, where, prefix)
        images, column = _ColumnCells(ds, z.image_column), z.image_column
    tokenizer = tokenizer or TextTokenizer(d.tokenizer)
    templates = tuple(z.templates)
    try:
        prompts = np.stack([
            np.stack([tokenizer.encode(t.format(c.replace("_", " ")), text_max_len)
                      for t in templates]) for c in names])
    except ValueError as e:
        raise ValueError(f"Cannot tokenise the zero-shot prompts with {tokenizer!r}: {e}") from e
    rows = _ZeroShotRows(images, labels, image, where, column, base_dir, prefix)
    return ZeroShotSet(rows=rows, labels=labels, class_names=names, templates=templates,
                       prompts=prompts)
