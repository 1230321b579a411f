"""Streaming text sources: tokenise and pack on the fly, per-host shards, resume by count.

``data.streaming=True`` reads a text source as training consumes it (a
``datasets.IterableDataset``: hub data is downloaded shard by shard, local files are read line
by line), for corpora too large to download or tokenise first.

Rows are the ``concat`` rows of :mod:`jaxtrain.data.text`, built from a moving window: each
document's tokens plus ``eos`` are appended to a buffer, and a row is cut whenever the buffer
holds ``seq_len + 1`` tokens: ``inputs = buf[:S]``, ``targets = buf[1:S+1]``,
``loss_mask[t] = doc(t) == doc(t+1)``, ``segment_ids`` the document rank within the row (1, 2,
...), ``positions`` the token's index in its document; then ``S`` tokens are dropped (the last
target is the next row's first input). One pass over documents ``d_0 .. d_n`` thus gives exactly
the rows ``text.pretrain_rows(docs, mode="concat")`` gives, in order (the tokens left at the end,
fewer than a row, are dropped); the stream then starts again (the next epoch).

Hosts: each reads its own part of the stream (``datasets.distributed.split_dataset_by_node``:
whole shards when the shard count divides by the host count, else every ``process_count``-th
example), so hosts see different documents; data order is not shuffled (shuffle the corpus, or
rely on its own order, as streamed pretraining corpora are).

Resume: the iterator's state counts consumed examples. ``{"epoch", "example", "offset",
"batches"}``: the next row starts at token ``offset`` of this host's example ``example`` (its
index in this host's stream) of epoch ``epoch``; a resumed iterator reads past ``example``
examples (without tokenising them), drops ``offset`` tokens, and continues with
exactly the rows an uninterrupted run would have read. The state is per host: resuming with
another number of hosts is an error.

Other rows: :class:`StreamingIterator` takes any row maker (:data:`RowMaker`); with
:func:`example_rows` each example gives at most one row (``offset`` stays 0), as the streamed chat
SFT and preference data of :mod:`jaxtrain.data.streaming_chat` do.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtrain.data.sources import (
    LOCAL_VALIDATION_EVERY,
    SPLITS,
    Builtin,
    Source,
    parse_split,
)
from jaxtrain.errors import ConfigError

if TYPE_CHECKING:
    import datasets

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
Row = dict[str, np.ndarray]
# (this host's examples from number ``first_example``, first_example, offset) -> (row, where the
# next row starts: (example, offset)), :class:`StreamingIterator`'s row maker.
RowMaker = Callable[[Iterator[dict[str, Any]], int, int], Iterator[tuple[Row, tuple[int, int]]]]


def open_stream(source: Source, split: str, *, max_documents: int | None = None
                ) -> datasets.IterableDataset:
    """The split spec ``split`` of ``source`` as an ``IterableDataset``.

    Absolute slices (``train[1000:5000]``) skip and take; percent slices need the split's size
    and are an error. An undivided source's ``"train"``/``"validation"`` follow the held-out rule
    of :func:`jaxtrain.data.sources.local_split_indices` (every 50th example is validation).
    """
    import datasets

    parts = []
    for name, bounds in parse_split(split):
        ds = _stream_named(source, name)
        if bounds:
            lo, hi = _absolute_bounds(split, name, bounds)
            ds = ds.skip(lo) if lo else ds
            ds = ds.take(hi - lo) if hi is not None else ds
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds.take(max_documents) if max_documents else ds


def _stream_named(source: Source, name: str) -> datasets.IterableDataset:
    import datasets

    if isinstance(source, Builtin):
        if name not in source.splits:
            raise ValueError(f"Unknown split {name!r}: {source.describe_splits()}.")
        examples = source.generate(name)
        rows = examples.to_list() if hasattr(examples, "to_list") else [dict(e) for e in examples]
        return datasets.Dataset.from_list(rows).to_iterable_dataset()
    if not hasattr(source, "stream"):
        raise ConfigError(f"data.streaming: the source {source.name!r} cannot be streamed.")
    if source.divided or name not in SPLITS:
        ds = source.stream(name)
        if ds is None:
            raise ValueError(f"Unknown split {name!r}: {source.describe_splits()}. Use one of "
                             "its splits (data.split, data.eval_split).")
        return ds
    ds = source.stream("train")
    if name == "all":
        return ds
    every, want = LOCAL_VALIDATION_EVERY, name == "validation"
    return ds.filter(lambda _, i: (i % every == every - 1) == want, with_indices=True)


def _absolute_bounds(spec: str, name: str, bounds: str) -> tuple[int, int | None]:
    inner = bounds.strip()[1:-1]
    lo_text, sep, hi_text = inner.partition(":")
    try:
        if not sep or "%" in inner:
            raise ValueError
        lo = int(lo_text) if lo_text.strip() else 0
        hi = int(hi_text) if hi_text.strip() else None
        if lo < 0 or (hi is not None and hi < lo):
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"The split {spec!r}: {name + bounds!r} cannot be streamed: a stream has no known "
            f"length, so only absolute, non-negative slices work (e.g. {name}[1000:5000]); "
            "percent slices need data.streaming=False."
        ) from None
    return lo, hi


def _doc_tokens(tokenizer: Any, text: Any, index: int, text_field: str) -> list[int]:
    """``text``'s token ids plus eos ([] for an empty document)."""
    if text is None or text == "":
        return []
    if not isinstance(text, str):
        raise ConfigError(f"Streamed example {index}: the text field {text_field!r} holds a "
                          f"{type(text).__name__}, not a string: {str(text)[:100]!r}.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id] if ids else []


def stream_rows(examples: Iterator[dict[str, Any]], tokenizer: Any, *, seq_len: int,
                text_field: str = "text", first_example: int = 0, offset: int = 0
                ) -> Iterator[tuple[dict[str, np.ndarray], tuple[int, int]]]:
    """(row, (example, offset) where the next row starts) for the concat rows of ``examples``
    (module docstring). ``examples`` starts at example number ``first_example``, whose first
    ``offset`` tokens are dropped (a resume)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; every document must end with one.")
    tok: list[int] = []
    doc: list[int] = []  # document rank (for segment ids and the loss mask)
    pos: list[int] = []  # token index in its document
    ex: list[int] = []  # example number (for the state)
    rank = 0
    for i, example in enumerate(examples, start=first_example):
        if text_field not in example:
            raise ConfigError(f"The text field {text_field!r} is not a column of the streamed "
                              f"data; its columns are {sorted(example)}. Set data.text_field.")
        ids = _doc_tokens(tokenizer, example[text_field], i, text_field)
        start = offset if i == first_example else 0
        if not ids[start:]:
            continue
        n = len(ids) - start
        tok += ids[start:]
        doc += [rank] * n
        pos += range(start, len(ids))
        ex += [i] * n
        rank += 1
        while len(tok) >= seq_len + 1:
            d = np.asarray(doc[: seq_len + 1])
            row = {
                "inputs": np.asarray(tok[:seq_len], np.int32),
                "targets": np.asarray(tok[1: seq_len + 1], np.int32),
                "loss_mask": (d[:-1] == d[1:]).astype(np.float32),
                "segment_ids": (d[:-1] - d[0] + 1).astype(np.int32),
                "positions": np.asarray(pos[:seq_len], np.int32),
            }
            nxt = (ex[seq_len], pos[seq_len])
            for buf in (tok, doc, pos, ex):
                del buf[:seq_len]
            yield row, nxt


def take_rows(stream: datasets.IterableDataset, tokenizer: Any, *, seq_len: int,
              text_field: str = "text", max_rows: int | None = None) -> dict[str, np.ndarray]:
    """The first ``max_rows`` (None: all) concat rows of one pass over ``stream``, stacked
    ``[num_rows, seq_len]`` (e.g. a held-out set)."""
    rows = take(stream, functools.partial(_text_row_maker, tokenizer=tokenizer, seq_len=seq_len,
                                          text_field=text_field), max_rows)
    if not rows:
        return {k: np.zeros((0, seq_len), np.float32 if k == "loss_mask" else np.int32)
                for k in ROW_KEYS}
    return rows


def take(stream: datasets.IterableDataset, rows: RowMaker, max_rows: int | None = None
         ) -> dict[str, np.ndarray]:
    """The first ``max_rows`` (None: all) rows ``rows`` makes of one pass over ``stream``,
    stacked (``{}`` when there are none)."""
    out = []
    for row, _ in rows(iter(stream), 0, 0):
        out.append(row)
        if max_rows is not None and len(out) >= max_rows:
            break
    return {k: np.stack([r[k] for r in out]) for k in out[0]} if out else {}


def _text_row_maker(examples: Iterator[dict[str, Any]], first_example: int, offset: int, *,
                    tokenizer: Any, seq_len: int, text_field: str
                    ) -> Iterator[tuple[Row, tuple[int, int]]]:
    return stream_rows(examples, tokenizer, seq_len=seq_len, text_field=text_field,
                       first_example=first_example, offset=offset)


def example_rows(row_of: Callable[[dict[str, Any], int], Row | None]) -> RowMaker:
    """The row maker of a function ``row_of(example, index)`` -> the example's row, or None to
    drop it (one row per example: chat SFT without packing, preference pairs). Its positions
    are ``(index of the next example, 0)``, so a resume skips exactly the consumed examples."""

    def rows(examples: Iterator[dict[str, Any]], first_example: int, offset: int
             ) -> Iterator[tuple[Row, tuple[int, int]]]:
        if offset:
            raise ValueError(f"A one-row-per-example stream has no offset within an example, got "
                             f"{offset}.")
        for i, example in enumerate(examples, start=first_example):
            row = row_of(example, i)
            if row is not None:
                yield row, (i + 1, 0)

    return rows


class StreamingIterator:
    """Endless batches of this host's streamed rows; resumable (module docstring).

    ``open_stream()`` gives a fresh ``IterableDataset`` of the whole (global) stream; this host
    reads its part. ``rows`` makes the rows (a :data:`RowMaker`; default: the concat text rows
    of ``tokenizer``, ``seq_len`` and ``text_field``; :func:`example_rows` for one row per
    example). ``transform(step, batch)`` reshapes batch ``step`` (curriculum). Checkpoints save
    ``get_state()`` (JSON bytes) and restore with ``set_state``.
    """

    def __init__(self, open_stream: Callable[[], datasets.IterableDataset],
                 tokenizer: Any = None, *, batch_size: int, seq_len: int = 0,
                 text_field: str = "text", rows: RowMaker | None = None,
                 process_index: int = 0, process_count: int = 1,
                 transform: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]
                 | None = None) -> None:
        self._open, self.tokenizer = open_stream, tokenizer
        self.seq_len, self.batch_size, self.text_field = seq_len, batch_size, text_field
        self.rows = rows or functools.partial(
            _text_row_maker, tokenizer=tokenizer, seq_len=seq_len, text_field=text_field)
        self.process_index, self.process_count = process_index, process_count
        self.transform = transform
        self.state = {"epoch": 0, "example": 0, "offset": 0, "batches": 0}
        self._rows: Iterator | None = None

    def _host_stream(self) -> datasets.IterableDataset:
        ds = self._open()
        if self.process_count > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.process_index,
                                       world_size=self.process_count)
        return ds

    def _start(self) -> Iterator:
        ds = self._host_stream()
        first = self.state["example"]
        # Skipped by reading (not tokenising): datasets' skip() after split_dataset_by_node
        # would count the global stream's examples, not this host's.
        return self.rows(itertools.islice(iter(ds), first, None), first, self.state["offset"])

    def _next_row(self) -> dict[str, np.ndarray]:
        for attempt in range(2):
            if self._rows is None:
                self._rows = self._start()
            item = next(self._rows, None)
            if item is not None:
                row, (self.state["example"], self.state["offset"]) = item
                return row
            # End of the stream: the next epoch starts at its beginning.
            fresh_epoch = self.state["example"] == 0 and self.state["offset"] == 0
            self.state.update(epoch=self.state["epoch"] + 1, example=0, offset=0)
            self._rows = None
            if fresh_epoch and attempt == 0:
                break
        what = (f"no row of {self.seq_len} + 1 tokens" if self.seq_len else "no row")
        raise ConfigError(
            f"The streamed data gives host {self.process_index} {what} in a whole pass: use more "
            "data or a shorter data.seq_len.")

    def __iter__(self) -> StreamingIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row() for _ in range(self.batch_size)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        step = self.state["batches"]
        self.state["batches"] = step + 1
        return self.transform(step, batch) if self.transform is not None else batch

    def get_state(self) -> bytes:
        """The position (JSON bytes; grain's checkpoint handler writes it as a file)."""
        return json.dumps({**self.state, "process_count": self.process_count}).encode()

    def set_state(self, state: bytes | str | dict[str, Any]) -> None:
        """Resume at ``state`` (from :meth:`get_state`)."""
        if isinstance(state, bytes | str):
            state = json.loads(state)
        saved = state.get("process_count", self.process_count)
        if saved != self.process_count:
            raise ConfigError(
                f"This streaming run was saved by {saved} hosts and resumes on "
                f"{self.process_count}: each host's position counts the examples of its own part "
                "of the stream, so resume with the same number of hosts.")
        self.state = {k: int(state[k]) for k in ("epoch", "example", "offset", "batches")}
        self._rows = None

    def start_prefetch(self) -> None:
        """(grain's checkpoint handler calls it after a restore; nothing runs ahead here)"""

    def close(self) -> None:
        self._rows = None


# ----------------------------------------------------------------------------------------------
# The language-model task's streamed text (data.streaming=True)


def _check_streamable(data: Any) -> None:
    if data.kind != "text":
        raise ConfigError(f"data.streaming=True streams text and chat data (data.kind='text' "
                          f"or 'chat'), not data.kind={data.kind!r}: set data.streaming=False.")
    if data.mode != "concat":
        raise ConfigError(f"data.streaming=True packs rows as 'concat' on the fly; "
                          f"data.mode={data.mode!r} needs the whole corpus: set data.mode='concat' "
                          "or data.streaming=False.")


def text_stream(data: Any, split: str, source: str = ""
                ) -> tuple[Callable[[], datasets.IterableDataset], str]:
    """(a function opening the stream of ``split`` ("train" / "validation") of the LM data
    config ``data``, or of all of ``source``; a description for messages)."""
    from jaxtrain.data import text
    from jaxtrain.data.sources import open_source, split_source, subset_of

    _check_streamable(data)
    name, split_name = (source, "all") if source else split_source(data, split)
    field = data.text_field
    builtin = Builtin(text.BUILTIN_TEXT,
                      lambda s: [{field: d} for d in text.shakespeare_documents(s)], SPLITS)
    src = open_source(name, builtins={text.BUILTIN_TEXT: builtin},
                      subset=subset_of(data, name))
    limit = data.get("max_documents", 0) or None
    return (lambda: open_stream(src, split_name, max_documents=limit),
            f"{name!r} (split {split_name!r}, streamed)")


def text_train_iterator(data: Any, tokenizer: Any, *, batch_size: int, process_index: int,
                        process_count: int, transform: Callable | None = None
                        ) -> StreamingIterator:
    """The LM task's training batches with ``data.streaming=True`` (module docstring)."""
    opener, _ = text_stream(data, "train")
    return StreamingIterator(opener, tokenizer, seq_len=data.seq_len, batch_size=batch_size,
                             text_field=data.text_field, process_index=process_index,
                             process_count=process_count, transform=transform)


def text_heldout_rows(data: Any, tokenizer: Any, split: str = "validation", source: str = ""
                      ) -> dict[str, np.ndarray]:
    """The first ``data.eval_rows`` (0: all) streamed concat rows of the held-out split (or of
    all of ``source``): eval reads only what it uses."""
    from jaxtrain.data.sanity import MIN_EVAL_LM_ROWS, check_eval_rows

    opener, where = text_stream(data, split, source)
    rows = take_rows(opener(), tokenizer, seq_len=data.seq_len, text_field=data.text_field,
                     max_rows=data.eval_rows or None)
    check_eval_rows(where, len(rows["inputs"]), MIN_EVAL_LM_ROWS, "token row",
                    "For a meaningful eval: set data.eval_split or data.eval_source to a larger "
                    "set, or a shorter data.seq_len")
    return rows
