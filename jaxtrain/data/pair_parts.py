"""Which reader gives the training or eval part of ``data.name`` for contrastive pairs:

- a directory with ``prepared.json``: prepared ArrayRecord shards
  (:mod:`jaxtrain.data.prepared_pairs`);
- webdataset tar shards (a directory of ``.tar`` files, a ``.tar`` path, glob or brace
  pattern: :mod:`jaxtrain.data.webdataset`);
- anything else: the built-in data, a local file or directory, or a hub dataset
  (:mod:`jaxtrain.data.pair_sources`).
"""

from __future__ import annotations

import ml_collections

from jaxtrain.data import pair_sources, prepared_pairs, webdataset
from jaxtrain.data.pair_sources import Part


def load_part(d: ml_collections.ConfigDict, which: str, *, mode: str, num_negatives: int,
              image_size: int, seed: int) -> Part:
    """The ``which`` ("train" | "eval") part of ``data.name``, from the reader that serves it
    (module docstring); each checks its rows and the run's settings."""
    if prepared_pairs.is_prepared(d.name):
        return prepared_pairs.load_part(d, which, mode=mode, num_negatives=num_negatives,
                                        image_size=image_size)
    tars = webdataset.shard_paths(d.name)
    if tars is not None:
        return webdataset.load_part(d, which, tars, mode=mode, num_negatives=num_negatives)
    return pair_sources.load_part(d, which, mode=mode, num_negatives=num_negatives,
                                  image_size=image_size, seed=seed)
