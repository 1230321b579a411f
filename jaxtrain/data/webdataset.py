"""Image–text pairs from webdataset tar shards, as img2dataset writes them (the format OpenCLIP
users have): ``00000.tar`` holding ``KEY.jpg`` + ``KEY.txt`` (or ``KEY.json`` with a
``"caption"``) per sample.

``data.name`` names the shards (:func:`shard_paths`): a directory (its ``*.tar`` files, sorted),
one ``.tar`` file, a glob (``/data/cc3m/*.tar``) or a brace pattern
(``/data/cc3m/{00000..00331}.tar``, ``{a,b}`` lists too: the webdataset / img2dataset notation).

Random access, read with the standard library's ``tarfile``: each shard's member headers are
read once (:func:`index_shard`: one 512-byte header per member, the data is skipped), giving
each sample's image and caption as (shard, byte offset, length). A row then costs two
``pread`` calls; grain shuffles, shards over hosts and resumes exactly from its own state,
as with every other source. A sample's key is its member path up to the first dot of the file
name (webdataset's rule); its image is the first of the ``.jpg``/``.jpeg``/``.png``/``.webp``/
``.bmp`` members, its text the ``.txt`` member, else the ``"caption"`` (or ``"text"``) of the
``.json`` member. Every other member (img2dataset's ``.json`` metadata when a ``.txt`` exists,
``.parquet`` files beside the shards) is ignored. The index is held in memory, about 60
bytes per sample in each process (10 M samples: ~0.6 GB, and a copy in each grain worker):
for larger sets prepare ArrayRecord shards from the tars (``python -m jaxtrain.data.prepare``),
whose index stays on disk.

The examples have the columns ``image`` and ``text`` whatever ``data.image_column`` /
``data.text_column`` say (modes ``i2t`` / ``t2i``, no negatives). The shards have no splits: the
eval part is the last ``data.eval_fraction`` of the samples (in shard order), as for a local
file without an eval split (all of them when ``data.eval_split == data.split``: how an
``evals.<name>.source`` is read whole). Bad samples (no image or no text member) are found
when the index is built, images of a decoded sample
(:func:`jaxtrain.data.pair_checks.sample_rows`) before training: each is an error naming the
shard and key, or dropped with ``data.on_bad_row='skip'``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.data.images import decode_image
from jaxtrain.data.pair_checks import sample_rows
from jaxtrain.data.pair_sources import Part
from jaxtrain.data.sanity import MIN_EVAL_PAIRS, BadRows, check_eval_rows
from jaxtrain.errors import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_EXTS = ("txt", "json")
CAPTION_KEYS = ("caption", "text")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Every string a brace pattern names: ``{000..003}`` is a zero-padded integer range
    (inclusive), ``{a,b}`` a list; several braces multiply."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [s for item in items for s in expand_braces(head + item + tail)]


def shard_paths(name: str) -> list[str] | None:
    """The tar shards ``name`` names (module docstring), or None when it names no webdataset
    (then it is another kind of source). A pattern whose files are missing is an error."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "prepared.json")):
            return None
        tars = sorted(f for f in os.listdir(path) if f.endswith(".tar"))
        return [os.path.join(path, f) for f in tars] or None
    if not path.endswith(".tar"):
        return None
    paths: list[str] = []
    for expanded in expand_braces(path):
        if glob.has_magic(expanded):
            paths.extend(sorted(glob.glob(expanded)))
        else:
            paths.append(expanded)
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        what = f"{len(missing)} of its {len(paths)} files do not exist, e.g. {missing[0]!r}" \
            if missing else "no file matches it"
        raise ConfigError(f"data.name {name!r} names webdataset tar shards, but {what}. Check "
                          "the directory / glob / {000..009} brace pattern.")
    return paths


def _split_name(member: str) -> tuple[str, str]:
    """(key, extension) of a member path: the extension is the file name after its first dot."""
    folder, base = os.path.split(member)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {extension: (data offset, size)})] of a tar shard, in member order (headers only)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = _split_name(member.name)
                    samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise ConfigError(f"The webdataset shard {path!r} is not a readable (uncompressed) tar "
                          f"file ({type(e).__name__}: {e}). Re-write or remove it.") from e
    return list(samples.items())


def caption_of(data: bytes, ext: str) -> str:
    """The text of a ``.txt`` member, or the ``"caption"`` (``"text"``) of a ``.json`` one."""
    text = data.decode("utf-8")
    if ext == "txt":
        return text
    value = json.loads(text)
    for key in CAPTION_KEYS:
        if isinstance(value, dict) and isinstance(value.get(key), str):
            return value[key]
    raise ValueError(f"its .json member has no string {' or '.join(CAPTION_KEYS)!r} field")


