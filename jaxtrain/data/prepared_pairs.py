"""Prepared image–text pairs: a contrastive dataset written once as resized uint8 images in
ArrayRecord shards (:mod:`jaxtrain.data.shards`), so that training only reads (and augments).

Written by ``python -m jaxtrain.data.prepare --config=... --out=DIR``
(:func:`jaxtrain.data.pair_writer.prepare_pairs`); read when ``data.name`` is a directory
holding ``prepared.json`` (:func:`load_part`).

What a record holds (one row of the part, by the source's column names): each image column's
image as uint8 ``[H, W, 3]`` (``image_format="raw"``, default) or re-encoded as a JPEG
(``"jpeg"``, ~10x smaller, decoded again when read, lossy); each text column's text as it is
(not tokens: any tokenizer and ``text_max_len`` can train on the shards, and a caption
tokenises in tens of microseconds); negatives as lists of these. Images are stored as:

- the eval part, and the training part when ``data.augment='none'``: the exact uint8 crop the
  raw-file pipeline makes (``data.image_resize`` / ``image_crop`` / ``image_interpolation``, the
  same decode and resize code), so a run on the shards sees bit-identical uint8 images and so
  identical normalised values;
- the training part with ``data.augment='random_resized_crop'``: the image with its shorter
  side resized to ``short_side`` (default ``round(crop * 256 / 224)``, 256 for 224; aspect kept,
  as img2dataset's ``keep_ratio``). The random crop is drawn at training time on that image,
  which is the usual practice (not the same crops as on the full-size originals).

``prepared.json`` records the source, the per-part rows, shards and settings (crop, resize,
interpolation, how the training images are stored, image format, columns and their kinds), and
a ``fingerprint``: sha256 of the source's fingerprint (``datasets``' fingerprint of the rows,
the shards' sizes and times for webdatasets) and those settings. A run on the shards checks
that its settings match (crop, resize, interpolation, augmentation kind, columns): a mismatch
is an error naming both values. ``data.image_mean`` / ``image_std`` are free: the shards hold
pixels before normalisation (it happens on the device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.data.images import ImagePreprocess
from jaxtrain.data.pair_config import column_keys, role_modalities
from jaxtrain.data.pair_sources import Part
from jaxtrain.data.sanity import MIN_EVAL_PAIRS, check_eval_rows
from jaxtrain.data.shards import ShardRows
from jaxtrain.errors import ConfigError

MANIFEST = "prepared.json"
FORMAT = "jaxtrain.prepared_pairs/1"
IMAGE_FORMATS = ("raw", "jpeg")
PARTS = ("train", "eval")


def is_prepared(name: str) -> bool:
    """Whether ``name`` is a directory of prepared shards."""
    return os.path.isfile(os.path.join(os.path.expanduser(name), MANIFEST))


def read_manifest(directory: str) -> dict[str, Any]:
    """The ``prepared.json`` of ``directory``, checked to be one this module wrote."""
    path = os.path.join(os.path.expanduser(directory), MANIFEST)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read {path!r} ({type(e).__name__}: {e}); prepare the data "
                          "again (python -m jaxtrain.data.prepare).") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path!r} is not a prepared pairs manifest of this jaxtrain (format "
                          f"{meta.get('format')!r}, expected {FORMAT!r}); prepare it again.")
    return meta


# ----------------------------------------------------------------------------------------------
# Settings


def default_short_side(crop: int) -> int:
    """The stored shorter side for random-resized-crop training: 256 for a 224 crop."""
    return max(crop, int(round(crop * 256 / 224)))


def image_settings(d: ml_collections.ConfigDict, image_size: int, *, short_side: int = 0,
                   image_format: str = "raw") -> dict[str, Any]:
    """The settings that decide the stored images (what a run must match)."""
    crop = d.image_crop or image_size
    rrc = d.augment == "random_resized_crop"
    return {"crop": crop, "resize": d.image_resize or crop,
            "interpolation": d.image_interpolation,
            "resize_mode": d.get("image_resize_mode", "shorter_crop"),
            "train_images": "short_side" if rrc else "crop",
            "short_side": (short_side or default_short_side(crop)) if rrc else 0,
            "image_format": image_format}


def fingerprint(sources: dict[str, str], settings: dict[str, Any]) -> str:
    """sha256 of the parts' source fingerprints and the settings."""
    return hashlib.sha256(json.dumps({"sources": sources, "settings": settings},
                                     sort_keys=True).encode()).hexdigest()


