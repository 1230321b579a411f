"""The ``data`` block of contrastive (dual-encoder) training: defaults, rules and the modes.

Retrieval modes
---------------
:data:`PAIR_MODES` maps ``contrastive.mode`` to the (query, positive) modalities: ``i2t`` (image,
text), ``t2i`` (text, image), ``t2t`` (text, text) and ``i2i`` (image, image). Hard negatives
(``num_negatives > 0``) have the positive's modality.

The keys (:func:`default_data_config`) say where the pairs come from (``name``, ``split``,
``eval_split``, ``eval_fraction``, the ``*_column`` keys: :mod:`jaxtrain.data.pair_sources`),
how texts are tokenised (``tokenizer``) and how images are preprocessed and augmented
(``image_*``, ``augment``, ``rrc_*``, ``hflip``: :mod:`jaxtrain.data.images`), how rows are
prepared (``workers``, ``prefetch``: :mod:`jaxtrain.data.pair_rows`), and what a bad row does
(``on_bad_row``: :mod:`jaxtrain.data.sanity`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxtrain.config import Rule
from jaxtrain.data.images import (
    AUGMENTS,
    CLIP_MEAN,
    CLIP_STD,
    INTERPOLATIONS,
    RESIZE_MODES,
    ImagePreprocess,
)
from jaxtrain.data.sanity import on_bad_row_rule
from jaxtrain.data.shapes import NUM_COMBOS, CaptionTokenizer
from jaxtrain.errors import ConfigError

# Retrieval modes: (query, positive) modalities.
PAIR_MODES: dict[str, tuple[str, str]] = {
    "i2t": ("image", "text"),
    "t2i": ("text", "image"),
    "t2t": ("text", "text"),
    "i2i": ("image", "image"),
}
MODES: tuple[str, ...] = tuple(PAIR_MODES)  # ("i2t", "t2i", "t2t", "i2i")
ROLES: tuple[str, ...] = ("query", "positive", "negatives")
SHAPES = "shapes"  # the built-in data (jaxtrain.data.shapes)
SHAPES_EVAL_SEED_OFFSET = 1_000_003  # the shapes held-out set is drawn from seed + this


def default_data_config() -> ml_collections.ConfigDict:
    """The ``data`` block of a contrastive task, with its defaults (see the module docstring)."""
    d = ml_collections.ConfigDict()
    # 'shapes' (built-in, generated) | hub dataset name | local dataset directory
    # (save_to_disk, or a folder load_dataset reads, e.g. imagefolder + metadata.jsonl) |
    # local .jsonl/.json/.csv/.parquet/.arrow file (image paths relative to the file).
    d.name = SHAPES
    d.split = "train"  # the training split
    d.eval_split = "validation"  # the eval split, if the dataset has it ('' = never look)
    d.subset = ""  # the dataset config name (hub / local README configs / sub-folder)
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
    # '' = the built-in shapes caption tokenizer (shapes only); else 'gpt2' (built in), a hub
    # name or a save_pretrained directory (jaxtrain.data.tokenizers.load_tokenizer).
    d.tokenizer = ""
    d.image_resize = 0  # eval/no augmentation: shorter side resized to this; 0 = image_crop
    d.image_crop = 0  # output side; 0 = the model's image size (must equal it)
    # eval/no augmentation: 'shorter_crop' (resize the shorter side, centre crop: CLIP) |
    # 'squash' (resize straight to image_crop x image_crop: SigLIP; image_resize unused)
    d.image_resize_mode = "shorter_crop"
    d.image_mean = CLIP_MEAN  # per-channel mean of x / 255, subtracted
    d.image_std = CLIP_STD  # per-channel std, divided by
    d.image_interpolation = "bicubic"  # PIL filter: nearest|bilinear|bicubic|lanczos|box|hamming
    d.augment = "none"  # training: 'none' | 'random_resized_crop'
    d.rrc_scale = (0.9, 1.0)  # random_resized_crop: area fraction range (OpenCLIP's default)
    d.rrc_ratio = (3 / 4, 4 / 3)  # random_resized_crop: aspect ratio (w / h) range
    d.hflip = False  # training: random horizontal flips (off: captions may say left/right)
    d.workers = 0  # 0 = preprocess in this process; > 0 = grain worker processes
    d.prefetch = 2  # batches prepared ahead (threads, or per worker); 0 = synchronous
    # a bad row (unparseable line, missing cell or image file, undecodable image): 'error' stops
    # with a message naming the file and row; 'skip' drops it (counted, logged)
    d.on_bad_row = "error"
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
        ("image_resize_mode", lambda v: v in RESIZE_MODES, f"must be one of {RESIZE_MODES}"),
        ("image_interpolation", lambda v: v in INTERPOLATIONS,
         f"must be one of {tuple(INTERPOLATIONS)}"),
        ("augment", lambda v: v in AUGMENTS, f"must be one of {AUGMENTS}"),
        ("rrc_scale", lambda v: _pair_of(0, 1)(v) and v[0] > 0,
         "must be (lo, hi) with 0 < lo <= hi <= 1"),
        ("rrc_ratio", lambda v: _pair_of(0, float("inf"))(v) and v[0] > 0,
         "must be (lo, hi) with 0 < lo <= hi"),
        ("workers", lambda v: v >= 0, "must be >= 0 (0 = in this process)"),
        ("prefetch", lambda v: v >= 0, "must be >= 0 (0 = synchronous)"),
    ]
    for key in ("image_column", "text_column", "query_column", "positive_column",
                "negatives_column"):
        rules.append((key, lambda v: bool(v), "must name a column"))
    rules.append(on_bad_row_rule(""))
    return [(prefix + key, ok, rule) for key, ok, rule in rules]


# ----------------------------------------------------------------------------------------------
# Checks that need the model's sizes (run when the data is built)


def check_pairs(d: ml_collections.ConfigDict, mode: str, num_negatives: int, image_size: int,
                text_max_len: int) -> None:
    """ConfigError unless ``data`` can give ``mode`` pairs for a model of these sizes."""
    if mode not in MODES:
        raise ConfigError(f"Unknown retrieval mode {mode!r}; expected one of {MODES}.")
    if num_negatives < 0:
        raise ConfigError(f"num_negatives must be >= 0; got {num_negatives}.")
    check_crop(d, image_size)
    if d.name == SHAPES and d.hflip:
        raise ConfigError(
            "data.hflip is on with the shapes data, whose captions and positions name left and "
            "right: a flipped image no longer matches. Set data.hflip = False."
        )
    if "text" in PAIR_MODES[mode]:
        check_tokenizer(d, text_max_len)


def check_crop(d: ml_collections.ConfigDict, image_size: int) -> None:
    """ConfigError unless ``data.image_crop`` is 0 or the model's image size."""
    if d.image_crop and d.image_crop != image_size:
        raise ConfigError(
            f"data.image_crop ({d.image_crop}) differs from the model's image size "
            f"({image_size}); set data.image_crop = 0 (= the model's size) or the model's size."
        )


