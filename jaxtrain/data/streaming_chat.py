"""Streamed chat SFT and preference data (``data.streaming=True``): one row per example.

The LM task's chat data (``data.kind='chat'``) and the DPO task's preference pairs are read as
training consumes them, through :class:`jaxtrain.data.streaming.StreamingIterator` (per-host
parts of the stream, resume by counting this host's consumed examples) with the row maker
:func:`jaxtrain.data.streaming.example_rows`:

* chat: conversation ``i`` gives the row :func:`jaxtrain.data.chat.sft_row` makes, i.e. the
  row ``sft_rows(..., packing=False)`` gives it in memory (truncated to ``seq_len + 1`` tokens;
  dropped when no assistant target is left). ``data.packing`` packs by first-fit decreasing over
  the whole set, which a stream cannot do in the same way: streaming with packing is a
  ConfigError;
* preference: pair ``i`` gives the row :func:`jaxtrain.data.preference.preference_row` makes, the
  row ``preference_rows`` gives it in memory. ``dpo.reference='precomputed'`` needs
  ``ref_chosen_logps`` / ``ref_rejected_logps`` in every streamed row (computing them from the
  starting weights needs the whole set first); otherwise those columns are not used.

So one pass over examples ``e_0 .. e_n`` gives exactly the in-memory rows of the same examples,
in order. A row that :func:`jaxtrain.data.chat.to_messages` /
:func:`jaxtrain.data.preference.to_preference` cannot read is bad: an error naming its example
number in this host's stream, or dropped with ``data.on_bad_row='skip'``.

Held-out data: the first ``data.eval_rows`` (0: all) rows of the held-out split, read as a
stream, so eval reads only what it uses. A source without splits holds out its every 50th
example, as in memory, except that a stream's length is unknown: one of fewer than 50 examples
holds out none (in memory its last example), and trains on all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtrain.data.sanity import BadRows
from jaxtrain.data.sources import SPLITS, Builtin, open_source, split_source, subset_of
from jaxtrain.data.streaming import Row, StreamingIterator, example_rows, open_stream, take
from jaxtrain.errors import ConfigError

if TYPE_CHECKING:
    import datasets

Opener = Callable[[], "datasets.IterableDataset"]
HOLDOUT = ("a source without splits holds out every 50th example when streamed (a stream's "
           "length is unknown, so one of fewer than 50 examples holds out none)")


def _opener(data: Any, split: str, source: str, builtin: str,
            generate: Callable[[int, int], list[dict[str, Any]]], seed: int
            ) -> tuple[Opener, str]:
    """(a function opening the stream of ``split`` ("train" / "validation") of the data config
    ``data``, or of all of ``source``; a description for messages). The built-in data
    ``builtin`` is ``generate(count, seed)`` with the in-memory path's sizes and seeds."""
    name, split_name = (source, "all") if source else split_source(data, split)

    def examples(s: str) -> list[dict[str, Any]]:
        count = data.train_examples if s == "train" else data.eval_examples
        return generate(count, 2 * seed + (s != "train"))

    src = open_source(name, builtins={builtin: Builtin(builtin, examples, SPLITS[:2])},
                      subset=subset_of(data, name))
    limit = data.get("max_documents", 0) or None
    if name == builtin:
        limit = data.train_examples if split == "train" else data.eval_examples
    return (lambda: open_stream(src, split_name, max_documents=limit),
            f"{name!r} (split {split_name!r}, streamed)")


def _checked(row_of: Callable[[dict[str, Any], int], Row | None],
             check: Callable[[dict[str, Any], int], Any], on_bad_row: str, where: str
             ) -> Callable[[dict[str, Any], int], Row | None]:
    """``row_of`` for the examples ``check`` accepts (a ValueError marks a bad row: an error,
    or dropped with a warning under ``on_bad_row='skip'``, :class:`BadRows`)."""
    bad = BadRows(on_bad_row, where)
    kept = [0]

    def row(example: dict[str, Any], index: int) -> Row | None:
        try:
            check(example, index)
        except ValueError as e:
            bad.add(f"Streamed example {index}", str(e).rstrip("."))
            if len(bad) & (len(bad) - 1) == 0:  # warn at 1, 2, 4, ... bad rows
                bad.report(kept[0])
            return None
        out = row_of(example, index)
        kept[0] += out is not None
        return out

    return row


# ----------------------------------------------------------------------------------------------
# Chat SFT (the LM task, data.kind='chat')


def _chat_fields(data: Any) -> list[str] | None:
    return [f.strip() for f in data.text_fields.split(",") if f.strip()] or None


def _check_chat(data: Any) -> None:
    if data.kind != "chat":
        raise ConfigError(f"Streamed chat rows need data.kind='chat', not {data.kind!r}.")
    if data.packing:
        raise ConfigError(
            "data.streaming=True with data.packing=True: packing places conversations by "
            "first-fit decreasing over the whole set, which a stream read as it is consumed "
            "cannot do; set data.packing=False (one conversation per row) or "
            "data.streaming=False.")


def chat_stream(data: Any, split: str, source: str = "", seed: int = 0) -> tuple[Opener, str]:
    """(opener, description) of the chat split ``split`` of the LM data config ``data`` (or of
    all of ``source``); the built-in conversations as :func:`load_chat_examples` makes them."""
    from jaxtrain.data import chat

    _check_chat(data)
    return _opener(data, split, source, chat.BUILTIN_CHAT, chat.builtin_chat_examples, seed)