class TarSamples(Sequence):
    """Random-access samples ``{"image": bytes, "text": str, "key": str}`` of indexed shards.
    ``table``: int64 ``[n, 6]`` rows of (shard, image offset, image size, text offset, text
    size, text is json); file descriptors are opened per process (dropped when pickled)."""

    def __init__(self, paths: Sequence[str], table: np.ndarray, keys: Sequence[str]) -> None:
        self.paths, self.table = list(paths), np.asarray(table, np.int64)
        self.keys = np.asarray(keys, np.bytes_)  # compact: bytes, not python strings
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}

    def __len__(self) -> int:
        return len(self.table)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        i = int(index)
        if not 0 <= i < len(self.table):
            raise IndexError(f"row {index} out of range for {len(self.table)} rows")
        shard, img_off, img_size, txt_off, txt_size, is_json = (int(v) for v in self.table[i])
        text = caption_of(self._read(shard, txt_off, txt_size), "json" if is_json else "txt")
        return {"image": self._read(shard, img_off, img_size), "text": text,
                "key": self.keys[i].decode()}

    def subset(self, indices: Sequence[int] | np.ndarray) -> TarSamples:
        idx = np.asarray(indices, np.int64)
        return TarSamples(self.paths, self.table[idx], self.keys[idx])

    def where(self, i: int) -> str:
        shard = os.path.basename(self.paths[self.table[i, 0]])
        return f"sample {self.keys[i].decode()!r} of {shard}"

    def fingerprint(self) -> str:
        """sha256 of the shards' paths, sizes and modification times and the samples kept."""
        h = hashlib.sha256()
        for p in self.paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(self.table.tobytes())
        return h.hexdigest()


def index_samples(paths: Sequence[str], bad: BadRows, where: str) -> TarSamples:
    """Every sample of the shards with an image and a text (the others reported to ``bad``)."""
    table, keys = [], []
    for s, path in enumerate(paths):
        for key, members in index_shard(path):
            image = next((e for e in IMAGE_EXTS if e in members), None)
            text = next((e for e in TEXT_EXTS if e in members), None)
            if image is None or text is None:
                missing = "an image (.jpg/.png/...)" if image is None else "a .txt or .json"
                bad.add(f"Sample {key!r} of {os.path.basename(path)}",
                        f"has no {missing} member (it has {sorted(members)})")
                continue
            if text == "json":
                off, size = members["json"]
                with open(path, "rb") as f:
                    f.seek(off)
                    try:
                        caption_of(f.read(size), "json")
                    except (ValueError, UnicodeDecodeError) as e:
                        bad.add(f"Sample {key!r} of {os.path.basename(path)}", str(e))
                        continue
            table.append((s, *members[image], *members[text], int(text == "json")))
            keys.append(key.encode())
    if not table:
        raise ConfigError(f"{where} has no usable samples (every sample lacks an image or a "
                          "caption member). Check the shards.")
    return TarSamples(paths, np.asarray(table, np.int64).reshape(-1, 6), keys)


def check_images(samples: TarSamples, bad: BadRows) -> TarSamples:
    """``samples`` without those of a decoded sample whose image does not decode."""
    broken = set()
    for i in sample_rows(len(samples), set()):
        try:
            decode_image(samples[i]["image"])
        except (ValueError, OSError) as e:
            bad.add(samples.where(i).capitalize(), f"its image cannot be decoded: {e}")
            broken.add(i)
    if not broken:
        return samples
    return samples.subset([i for i in range(len(samples)) if i not in broken])


@functools.lru_cache(maxsize=4)
def _indexed(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...], policy: str,
             where: str) -> TarSamples:
    """The checked samples of the shards, indexed once per process (the train iterator and
    every eval read the same index); ``stamps`` (sizes, times) re-index changed shards."""
    del stamps  # part of the cache key only
    bad = BadRows(policy, where)
    samples = check_images(index_samples(paths, bad, where), bad)
    bad.report(len(samples))
    return samples


def load_part(d: ml_collections.ConfigDict, which: str, paths: Sequence[str], *, mode: str,
              num_negatives: int) -> Part:
    """The training or eval part of the webdataset shards ``paths`` (module docstring)."""
    if mode not in ("i2t", "t2i") or num_negatives:
        raise ConfigError(
            f"Webdataset shards ({d.name!r}) hold image-caption pairs: they serve contrastive "
            f"mode 'i2t' or 't2i' without negatives, not mode {mode!r} with {num_negatives} "
            "negatives.")
    where = f"the webdataset {d.name!r} ({len(paths)} shards)"
    stamps = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    samples = _indexed(tuple(paths), stamps, d.get("on_bad_row", "error"), where)
    n = len(samples)
    if which == "eval" and d.eval_split and d.eval_split == d.split:  # read whole (an
        part = Part(samples, _columns(mode), np.arange(n), None, where)  # evals source)
        check_eval_rows(where, n, MIN_EVAL_PAIRS, "pair", "Use more samples")
        return part
    if which == "eval" and d.eval_fraction <= 0:
        raise ValueError(f"{where} has no eval split and data.eval_fraction is 0: set "
                         "data.eval_fraction > 0 to hold out its last samples, or point "
                         "evals.<name>.source at other data.")
    cut = n - max(1, int(round(n * d.eval_fraction))) if d.eval_fraction > 0 else n
    if cut < 1:
        raise ConfigError(f"{where} has {n} samples: too few to hold out an eval part "
                          f"(data.eval_fraction={d.eval_fraction}).")
    if which == "train":
        rows, cap, part_where = np.arange(cut), d.max_train_examples, where
    else:
        rows, cap = np.arange(cut, n), d.max_eval_examples
        part_where = f"{where}, held-out samples {cut}-{n - 1}"
    if cap and cap < len(rows):
        rows = rows[:cap]
    part = Part(samples.subset(rows), _columns(mode), rows, None, part_where)
    if which == "eval":
        check_eval_rows(part.where, len(part.examples), MIN_EVAL_PAIRS, "pair",
                        "For a meaningful eval: raise data.eval_fraction")
    return part


def _columns(mode: str) -> dict[str, str]:
    return ({"query": "image", "positive": "text"} if mode == "i2t"
            else {"query": "text", "positive": "image"})
