"""Data for contrastive (dual-encoder) training: (query, positive, hard negatives) rows.

Retrieval modes
---------------
``MODES = ("i2t", "t2i", "t2t", "i2i")``: the query and positive modalities are (image, text),
(text, image), (text, text) and (image, image). A row is a dict of numpy arrays:

- ``"query"``, ``"positive"``: an image is float32 ``[S, S, 3]``, preprocessed (resized, cropped,
  normalised with ``data.image_mean``/``image_std``); a text is int32 ``[T]`` token ids padded
  (and truncated) to ``T = text_max_len`` with the tokenizer's pad id;
- ``"negatives"`` (only when ``num_negatives > 0``): ``[N, ...]`` of the positive's modality.

Batches stack rows (``[B, ...]``); eval batches add ``"valid"`` (bool ``[B]``, False on the
padding of the last batch).

Sources (``data.name``)
-----------------------
- ``"shapes"``: the built-in generated data (:class:`jaxtrain.data.shapes.ShapesPairs`): image
  + caption for i2t/t2i (exactly the examples of ``ShapesSource``), caption + paraphrase (another
  template) for t2t, two renderings of the same combination for i2i; hard negatives differ from
  the positive's combination in exactly one attribute. ``data.train_examples`` examples from
  ``seed``; the held-out set is one fresh rendering of each of ``data.eval_examples`` distinct
  combinations, from ``seed + 1_000_003`` (as the CLIP task always had).
- a Hugging Face hub dataset name, or a local dataset directory: ``save_to_disk`` output, or any
  folder ``datasets.load_dataset`` understands (e.g. an ``imagefolder`` with ``metadata.jsonl``);
- a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (its one split is ``"train"``).

Image cells may be ``Image()`` features, bytes, ``{"bytes", "path"}`` dicts or paths; relative
paths resolve against the file's (or the local directory's) folder. Columns: ``image_column`` +
``text_column`` for i2t/t2i; ``query_column`` + ``positive_column`` for t2t/i2i;
``negatives_column`` (a list per row, at least ``num_negatives`` long) when ``num_negatives >
0``. In training a row with more negatives than needed uses a random subset (drawn from the
seed and the row's stream position); eval uses the first ``num_negatives``.

Splits: training reads ``data.split``; eval reads ``data.eval_split`` if the dataset has it,
else the last ``data.eval_fraction`` of ``data.split`` (then excluded from training).
``max_train_examples`` / ``max_eval_examples`` keep the first rows of each (0 = all).

Preprocessing and augmentation (:mod:`jaxtrain.data.images`)
-------------------------------------------------------------
Eval: resize the shorter side to ``image_resize`` (0 = the crop size) and centre-crop
``image_crop`` (0 = the model's ``image_size``), exactly as ``CLIPImageProcessor``. Training
with ``augment="random_resized_crop"`` crops ``rrc_scale`` of the area instead (OpenCLIP:
(0.9, 1.0)), plus a horizontal flip if ``hflip``. Augmentation randomness comes from
``(seed, position of the row in the global stream, field)``: a resumed run sees identical
batches, every epoch sees new crops. Shapes images are rendered at the model's size and only
normalised unless augmented; ``hflip`` is refused with shapes (captions name left and right).

Decoding and preprocessing run per row before batching, lazily, only on this host's rows:
in the calling process with ``data.workers = 0`` (``data.prefetch`` batches ahead in threads),
or in ``data.workers`` grain processes, off the training loop's critical path. Either way the
iterator's ``get_state()/set_state()`` resume exactly.

Zero-shot classification (:func:`zero_shot_set`, the ``data.zero_shot`` block)
-------------------------------------------------------------------------------
Labelled images (preprocessed as for eval) with class names and prompt token ids ``[C, M, T]``
from ``templates`` (``"a photo of a {}."``). ``zero_shot.name``: ``""`` = the shapes held-out
images when ``data.name`` is shapes (else disabled), ``"none"`` = disabled, ``"shapes"`` or a
dataset (as ``data.name``). For shapes the label is one attribute of the combination
(``zero_shot.attribute``, default ``"shape"``: 4 classes circle/square/triangle/cross). For
datasets, ``label_column`` holds a ``ClassLabel`` (names from the feature), integers with
``class_names`` given, or strings (classes: ``class_names`` if given, else the sorted distinct
strings). Underscores in class names become spaces in prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grain
import ml_collections
import numpy as np

from jaxtrain.config import ConfigError, Rule
from jaxtrain.data import pipeline
from jaxtrain.data.images import AUGMENTS, CLIP_MEAN, CLIP_STD, INTERPOLATIONS, ImagePreprocess
from jaxtrain.data.shapes import (
    ATTRIBUTE_VALUES,
    NUM_COMBOS,
    PAIR_MODES,
    CaptionTokenizer,
    ShapesPairs,
    ShapesSource,
)

if TYPE_CHECKING:
    import datasets

MODES: tuple[str, ...] = tuple(PAIR_MODES)  # ("i2t", "t2i", "t2t", "i2i")
ROLES: tuple[str, ...] = ("query", "positive", "negatives")
SHAPES = "shapes"
DISABLED = "none"
SHAPES_EVAL_SEED_OFFSET = 1_000_003  # the shapes held-out set is drawn from seed + this
LOCAL_FORMATS: dict[str, str] = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
}
_AUGMENT_TAG = (0xA06E, 0x7A11)  # entropy tag of the augmentation rng (seed, tag, position)
_SAVED_FILES = ("state.json", "dataset_dict.json")  # written by Dataset(Dict).save_to_disk


# ----------------------------------------------------------------------------------------------
# Config


def default_data_config() -> ml_collections.ConfigDict:
    """The ``data`` block of a contrastive task, with its defaults (see the module docstring)."""
    d = ml_collections.ConfigDict()
    # 'shapes' (built-in, generated) | hub dataset name | local dataset directory
    # (save_to_disk, or a folder load_dataset reads, e.g. imagefolder + metadata.jsonl) |
    # local .jsonl/.json/.csv/.parquet file (image paths relative to the file).
    d.name = SHAPES
    d.split = "train"  # the training split
    d.eval_split = "validation"  # the eval split, if the dataset has it ('' = never look)
    d.eval_fraction = 0.02  # no eval split: hold out this last fraction of `split` for eval
    d.train_examples = 50_000  # shapes: number of generated training examples
    d.eval_examples = NUM_COMBOS  # shapes: held-out examples, distinct combinations (<= 240)
    d.max_train_examples = 0  # datasets: keep the first N training rows; 0 = all
    d.max_eval_examples = 0  # datasets: keep the first N eval rows; 0 = all
    d.image_column = "image"  # i2t/t2i: the image column
    d.text_column = "text"  # i2t/t2i: the text column
    d.query_column = "query"  # t2t/i2i: the query column (text or image)
    d.positive_column = "positive"  # t2t/i2i: the positive column
    d.negatives_column = "negatives"  # num_negatives > 0: a list column of the positive's kind
    # '' = the built-in shapes caption tokenizer (shapes only); else a hub name or a
    # save_pretrained directory, loaded with transformers.AutoTokenizer.
    d.tokenizer = ""
    d.image_resize = 0  # eval/no augmentation: shorter side resized to this; 0 = image_crop
    d.image_crop = 0  # output side; 0 = the model's image size (must equal it)
    d.image_mean = CLIP_MEAN  # per-channel mean of x / 255, subtracted
    d.image_std = CLIP_STD  # per-channel std, divided by
    d.image_interpolation = "bicubic"  # PIL filter: nearest|bilinear|bicubic|lanczos|box|hamming
    d.augment = "none"  # training: 'none' | 'random_resized_crop'
    d.rrc_scale = (0.9, 1.0)  # random_resized_crop: area fraction range (OpenCLIP's default)
    d.rrc_ratio = (3 / 4, 4 / 3)  # random_resized_crop: aspect ratio (w / h) range
    d.hflip = False  # training: random horizontal flips (off: captions may say left/right)
    d.workers = 0  # 0 = preprocess in this process; > 0 = grain worker processes
    d.prefetch = 2  # batches prepared ahead (threads, or per worker); 0 = synchronous
    z = d.zero_shot = ml_collections.ConfigDict()
    z.name = ""  # '' = shapes held-out images if data.name is shapes, else off; 'none' = off
    z.split = "test"  # the dataset split
    z.image_column = "image"
    z.label_column = "label"  # ClassLabel, int (with class_names) or string labels
    z.class_names = ()  # names of classes 0..C-1; () = from the ClassLabel feature / strings
    z.templates = ("a photo of a {}.",)  # prompts; '{}' is replaced by the class name
    z.max_examples = 0  # keep the first N images; 0 = all
    z.attribute = "shape"  # shapes: the labelled attribute: shape | color | size | position
    return d


def _pair_of(lo: float, hi: float) -> Any:
    return lambda v: len(v) == 2 and lo <= v[0] <= v[1] <= hi


def data_config_rules(prefix: str = "data.") -> list[Rule]:
    """(key, predicate, rule) checks of :func:`default_data_config`'s keys under ``prefix``."""
    rules: list[Rule] = [
        ("name", lambda v: bool(v), "must name 'shapes', a dataset, a directory or a file"),
        ("train_examples", lambda v: v > 0, "must be > 0"),
        ("eval_examples", lambda v: 0 < v <= NUM_COMBOS,
         f"must be in [1, {NUM_COMBOS}] (distinct combinations in the shapes held-out split)"),
        ("max_train_examples", lambda v: v >= 0, "must be >= 0 (0 = all)"),
        ("max_eval_examples", lambda v: v >= 0, "must be >= 0 (0 = all)"),
        ("eval_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("image_resize", lambda v: v >= 0, "must be >= 0 (0 = the crop size)"),
        ("image_crop", lambda v: v >= 0, "must be >= 0 (0 = the model's image size)"),
        ("image_mean", lambda v: len(v) == 3, "must have 3 values (R, G, B)"),
        ("image_std", lambda v: len(v) == 3 and min(v) > 0, "must have 3 values > 0"),
        ("image_interpolation", lambda v: v in INTERPOLATIONS,
         f"must be one of {tuple(INTERPOLATIONS)}"),
        ("augment", lambda v: v in AUGMENTS, f"must be one of {AUGMENTS}"),
        ("rrc_scale", lambda v: _pair_of(0, 1)(v) and v[0] > 0,
         "must be (lo, hi) with 0 < lo <= hi <= 1"),
        ("rrc_ratio", lambda v: _pair_of(0, float("inf"))(v) and v[0] > 0,
         "must be (lo, hi) with 0 < lo <= hi"),
        ("workers", lambda v: v >= 0, "must be >= 0 (0 = in this process)"),
        ("prefetch", lambda v: v >= 0, "must be >= 0 (0 = synchronous)"),
        ("zero_shot.templates", lambda v: len(v) > 0 and all(
            isinstance(t, str) and t.count("{}") == 1 for t in v),
         "must be a non-empty list of strings each with one '{}' for the class name"),
        ("zero_shot.max_examples", lambda v: v >= 0, "must be >= 0 (0 = all)"),
        ("zero_shot.attribute", lambda v: v in ATTRIBUTE_VALUES,
         f"must be one of {tuple(ATTRIBUTE_VALUES)}"),
    ]
    for key in ("image_column", "text_column", "query_column", "positive_column",
                "negatives_column", "zero_shot.image_column", "zero_shot.label_column"):
        rules.append((key, lambda v: bool(v), "must name a column"))
    return [(prefix + key, ok, rule) for key, ok, rule in rules]


def _check(d: ml_collections.ConfigDict, mode: str, num_negatives: int, image_size: int,
           text_max_len: int) -> None:
    if mode not in MODES:
        raise ConfigError(f"Unknown retrieval mode {mode!r}; expected one of {MODES}.")
    if num_negatives < 0:
        raise ConfigError(f"num_negatives must be >= 0; got {num_negatives}.")
    _check_crop(d, image_size)
    if d.name == SHAPES and d.hflip:
        raise ConfigError(
            "data.hflip is on with the shapes data, whose captions and positions name left and "
            "right: a flipped image no longer matches. Set data.hflip = False."
        )
    if "text" in PAIR_MODES[mode]:
        _check_tokenizer(d, text_max_len)


def _check_crop(d: ml_collections.ConfigDict, image_size: int) -> None:
    if d.image_crop and d.image_crop != image_size:
        raise ConfigError(
            f"data.image_crop ({d.image_crop}) differs from the model's image size "
            f"({image_size}); set data.image_crop = 0 (= the model's size) or the model's size."
        )


def _check_tokenizer(d: ml_collections.ConfigDict, text_max_len: int | None) -> None:
    if d.tokenizer == "" and d.name != SHAPES:
        raise ConfigError(
            f"data.tokenizer is '' (the built-in shapes caption tokenizer, which only knows the "
            f"words of the shapes captions) but data.name is {d.name!r}. Set data.tokenizer to a "
            "Hugging Face tokenizer: a hub name (e.g. 'openai/clip-vit-base-patch32') or a "
            "directory written by save_pretrained."
        )
    if d.tokenizer == "" and text_max_len is not None:
        minimum = CaptionTokenizer().min_max_len
        if text_max_len < minimum:
            raise ConfigError(
                f"text_max_len ({text_max_len}) is shorter than the longest shapes caption "
                f"({minimum} tokens with bos/eos); use text_max_len >= {minimum}."
            )


# ----------------------------------------------------------------------------------------------
# Tokenizer


class TextTokenizer:
    """Text to int32 ids ``[max_len]``: the shapes :class:`CaptionTokenizer` (name ``""``) or a
    Hugging Face tokenizer (hub name or local directory) that pads with its pad id (its eos when
    it has none) and truncates to ``max_len``, special tokens (e.g. CLIP's bos/eos) included."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._caption: CaptionTokenizer | None = None
        self._hf: Any = None
        if name == "":
            self._caption = CaptionTokenizer()
            self.pad_id, self.vocab_size = self._caption.pad_id, self._caption.vocab_size
        else:
            self._hf = _load_hf_tokenizer(name)
            pad = self._hf.pad_token_id
            if pad is None:
                if self._hf.eos_token is None:
                    raise ValueError(
                        f"The tokenizer {name!r} has neither a pad nor an eos token to pad with. "
                        "Set one (tokenizer.pad_token = ...) and save it with save_pretrained."
                    )
                self._hf.pad_token = self._hf.eos_token
            self.pad_id, self.vocab_size = int(self._hf.pad_token_id), len(self._hf)
        # The id that ends a text (pooling position for Hugging Face-style text towers).
        self.eos_id = int(self._hf.eos_token_id if self._hf is not None
                          and self._hf.eos_token_id is not None else
                          self.pad_id if self._hf is not None else self._caption.eos_id)

        self._lock = threading.Lock()

    @property
    def hf(self) -> Any:
        """The Hugging Face tokenizer (None for the built-in caption vocabulary)."""
        return self._hf

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """int32 ``[max_len]`` ids of ``text``. Thread-safe."""
        if self._caption is not None:
            return self._caption.encode(text, max_len)
        # A fast tokenizer call sets the Rust tokenizer's truncation/padding: concurrent calls
        # from prefetch threads would race ("Already borrowed"), so they take turns.
        with self._lock:
            ids = self._hf(text, max_length=max_len, truncation=True, padding="max_length",
                           return_attention_mask=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def __getstate__(self) -> dict[str, Any]:  # for grain worker processes: locks don't pickle
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id})"


def _load_hf_tokenizer(name: str) -> Any:
    import transformers

    from jaxtrain.data.tokenizers import BUILTIN_TOKENIZER, load_tokenizer, looks_like_path

    if name == BUILTIN_TOKENIZER:
        # The built-in tokenizer is one shared object, and encode() sets its truncation and
        # padding (state of the Rust tokenizer): work on a copy, or every later user of it
        # (the LM task) would truncate too.
        return copy.deepcopy(load_tokenizer(name))
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        try:
            return transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"The tokenizer directory {name!r} could not be loaded ({type(e).__name__}: {e}); "
                "write it with `tokenizer.save_pretrained(directory)`."
            ) from e
    if looks_like_path(name):
        raise ValueError(f"The tokenizer {name!r} looks like a local path but does not exist.")
    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded"
        raise ValueError(
            f"Could not load the tokenizer {name!r}: it is not a local directory and as a hub "
            f"name {why} ({type(e).__name__}: {e}). Use a directory written by save_pretrained, "
            "or download it first (run once with network access)."
        ) from e


def load_text_tokenizer(data_cfg: ml_collections.ConfigDict) -> TextTokenizer:
    """The tokenizer of ``data.tokenizer`` (use its ``vocab_size`` for the text tower)."""
    _check_tokenizer(data_cfg, None)
    return TextTokenizer(data_cfg.tokenizer)


# ----------------------------------------------------------------------------------------------
# Loading datasets


def _is_unknown_split(e: Exception) -> bool:
    return isinstance(e, ValueError) and "Unknown split" in str(e)


def load_split(name: str, split: str) -> tuple[datasets.Dataset | None, str | None]:
    """(rows of ``split`` of a dataset, folder that relative image paths resolve against).

    ``name``: a local file (its only split is ``"train"``), a local directory (``save_to_disk``
    output, whose lone Dataset is ``"train"``, or a folder ``load_dataset`` reads) or a hub
    dataset. The rows are None when the dataset has no such split.
    """
    import datasets

    path = os.path.expanduser(name)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        if ext not in LOCAL_FORMATS:
            raise ValueError(
                f"Cannot read the data file {name!r}: a local file must be one of "
                f"{sorted(LOCAL_FORMATS)} (or pass a dataset directory)."
            )
        base = os.path.dirname(os.path.abspath(path))
        if split != "train":
            return None, base
        return datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train"), base
    if os.path.isdir(path):
        base = os.path.abspath(path)
        if any(os.path.exists(os.path.join(path, f)) for f in _SAVED_FILES):
            saved = datasets.load_from_disk(path)
            if isinstance(saved, datasets.DatasetDict):
                return saved.get(split), base
            return (saved if split == "train" else None), base
        try:
            return datasets.load_dataset(path, split=split), base
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; re-raised below
            if _is_unknown_split(e):
                return None, base
            raise ValueError(
                f"Could not load the local dataset directory {name!r} ({type(e).__name__}: {e}). "
                "Use a save_to_disk directory, an imagefolder (images + metadata.jsonl), or a "
                f"folder of {'/'.join(sorted(LOCAL_FORMATS))} files."
            ) from e
    from jaxtrain.data.tokenizers import looks_like_path

    if looks_like_path(name) or ext in LOCAL_FORMATS:
        raise ValueError(f"The dataset {name!r} looks like a local path but does not exist.")
    try:
        return datasets.load_dataset(name, split=split), None
    except Exception as e:  # noqa: BLE001
        if _is_unknown_split(e):
            return None, None
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "it could not be loaded from the hub"
        raise ValueError(
            f"The dataset {name!r} is not the built-in {SHAPES!r}, not a local file or "
            f"directory, and as a hub dataset {why} ({type(e).__name__}: {e}). Check the name, "
            "or download it first (run once with network access)."
        ) from e


@dataclasses.dataclass(frozen=True)
class _Part:
    ds: Any  # datasets.Dataset
    offset: int  # index in the loaded split of its first row (for error messages)
    base_dir: str | None
    where: str  # "'name' (split 'x')", for error messages


def _load_part(d: ml_collections.ConfigDict, which: str) -> _Part:
    """The training (``which="train"``) or eval rows of a dataset, with the hold-out rule."""
    train, base = load_split(d.name, d.split)
    if train is None:
        raise ValueError(
            f"The dataset {d.name!r} has no split {d.split!r}; set data.split to one of its "
            "splits (a local file's only split is 'train')."
        )
    held_out = False
    if d.eval_split:
        evals = train if d.eval_split == d.split else load_split(d.name, d.eval_split)[0]
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
            ds, where = ds.select(range(cut)), f"split {d.split!r} less its held-out end"
    else:
        cap = d.max_eval_examples
        if held_out:
            ds, offset = train.select(range(cut, n)), cut
            where = f"split {d.split!r}, held-out rows {cut}-{n - 1}"
        else:
            ds, offset, where = evals, 0, f"split {d.eval_split!r}"
    if cap and cap < len(ds):
        ds = ds.select(range(cap))
    if len(ds) == 0:
        raise ValueError(f"{d.name!r} ({where}) has no rows.")
    return _Part(ds, offset, base, f"{d.name!r} ({where})")


def _roles(d: ml_collections.ConfigDict, mode: str, num_negatives: int) -> dict[str, str]:
    """role -> config key naming its column."""
    if mode in ("i2t", "t2i"):
        image, text = "image_column", "text_column"
        keys = {"query": image, "positive": text} if mode == "i2t" else {
            "query": text, "positive": image}
    else:
        keys = {"query": "query_column", "positive": "positive_column"}
    if num_negatives:
        keys["negatives"] = "negatives_column"
    return keys


def _is_list(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.List | datasets.LargeList | list)


def _list_item(feature: Any) -> Any:
    return feature[0] if isinstance(feature, list) else feature.feature


def _check_columns(part: _Part, d: ml_collections.ConfigDict, mode: str, keys: dict[str, str],
                   kinds: dict[str, str], num_negatives: int) -> dict[str, str]:
    import datasets

    columns = {role: d[key] for role, key in keys.items()}
    present = part.ds.column_names
    missing = {role: col for role, col in columns.items() if col not in present}
    if missing:
        need = ", ".join(f"{role} (data.{keys[role]} = {col!r})" for role, col in missing.items())
        raise ValueError(
            f"The retrieval mode {mode!r} (with {num_negatives} negatives) needs columns that "
            f"{part.where} lacks: {need}. Its columns are {present}. Set those data.*_column "
            "keys to existing columns, or use a mode the dataset supports."
        )
    features = part.ds.features
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


def _check_negatives_length(part: _Part, column: str, num_negatives: int) -> None:
    import pyarrow.compute as pc

    if getattr(part.ds, "_indices", None) is not None:  # a selection: checked row by row
        return
    lengths = pc.list_value_length(part.ds.data.column(column)).to_numpy(zero_copy_only=False)
    short = np.nonzero(np.nan_to_num(lengths.astype(float), nan=0) < num_negatives)[0]
    if len(short):
        i = int(short[0])
        raise ValueError(
            f"Row {part.offset + i} of {part.where} has {int(np.nan_to_num(lengths[i]))} "
            f"negatives in column {column!r}, fewer than num_negatives={num_negatives} "
            f"({len(short)} rows are short). Use fewer negatives or drop those rows."
        )


class DatasetRows(Sequence):
    """Raw rows ``{"query", "positive"[, "negatives"], "__row__"}`` of a datasets.Dataset, read as
    arrow (nothing decoded: images stay bytes/paths until the row is prepared)."""

    def __init__(self, ds: Any, columns: dict[str, str], offset: int = 0) -> None:
        self.columns = dict(columns)
        self.ds = ds.select_columns(sorted(set(columns.values()))).with_format("arrow")
        self.offset = offset

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        i = int(index)
        if not 0 <= i < len(self.ds):
            raise IndexError(f"row {index} out of range for {len(self.ds)} rows")
        row = self.ds[i].to_pylist()[0]
        out = {role: row[col] for role, col in self.columns.items()}
        out["__row__"] = self.offset + i
        return out


class ShapesRows(Sequence):
    """Raw rows of :class:`ShapesPairs` in the :class:`DatasetRows` layout."""

    def __init__(self, pairs: ShapesPairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        row = self.pairs[int(index)]
        out = {role: row[role] for role in ROLES if role != "negatives" or self.pairs.num_negatives}
        out["__row__"] = int(index)
        return out


# ----------------------------------------------------------------------------------------------
# Preparing rows


@dataclasses.dataclass(frozen=True)
class RowPreparer:
    """``(position, raw row) -> row of arrays``: decode, preprocess/augment, tokenise.

    With ``seed`` set (training) the augmentation of field k of the row at global stream
    ``position`` uses ``np.random.default_rng([seed, tag, position, k])``; None: no augmentation
    (eval).
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
            return self.tokenizer.encode(value, self.text_max_len)
        try:
            return self.image(value, rng, base_dir=self.base_dir)
        except ValueError as e:
            raise ValueError(
                f"Row {row} of {self.where}: cannot decode {what}: {e}. Fix or drop "
                f"the row, or set data.{self.keys[role]} to an image column."
            ) from e

    def __call__(self, position: int, raw: dict[str, Any]) -> dict[str, np.ndarray]:
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


def _image_preprocess(d: ml_collections.ConfigDict, image_size: int) -> ImagePreprocess:
    return ImagePreprocess(
        crop=d.image_crop or image_size,
        resize=d.image_resize,
        interpolation=d.image_interpolation,
        mean=tuple(d.image_mean),
        std=tuple(d.image_std),
        augment=d.augment,
        rrc_scale=tuple(d.rrc_scale),
        rrc_ratio=tuple(d.rrc_ratio),
        hflip=d.hflip,
    )


def _build(d: ml_collections.ConfigDict, *, which: str, mode: str, num_negatives: int,
           image_size: int, text_max_len: int, seed: int) -> tuple[Sequence, RowPreparer]:
    """(raw rows, preparer without seed) of the train or eval part."""
    _check(d, mode, num_negatives, image_size, text_max_len)
    kinds = dict(zip(("query", "positive"), PAIR_MODES[mode], strict=True))
    kinds["negatives"] = kinds["positive"]
    keys = _roles(d, mode, num_negatives)
    tokenizer = TextTokenizer(d.tokenizer) if "text" in kinds.values() else None
    image = _image_preprocess(d, image_size)
    if d.name == SHAPES:
        train = which == "train"
        pairs = ShapesPairs(
            d.train_examples if train else d.eval_examples, mode=mode,
            num_negatives=num_negatives, image_size=image_size,
            seed=seed if train else seed + SHAPES_EVAL_SEED_OFFSET, unique_combos=not train,
        )
        rows: Sequence = ShapesRows(pairs)
        where = f"'shapes' ({'train' if train else 'held-out'})"
        columns = {role: "(generated)" for role in keys}
        base_dir = None
    else:
        part = _load_part(d, which)
        columns = _check_columns(part, d, mode, keys, kinds, num_negatives)
        rows = DatasetRows(part.ds, columns, part.offset)
        where, base_dir = part.where, part.base_dir
    preparer = RowPreparer(kinds=kinds, columns=columns, keys=keys, num_negatives=num_negatives,
                           image=image, tokenizer=tokenizer, text_max_len=text_max_len,
                           where=where, base_dir=base_dir)
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
) -> grain.DatasetIterator:
    """Endless training batches of this host (``batch_size`` rows, per host), resumable.

    Semantics of :func:`jaxtrain.data.pipeline.train_iterator`: the global order is the same
    on any number of hosts, reshuffled every epoch, and ``get_state()/set_state()`` resume
    exactly (augmentation included; with ``data.workers > 0`` too).
    """
    rows, preparer = _build(data_cfg, which="train", mode=mode, num_negatives=num_negatives,
                            image_size=image_size, text_max_len=text_max_len, seed=seed)
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
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval rows, no augmentation; the last batch padded, with ``valid``.

    ``seed`` only picks the shapes held-out set (``seed + 1_000_003``; pass the run's seed to
    get the set the CLIP task always used). The data is opened (and checked) on the call.
    """
    rows, preparer = _build(data_cfg, which="eval", mode=mode, num_negatives=num_negatives,
                            image_size=image_size, text_max_len=text_max_len, seed=seed)
    return pipeline.eval_batches(rows, batch_size=batch_size, process_index=process_index,
                                 process_count=process_count, row_map=preparer)


# ----------------------------------------------------------------------------------------------
# Zero-shot classification


class _ZeroShotRows(Sequence):
    """``rows[i] = {"image": float32 [S, S, 3], "label": int32}``."""

    def __init__(self, images: Sequence, labels: np.ndarray, image: ImagePreprocess,
                 where: str, column: str, base_dir: str | None = None) -> None:
        self.images, self.labels, self.image = images, labels, image
        self.where, self.column, self.base_dir = where, column, base_dir

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        i = int(index)
        try:
            image = self.image(self.images[i], None, base_dir=self.base_dir)
        except ValueError as e:
            raise ValueError(
                f"Row {i} of {self.where}: cannot decode the image in column {self.column!r}: "
                f"{e}. Fix or drop the row, or set data.zero_shot.image_column."
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


def _dataset_labels(ds: Any, z: ml_collections.ConfigDict, where: str
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
                    f"data.zero_shot.class_names has {len(given)} names but the ClassLabel "
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
                             f"data.zero_shot.class_names {names}.")
        labels = np.asarray([index[v] for v in values], np.int64)
    elif isinstance(feature, datasets.Value) and "int" in feature.dtype:
        if not given:
            raise ValueError(
                f"The label column {z.label_column!r} of {where} holds plain integers "
                f"({feature}), with no class names: set data.zero_shot.class_names to the names "
                "of classes 0, 1, ..."
            )
        names, labels = given, np.asarray(values, np.int64)
    else:
        raise ValueError(
            f"The label column {z.label_column!r} of {where} holds {feature}; zero-shot needs a "
            "ClassLabel, integer (with data.zero_shot.class_names) or string label column."
        )
    bad = np.nonzero((labels < 0) | (labels >= len(names)))[0]
    if len(bad):
        raise ValueError(f"Row {int(bad[0])} of {where} has the label {int(labels[bad[0]])}, "
                         f"outside the {len(names)} classes.")
    return labels.astype(np.int32), names


def zero_shot_set(
    data_cfg: ml_collections.ConfigDict,
    *,
    image_size: int,
    text_max_len: int,
    seed: int = 0,
) -> ZeroShotSet | None:
    """The zero-shot classification set of ``data.zero_shot``, or None when it is disabled.

    Shapes: the held-out images (those of the i2t eval set, ``seed + 1_000_003``) labelled by
    ``zero_shot.attribute``. Datasets: ``zero_shot.split`` of ``zero_shot.name``.
    """
    d, z = data_cfg, data_cfg.zero_shot
    name = z.name or (SHAPES if d.name == SHAPES else DISABLED)
    if name == DISABLED:
        return None
    _check_tokenizer(d, text_max_len)
    _check_crop(d, image_size)
    image = dataclasses.replace(_image_preprocess(d, image_size), augment="none", hflip=False)
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
        ds, base_dir = load_split(name, z.split)
        if ds is None:
            raise ValueError(f"The zero-shot dataset {name!r} has no split {z.split!r}; set "
                             "data.zero_shot.split to one of its splits.")
        where = f"{name!r} (split {z.split!r})"
        if z.label_column not in ds.column_names:
            raise ValueError(
                f"A zero-shot set needs labels, but {where} has no label column "
                f"{z.label_column!r}; its columns are {ds.column_names}. Set "
                "data.zero_shot.label_column, or data.zero_shot.name = 'none' to disable it."
            )
        if z.image_column not in ds.column_names:
            raise ValueError(
                f"{where} has no image column {z.image_column!r}; its columns are "
                f"{ds.column_names}. Set data.zero_shot.image_column."
            )
        if z.max_examples and z.max_examples < len(ds):
            ds = ds.select(range(z.max_examples))
        labels, names = _dataset_labels(ds, z, where)
        images, column = _ColumnCells(ds, z.image_column), z.image_column
    tokenizer = TextTokenizer(d.tokenizer)
    templates = tuple(z.templates)
    try:
        prompts = np.stack([
            np.stack([tokenizer.encode(t.format(c.replace("_", " ")), text_max_len)
                      for t in templates]) for c in names])
    except ValueError as e:
        raise ValueError(f"Cannot tokenise the zero-shot prompts with {tokenizer!r}: {e}") from e
    rows = _ZeroShotRows(images, labels, image, where, column, base_dir)
    return ZeroShotSet(rows=rows, labels=labels, class_names=names, templates=templates,
                       prompts=prompts)