def chat_row_of(data: Any, tokenizer: Any, where: str
                ) -> Callable[[dict[str, Any], int], Row | None]:
    """example, index -> its SFT row (:func:`jaxtrain.data.chat.sft_row`) or None."""
    from jaxtrain.data import chat

    fields = _chat_fields(data)
    return _checked(
        lambda e, _: chat.sft_row(e, tokenizer, seq_len=data.seq_len, text_fields=fields),
        lambda e, _: chat.to_messages(e, text_fields=fields),
        data.get("on_bad_row", "error"), where)


def chat_train_iterator(data: Any, tokenizer: Any, *, batch_size: int, process_index: int,
                        process_count: int, seed: int = 0, transform: Callable | None = None
                        ) -> StreamingIterator:
    """The LM task's chat training batches with ``data.streaming=True`` (module docstring)."""
    opener, where = chat_stream(data, "train", seed=seed)
    return StreamingIterator(opener, batch_size=batch_size,
                             rows=example_rows(chat_row_of(data, tokenizer, where)),
                             process_index=process_index, process_count=process_count,
                             transform=transform)


def chat_heldout_rows(data: Any, tokenizer: Any, split: str = "validation", source: str = "",
                      seed: int = 0) -> dict[str, np.ndarray]:
    """The first ``data.eval_rows`` (0: all) streamed SFT rows of the held-out split (or of all
    of ``source``)."""
    from jaxtrain.data.sanity import MIN_EVAL_LM_ROWS, check_eval_rows

    opener, where = chat_stream(data, split, source, seed)
    rows = take(opener(), example_rows(chat_row_of(data, tokenizer, where)),
                data.eval_rows or None)
    check_eval_rows(where, len(rows.get("inputs", ())), MIN_EVAL_LM_ROWS, "token row",
                    f"For a meaningful eval: set data.eval_split or data.eval_source to a larger "
                    f"set, or a larger data.seq_len; {HOLDOUT}")
    return rows


# ----------------------------------------------------------------------------------------------
# Preference pairs (the DPO task)


def preference_stream(data: Any, split: str, source: str = "", seed: int = 0
                      ) -> tuple[Opener, str]:
    """(opener, description) of the preference split ``split`` of the DPO data config ``data``
    (or of all of ``source``); the built-in pairs as :func:`load_preference_examples` makes
    them."""
    from jaxtrain.data import preference

    return _opener(data, split, source, preference.BUILTIN_PREFERENCE,
                   preference.builtin_preference_examples, seed)


def preference_row_of(data: Any, tokenizer: Any, where: str, *, reference_logps: bool
                      ) -> Callable[[dict[str, Any], int], Row | None]:
    """example, index -> its pair's row (:func:`jaxtrain.data.preference.preference_row`) or
    None; with ``reference_logps`` the row must carry both reference log-prob columns, without
    them they are left out (so every batch has the same keys)."""
    from jaxtrain.data import preference

    def row_of(example: dict[str, Any], index: int) -> Row | None:
        row = preference.preference_row(example, tokenizer, max_length=data.max_length,
                                        max_prompt_length=data.max_prompt_length, index=index)
        if row is None:
            return None
        if not reference_logps:
            return {k: v for k, v in row.items() if k not in preference.REF_KEYS}
        if not all(k in row for k in preference.REF_KEYS):
            raise ConfigError(
                f"Streamed example {index} of {where} has no {' / '.join(preference.REF_KEYS)}: "
                "dpo.reference='precomputed' with data.streaming=True needs them in every row "
                "(computing them from the starting weights needs the whole set first); use "
                "dpo.reference='model' or data.streaming=False.")
        return row

    return _checked(row_of, preference.to_preference, data.get("on_bad_row", "error"), where)


def preference_train_iterator(data: Any, tokenizer: Any, *, batch_size: int,
                              process_index: int, process_count: int, seed: int = 0,
                              reference_logps: bool = False) -> StreamingIterator:
    """The DPO task's training batches with ``data.streaming=True`` (module docstring)."""
    opener, where = preference_stream(data, "train", seed=seed)
    rows = preference_row_of(data, tokenizer, where, reference_logps=reference_logps)
    return StreamingIterator(opener, batch_size=batch_size, rows=example_rows(rows),
                             process_index=process_index, process_count=process_count)


def preference_heldout_rows(data: Any, tokenizer: Any, split: str = "validation",
                            source: str = "", seed: int = 0, reference_logps: bool = False
                            ) -> dict[str, np.ndarray]:
    """The first ``data.eval_rows`` (0: all) streamed pairs of the held-out split (or of all of
    ``source``)."""
    from jaxtrain.data.sanity import MIN_EVAL_PREFERENCE_PAIRS, check_eval_rows

    opener, where = preference_stream(data, split, source, seed)
    rows = take(opener(), example_rows(preference_row_of(data, tokenizer, where,
                                                         reference_logps=reference_logps)),
                data.get("eval_rows", 0) or None)
    check_eval_rows(where, len(rows.get("chosen_inputs", ())), MIN_EVAL_PREFERENCE_PAIRS,
                    "preference pair", "For a meaningful eval: set data.eval_split or "
                    f"data.eval_source to a larger set; {HOLDOUT}")
    return rows
