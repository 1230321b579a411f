"""Contrastive rows: raw pairs -> arrays (decode, preprocess/augment, tokenise) -> batches.

A row is a dict of numpy arrays:

- ``"query"``, ``"positive"``: an image is uint8 ``[S, S, 3]``, decoded, resized and cropped
  (or augmented) but not normalised: the task normalises it with ``data.image_mean`` /
  ``image_std`` on the accelerator, inside the jitted step
  (:func:`jaxtrain.tasks.clip.normalize_images`), so batches cross the worker hop and the
  host-to-device copy at a quarter of float32's size (generated float images, e.g. the shapes
  data, stay float32, normalised here); a text is int32 ``[T]`` token ids padded (and
  truncated) to ``T = text_max_len`` with the tokenizer's pad id;
- ``"negatives"`` (only when ``num_negatives > 0``): ``[N, ...]`` of the positive's modality.
  In training a row with more negatives than needed uses a random subset (drawn from the seed
  and the row's stream position); eval uses the first ``num_negatives``.

Batches stack rows (``[B, ...]``); eval batches add ``"valid"`` (bool ``[B]``, False on the
padding of the last batch). Where the raw pairs come from: :mod:`jaxtrain.data.pair_sources`;
the keys: :mod:`jaxtrain.data.pair_config`.

Preprocessing and augmentation (:mod:`jaxtrain.data.images`)
-------------------------------------------------------------
Eval: resize the shorter side to ``image_resize`` (0 = the crop size) and centre-crop
``image_crop`` (0 = the model's ``image_size``), exactly as ``CLIPImageProcessor``; or, with
``image_resize_mode='squash'``, resize straight to ``image_crop`` square, as
``SiglipImageProcessor``. JPEGs >= 2x larger than needed are decoded at 1/2-1/8 scale (PIL
``draft``). Training
with ``augment="random_resized_crop"`` crops ``rrc_scale`` of the area instead (OpenCLIP:
(0.9, 1.0)), plus a horizontal flip if ``hflip``. Augmentation randomness comes from
``(seed, position of the row in the global stream, field)``: a resumed run sees identical
batches, every epoch sees new crops. Shapes images are rendered at the model's size and only
normalised unless augmented; ``hflip`` is refused with shapes (captions name left and right).

Decoding and preprocessing run per row before batching, lazily, only on this host's rows:
in the calling process with ``data.workers = 0`` (``data.prefetch`` batches ahead in threads),
or in ``data.workers`` grain processes, off the training loop's critical path. Either way the
iterator's ``get_state()/set_state()`` resume exactly.

Bad rows: the rows are checked when they are loaded (:mod:`jaxtrain.data.pair_sources`); a
row that still fails when prepared (an image outside the decoded sample that does not decode)
is an error naming the row, or with ``data.on_bad_row='skip'`` is replaced by the next row
(in the part's order, wrapping) that prepares, with a warning: the substitute depends only on
the data, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from jaxtrain.data import pipeline
from jaxtrain.data.images import ImagePreprocess
from jaxtrain.data.pair_config import (
    check_pairs,
    check_tokenizer,
    column_keys,
    image_preprocess,
    role_modalities,
)
from jaxtrain.data.pair_parts import load_part
from jaxtrain.data.pair_sources import PairRows, on_bad_row
from jaxtrain.data.sanity import warn_once
from jaxtrain.data.tokenizers import TextTokenizer

if TYPE_CHECKING:  # only an annotation here (the iterator comes from jaxtrain.data.pipeline)
    import grain

_AUGMENT_TAG = (0xA06E, 0x7A11)  # entropy tag of the augmentation rng (seed, tag, position)


def load_text_tokenizer(data_cfg: ml_collections.ConfigDict, **encoding: Any) -> TextTokenizer:
    """The tokenizer of ``data.tokenizer`` (use its ``vocab_size`` for the text tower);
    ``encoding``: :class:`TextTokenizer`'s ``pad_with`` / ``append_eos``."""
    check_tokenizer(data_cfg, None)
    return TextTokenizer(data_cfg.tokenizer, **encoding)