def check_settings(meta: dict[str, Any], d: ml_collections.ConfigDict, which: str,
                   image_size: int, kinds: dict[str, str], columns: dict[str, str],
                   where: str) -> None:
    """ConfigError unless a run with ``d`` reads the ``which`` part as it was prepared."""
    stored = meta["settings"]
    has_images = "image" in kinds.values()
    if has_images:
        run = image_settings(d, image_size, short_side=stored["short_side"],
                             image_format=stored["image_format"])
        keys = ["crop"]
        if which == "eval" or stored["train_images"] == "crop":
            keys += ["resize", "interpolation", "resize_mode"]
        if which == "train":
            keys.append("train_images")
        fix = ("Train with the settings it was prepared with, or prepare again with the run's "
               "config (python -m jaxtrain.data.prepare --config=... --out=DIR).")
        stored_as = {"crop": "final crops (for data.augment='none')",
                     "short_side": "shorter sides resized (for data.augment="
                                   "'random_resized_crop')"}
        for key in keys:
            if run[key] != stored[key]:
                what = {"train_images": "training images",
                        "crop": "image crop (data.image_crop or the model's image size)"}.get(
                            key, f"data.image_{key}")
                mine, theirs = ((stored_as[stored[key]], stored_as[run[key]])
                                if key == "train_images" else (repr(stored[key]),
                                                                repr(run[key])))
                raise ConfigError(
                    f"{where}: the prepared {what} {'are' if key == 'train_images' else 'is'} "
                    f"{mine}, but this run's {theirs}. {fix}")
    for role, col in columns.items():
        kind = meta["columns"].get(col)
        if kind != kinds[role]:
            have = ", ".join(f"{c!r} ({k})" for c, k in meta["columns"].items())
            raise ConfigError(
                f"{where}: this run's {role} reads the {kinds[role]} column {col!r}, but the "
                f"prepared shards hold {have}. Set the data.*_column keys to those columns, or "
                "prepare the data for this mode.")


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class StoredCrop(ImagePreprocess):
    """The run's preprocessing for images stored as their final crop: a uint8 ``[crop, crop,
    3]`` array is taken as it is (no PIL round trip), flipped if ``hflip`` draws it, exactly as
    the raw-file pipeline flips its crop (same rng draw); anything else (a re-encoded JPEG) is
    decoded and passed through the identity geometry (``resize = crop``)."""

    def __call__(self, value: Any, rng: np.random.Generator | None = None, *,
                 base_dir: str | None = None) -> np.ndarray:
        if not (isinstance(value, np.ndarray) and value.dtype == np.uint8
                and value.shape == (self.crop, self.crop, 3)):
            return super().__call__(value, rng, base_dir=base_dir)
        out = value
        if rng is not None and self.hflip and rng.random() < 0.5:
            out = out[:, ::-1]
        out = np.ascontiguousarray(out)
        if getattr(self, "output", "float32") == "uint8":
            return out
        from jaxtrain.data.images import normalize

        return normalize(out, self.mean, self.std)


def stored_crop(image: ImagePreprocess) -> ImagePreprocess:
    """:class:`StoredCrop` with ``image``'s settings (resize = crop: identity geometry)."""
    fields = {f.name: getattr(image, f.name) for f in dataclasses.fields(image)}
    fields.update(resize=0)
    if "resize_mode" in fields:
        fields["resize_mode"] = "shorter_crop"
    return StoredCrop(**fields)


def load_part(d: ml_collections.ConfigDict, which: str, *, mode: str, num_negatives: int,
              image_size: int) -> Part:
    """The training or eval part of the prepared directory ``data.name``, its settings checked
    against the run's. ``max_train_examples`` / ``max_eval_examples`` keep its first rows."""
    meta = read_manifest(d.name)
    where = f"the prepared data {d.name!r} ({which} part of {meta['source']!r})"
    info = meta["parts"].get(which)
    if info is None:
        raise ConfigError(f"{where}: it was prepared without an eval part (its source had no "
                          "eval split and data.eval_fraction was 0). Prepare it again with an "
                          "eval split or fraction, or point evals.<name>.source at eval data.")
    kinds = role_modalities(mode)
    columns = {role: d[key] for role, key in column_keys(mode, num_negatives).items()}
    check_settings(meta, d, which, image_size, kinds, columns, where)
    paths = [os.path.join(d.name, s) for s in info["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"{where}: the shard {missing[0]!r} is missing ({len(missing)} of "
                          f"{len(paths)}). Prepare the data again.")
    examples = ShardRows(paths)
    if len(examples) != info["rows"]:
        raise ConfigError(f"{where}: the shards hold {len(examples)} rows, the manifest says "
                          f"{info['rows']}. Prepare the data again.")
    rows = np.load(os.path.join(d.name, f"{which}-rows.npy"), mmap_mode="r", allow_pickle=False)
    cap = d.max_train_examples if which == "train" else d.max_eval_examples
    if cap and cap < len(examples):
        examples, rows = examples.subset(np.arange(cap)), rows[:cap]
    crops = which == "eval" or meta["settings"]["train_images"] == "crop"
    part = Part(examples, columns, np.asarray(rows), None, where,
                adapt_image=stored_crop if crops else None)
    if which == "eval":
        check_eval_rows(where, len(examples), MIN_EVAL_PAIRS, "pair",
                        "For a meaningful eval: prepare a larger eval part (data.eval_split "
                        "or data.eval_fraction when preparing)")
    return part