def check_tokenizer(d: ml_collections.ConfigDict, text_max_len: int | None) -> None:
    """ConfigError unless ``data.tokenizer`` suits ``data.name`` (and ``text_max_len``, if
    given, fits the built-in captions)."""
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


def image_preprocess(d: ml_collections.ConfigDict, image_size: int) -> ImagePreprocess:
    """The image preprocessing (and training augmentation) ``data`` describes: uint8 crops,
    normalised on device by the task (:func:`jaxtrain.tasks.clip.normalize_images`)."""
    return ImagePreprocess(
        output="uint8",
        crop=d.image_crop or image_size,
        resize=d.image_resize,
        interpolation=d.image_interpolation,
        mean=tuple(d.image_mean),
        std=tuple(d.image_std),
        augment=d.augment,
        rrc_scale=tuple(d.rrc_scale),
        rrc_ratio=tuple(d.rrc_ratio),
        hflip=d.hflip,
        resize_mode=d.image_resize_mode,
    )


def column_keys(mode: str, num_negatives: int) -> dict[str, str]:
    """role -> the ``data`` key naming its column, for ``mode`` (and negatives)."""
    if mode in ("i2t", "t2i"):
        image, text = "image_column", "text_column"
        keys = {"query": image, "positive": text} if mode == "i2t" else {
            "query": text, "positive": image}
    else:
        keys = {"query": "query_column", "positive": "positive_column"}
    if num_negatives:
        keys["negatives"] = "negatives_column"
    return keys


def role_modalities(mode: str) -> dict[str, str]:
    """role -> 'image' | 'text' for ``mode`` (negatives have the positive's modality)."""
    query, positive = PAIR_MODES[mode]
    return {"query": query, "positive": positive, "negatives": positive}