@dataclasses.dataclass(frozen=True)
class RowPreparer:
    """``(position, raw row) -> row of arrays``: decode, preprocess/augment, tokenise.

    With ``seed`` set (training) the augmentation of field k of the row at global stream
    ``position`` uses ``np.random.default_rng([seed, tag, position, k])``; None: no augmentation
    (eval). ``prefixes``: role -> text put before every text of that role (instruction
    prefixes; negatives take the positive's).
    """

    kinds: dict[str, str]  # role -> 'image' | 'text'
    columns: dict[str, str]  # role -> column name (error messages)
    keys: dict[str, str]  # role -> config key of the column (error messages)
    num_negatives: int
    image: ImagePreprocess
    tokenizer: TextTokenizer | None
    text_max_len: int
    where: str
    base_dir: str | None = None
    seed: int | None = None
    substitutes: Sequence | None = None  # on_bad_row='skip': the raw rows to take one from
    prefixes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def _rng(self, position: int, field: int) -> np.random.Generator | None:
        if self.seed is None:
            return None
        return np.random.default_rng([self.seed, *_AUGMENT_TAG, int(position), field])

    def _field(self, value: Any, role: str, row: int, rng: np.random.Generator | None,
               item: int | None = None) -> np.ndarray:
        col = self.columns[role]
        kind = self.kinds[role]
        what = f"the {role} {kind}{'' if item is None else f' (item {item})'} in column {col!r}"
        if kind == "text":
            if not isinstance(value, str):
                raise ValueError(
                    f"Row {row} of {self.where}: {what} is a {type(value).__name__} "
                    f"({str(value)[:80]!r}), not a string. Make every cell of {col!r} text "
                    f"(or drop the row), or set data.{self.keys[role]} to a text column."
                )
            assert self.tokenizer is not None
            return self.tokenizer.encode(self.prefixes.get(role, "") + value, self.text_max_len)
        try:
            return self.image(value, rng, base_dir=self.base_dir)
        except ValueError as e:
            raise ValueError(
                f"Row {row} of {self.where}: cannot decode {what}: {e}. Fix or drop "
                f"the row, or set data.{self.keys[role]} to an image column."
            ) from e

    def __call__(self, position: int, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        try:
            return self.prepare(position, raw)
        except ValueError as e:
            if self.substitutes is None:
                raise
            return self._substitute(position, raw, e)

    def _substitute(self, position: int, raw: dict[str, Any], error: ValueError
                    ) -> dict[str, np.ndarray]:
        """The next row after ``raw`` (wrapping) that prepares, prepared at ``position``."""
        rows = self.substitutes
        for k in range(1, len(rows)):
            other = rows[(raw["__index__"] + k) % len(rows)]
            try:
                out = self.prepare(position, other)
            except ValueError:
                continue
            warn_once(f"data.on_bad_row='skip': row {other['__row__']} of {self.where} is used "
                      f"in place of a bad row found while preparing it: {error}")
            return out
        raise ValueError(f"No row of {self.where} can be prepared; the first bad one: "
                         f"{error}") from error

    def prepare(self, position: int, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        """The row of arrays of ``raw`` at stream ``position`` (ValueError if it is bad)."""
        row = raw["__row__"]
        out = {"query": self._field(raw["query"], "query", row, self._rng(position, 0)),
               "positive": self._field(raw["positive"], "positive", row, self._rng(position, 1))}
        n = self.num_negatives
        if n:
            negatives = raw["negatives"]
            if not isinstance(negatives, list | tuple) or len(negatives) < n:
                got = (f"{len(negatives)} items" if isinstance(negatives, list | tuple)
                       else f"a {type(negatives).__name__}")
                raise ValueError(
                    f"Row {row} of {self.where}: the negatives column "
                    f"{self.columns['negatives']!r} holds {got}, not a list of at least "
                    f"num_negatives={n}. Use fewer negatives or drop the row."
                )
            pick_rng = self._rng(position, 2)
            if pick_rng is not None and len(negatives) > n:
                chosen = sorted(pick_rng.choice(len(negatives), n, replace=False).tolist())
            else:
                chosen = list(range(n))
            out["negatives"] = np.stack([
                self._field(negatives[k], "negatives", row, self._rng(position, 3 + j), item=k)
                for j, k in enumerate(chosen)
            ])
        return out


def build_rows(d: ml_collections.ConfigDict, *, which: str, mode: str, num_negatives: int,
               image_size: int, text_max_len: int, seed: int,
               tokenizer: TextTokenizer | None = None,
               prefixes: Mapping[str, str] | None = None) -> tuple[Sequence, RowPreparer]:
    """(raw rows, preparer without seed) of the train (``which="train"``) or eval part.
    ``tokenizer``: the loaded ``data.tokenizer`` (default: loaded here); ``prefixes``: role ->
    instruction prefix of its texts."""
    check_pairs(d, mode, num_negatives, image_size, text_max_len)
    kinds = role_modalities(mode)
    keys = column_keys(mode, num_negatives)
    if "text" not in kinds.values():
        tokenizer = None
    elif tokenizer is None:
        tokenizer = TextTokenizer(d.tokenizer)
    image = image_preprocess(d, image_size)
    part = load_part(d, which, mode=mode, num_negatives=num_negatives, image_size=image_size,
                     seed=seed)
    if part.adapt_image is not None:  # e.g. prepared shards: images already cropped
        image = part.adapt_image(image)
    rows = PairRows(part.examples, part.columns, rows=part.rows)
    preparer = RowPreparer(kinds=kinds, columns=part.columns, keys=keys,
                           num_negatives=num_negatives, image=image,
                           tokenizer=tokenizer, text_max_len=text_max_len, where=part.where,
                           base_dir=part.base_dir,
                           substitutes=rows if on_bad_row(d) == "skip" else None,
                           prefixes=dict(prefixes or {}))
    return rows, preparer


def train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    mode: str,
    num_negatives: int,
    image_size: int,
    text_max_len: int,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: TextTokenizer | None = None,
    prefixes: Mapping[str, str] | None = None,
    built: tuple[Sequence, RowPreparer] | None = None,
) -> grain.DatasetIterator:
    """Endless training batches of this host (``batch_size`` rows, per host), resumable.

    Semantics of :func:`jaxtrain.data.pipeline.train_iterator`: the global order is the same
    on any number of hosts, reshuffled every epoch, and ``get_state()/set_state()`` resume
    exactly (augmentation included; with ``data.workers > 0`` too). ``built``: the training
    part's :func:`build_rows` (same settings), when the caller already has it.
    """
    rows, preparer = built or build_rows(
        data_cfg, which="train", mode=mode, num_negatives=num_negatives, image_size=image_size,
        text_max_len=text_max_len, seed=seed, tokenizer=tokenizer, prefixes=prefixes)
    return pipeline.train_iterator(
        rows, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count, row_map=dataclasses.replace(preparer, seed=seed),
        workers=data_cfg.workers, prefetch=data_cfg.prefetch,
    )


def eval_batches(
    data_cfg: ml_collections.ConfigDict,
    *,
    mode: str,
    num_negatives: int,
    image_size: int,
    text_max_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    tokenizer: TextTokenizer | None = None,
    prefixes: Mapping[str, str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval rows, no augmentation; the last batch padded, with ``valid``.

    ``seed`` only picks the shapes held-out set (``seed + 1_000_003``; pass the run's seed to
    get the set the CLIP task always used). The data is opened (and checked) on the call.
    """
    rows, preparer = build_rows(data_cfg, which="eval", mode=mode, num_negatives=num_negatives,
                                image_size=image_size, text_max_len=text_max_len, seed=seed,
                                tokenizer=tokenizer, prefixes=prefixes)
    return pipeline.eval_batches(rows, batch_size=batch_size, process_index=process_index,
                                 process_count=process_count, row_map=preparer)
