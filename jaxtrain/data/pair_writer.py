"""Writing prepared image–text pairs (:mod:`jaxtrain.data.prepared_pairs` describes what is
stored and how it is read): :func:`prepare_pairs` reads the training and eval parts of
``data.name`` through the ordinary readers (any dataset, file or webdataset, with its checks and
hold-out rule), converts each row's images (the uint8 crop, or the shorter side resized for
random-resized-crop training; raw pixels or a JPEG) and writes them with the texts into
ArrayRecord shards, then ``prepared.json`` last (a killed run leaves no manifest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jaxtrain.data.images import ImagePreprocess, decode_image, resize_shorter
from jaxtrain.data.pair_config import SHAPES, check_pairs, image_preprocess, role_modalities
from jaxtrain.data.pair_parts import load_part
from jaxtrain.data.pair_sources import PairRows, Part, on_bad_row
from jaxtrain.data.prepared_pairs import (
    FORMAT,
    IMAGE_FORMATS,
    MANIFEST,
    PARTS,
    fingerprint,
    image_settings,
    is_prepared,
    read_manifest,
)
from jaxtrain.data.sanity import BadRows
from jaxtrain.data.shards import ShardWriter, encode_record
from jaxtrain.errors import ConfigError


def _source_fingerprint(d: ml_collections.ConfigDict, part: Part) -> str:
    examples = part.examples
    own = getattr(examples, "_fingerprint", None)
    if own is None and hasattr(examples, "fingerprint"):
        own = examples.fingerprint()
    h = hashlib.sha256(json.dumps({"name": d.name, "split": d.split, "where": part.where,
                                   "rows": len(examples), "own": own}).encode())
    return h.hexdigest()



def _uint8_crop(pre: ImagePreprocess, value: Any, base_dir: str | None) -> np.ndarray:
    """The uint8 crop the raw-file pipeline makes of ``value`` (no augmentation): the same
    code (reduced-size JPEG decode included), so the stored pixels are bit-identical."""
    return np.asarray(dataclasses.replace(pre, output="uint8")(value, None, base_dir=base_dir))


def _stored(value: Any, crop: bool, pre: ImagePreprocess, settings: dict[str, Any],
            base_dir: str | None, jpeg_quality: int) -> np.ndarray | bytes:
    if crop:
        image = np.ascontiguousarray(_uint8_crop(pre, value, base_dir), np.uint8)
    else:
        image = np.asarray(resize_shorter(decode_image(value, base_dir=base_dir),
                                          settings["short_side"], pre.interpolation), np.uint8)
    if settings["image_format"] == "raw":
        return image
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class RowConverter:
    """Rows of a part -> encoded records (picklable: worker processes run it too)."""

    rows: PairRows
    columns: dict[str, str]  # role -> column
    kinds: dict[str, str]  # role -> 'image' | 'text'
    pre: ImagePreprocess
    settings: dict[str, Any]
    crop: bool  # store the final crop (else the shorter side resized)
    base_dir: str | None
    jpeg_quality: int

    def _value(self, value: Any, kind: str) -> Any:
        if kind != "image":
            return value
        return _stored(value, self.crop, self.pre, self.settings, self.base_dir,
                       self.jpeg_quality)

    def __call__(self, indices: range) -> list[tuple[int, bytes | None, str]]:
        """[(source row, record or None, why it is bad)] of the rows at ``indices``."""
        out = []
        for i in indices:
            raw = self.rows[i]
            try:
                record = {}
                for role, col in self.columns.items():
                    value, kind = raw[role], self.kinds[role]
                    record[col] = ([self._value(v, kind) for v in value]
                                   if role == "negatives" else self._value(value, kind))
            except ValueError as e:
                out.append((raw["__row__"], None, str(e)))
                continue
            out.append((raw["__row__"], encode_record(record), ""))
        return out


_WORKER_CONVERTER: RowConverter | None = None


def _set_converter(converter: RowConverter) -> None:
    global _WORKER_CONVERTER
    _WORKER_CONVERTER = converter


def _convert_in_worker(indices: range) -> list[tuple[int, bytes | None, str]]:
    assert _WORKER_CONVERTER is not None
    return _WORKER_CONVERTER(indices)


def _converted(converter: RowConverter, n: int, workers: int, chunk: int = 64
               ) -> Iterator[list[tuple[int, bytes | None, str]]]:
    """The converted rows 0..n-1 in order, chunk by chunk; ``workers > 0``: in that many
    spawned processes (each gets the converter once)."""
    chunks = [range(k, min(n, k + chunk)) for k in range(0, n, chunk)]
    if workers <= 0:
        yield from map(converter, chunks)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_converter,
                             initargs=(converter,)) as pool:
        yield from pool.map(_convert_in_worker, chunks)


def _write_part(part: Part, which: str, out: str, kinds: dict[str, str], pre: ImagePreprocess,
                settings: dict[str, Any], rows_per_shard: int, jpeg_quality: int,
                policy: str, workers: int) -> dict[str, Any]:
    rows = PairRows(part.examples, part.columns, rows=part.rows)
    converter = RowConverter(rows, dict(part.columns), kinds, pre, settings,
                             crop=which == "eval" or settings["train_images"] == "crop",
                             base_dir=part.base_dir, jpeg_quality=jpeg_quality)
    writer = ShardWriter(out, which, rows_per_shard)
    bad = BadRows(policy, part.where)
    kept: list[int] = []
    done = 0
    for results in _converted(converter, len(rows), workers):
        for row, record, problem in results:
            if record is None:
                bad.add(f"Row {row}", f"cannot be prepared: {problem}")  # raises with 'error'
                continue
            writer.write_encoded(record)
            kept.append(row)
        done += len(results)
        if done // 10_000 != (done - len(results)) // 10_000:
            logging.info("prepare %s: %d / %d rows", which, done, len(rows))
    if len(bad):
        bad.report(len(kept))
    shards = writer.close()
    np.save(os.path.join(out, f"{which}-rows.npy"), np.asarray(kept, np.int64),
            allow_pickle=False)
    return {"rows": len(kept), "shards": shards, "where": part.where}


def prepare_pairs(d: ml_collections.ConfigDict, out: str, *, mode: str, num_negatives: int,
                  image_size: int, text_max_len: int = 1 << 30, seed: int = 0,
                  image_format: str = "raw", short_side: int = 0, rows_per_shard: int = 4096,
                  jpeg_quality: int = 95, overwrite: bool = False, workers: int = 0
                  ) -> dict[str, Any]:
    """Write the training part (and the eval part, if the data has one) of ``d`` as shards in
    ``out``; returns the manifest. Preparing the same data with the same settings into the same
    ``out`` again does nothing; other data or settings there is an error unless ``overwrite``.
    ``workers > 0`` decodes and resizes in that many spawned processes (the shards are the
    same; a script calling this needs the ``if __name__ == "__main__":`` guard)."""
    if d.name == SHAPES:
        raise ConfigError("data.name is 'shapes', the built-in data, generated on the fly: "
                          "there is nothing to prepare. Prepare a dataset, file or webdataset.")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format must be one of {IMAGE_FORMATS}; got {image_format!r}.")
    check_pairs(d, mode, num_negatives, image_size, text_max_len)
    kinds = role_modalities(mode)
    settings = {**image_settings(d, image_size, short_side=short_side,
                                 image_format=image_format),
                "mode": mode, "num_negatives": num_negatives}
    parts: dict[str, Part] = {}
    for which in PARTS:
        try:
            parts[which] = load_part(d, which, mode=mode, num_negatives=num_negatives,
                                     image_size=image_size, seed=seed)
        except ValueError as e:
            if which == "train":
                raise
            logging.warning("prepare: no eval part (%s); only the training part is written", e)
    sources = {which: _source_fingerprint(d, part) for which, part in parts.items()}
    print_ = fingerprint(sources, settings)
    if is_prepared(out):
        old = read_manifest(out)
        if old["fingerprint"] == print_:
            logging.info("prepare: %s already holds this data (fingerprint %s)", out, print_[:12])
            return old
        if not overwrite:
            raise ConfigError(
                f"{out!r} already holds prepared data with another fingerprint "
                f"({old['fingerprint'][:12]}, from {old['source']!r} with {old['settings']}) "
                f"than this config's ({print_[:12]}, {d.name!r} with {settings}). Choose "
                "another --out, or pass --overwrite.")
        os.remove(os.path.join(out, MANIFEST))  # a half-written overwrite has no manifest
        for part in old["parts"].values():
            for name in part["shards"]:
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    pre = image_preprocess(d, image_size)
    columns = {col: kinds[role] for role, col in parts["train"].columns.items()}
    meta: dict[str, Any] = {
        "format": FORMAT, "source": d.name, "fingerprint": print_, "sources": sources,
        "settings": settings, "columns": columns,
        "split": {"split": d.split, "eval_split": d.eval_split,
                  "eval_fraction": d.eval_fraction, "max_train_examples": d.max_train_examples,
                  "max_eval_examples": d.max_eval_examples},
        "parts": {},
    }
    for which, part in parts.items():
        meta["parts"][which] = _write_part(part, which, out, kinds, pre, settings,
                                           rows_per_shard, jpeg_quality, on_bad_row(d), workers)
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))  # last: a killed prepare leaves no manifest
    return meta
