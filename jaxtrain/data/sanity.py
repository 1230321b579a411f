"""Sanity of loaded data: bad rows (``data.on_bad_row``) and eval splits too small to mean much.

Bad rows
--------
A bad row is one that cannot become an example: an unparseable line of a json/jsonl/csv file
(bad JSON, not UTF-8, the wrong number of fields), a missing or wrong-typed cell, a missing
image file, an image that does not decode, a conversation or preference pair that does not
convert. ``data.on_bad_row`` says what happens:

- ``"error"`` (the default): the first bad row (in row order) stops the run with a
  :class:`jaxtrain.errors.ConfigError` naming the source, the row and the problem, and the fix;
- ``"skip"``: bad rows are dropped, counted and reported in one warning (the count and the
  first few rows and reasons). Which rows are kept depends only on the data, never on timing
  or on which worker saw a row, so a resumed run sees the same rows.

Rows are named ``"Row N"`` (0-based, the index of the row in its file or split, as
``datasets`` counts them) and, for a problem with a line of a text file, ``"Line L (row N)"``
(1-based, as editors count lines).

Eval splits
-----------
:func:`check_eval_rows` warns when a held-out set has fewer rows than the metric needs to mean
anything (e.g. recall@1 over one pair is always 1.0) and says how to get more; an eval set
with no rows is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from jaxtrain.config import Rule
from jaxtrain.errors import ConfigError

ON_BAD_ROW: tuple[str, ...] = ("error", "skip")
FIX = "Fix or drop the row, or set data.on_bad_row='skip' to drop bad rows"
REPORT_FIRST = 5  # bad rows named in the skip warning

# Fewer eval rows than this draw a warning (retrieval pairs; LM token rows; preference pairs).
MIN_EVAL_PAIRS = 50
MIN_EVAL_LM_ROWS = 8
MIN_EVAL_PREFERENCE_PAIRS = 20

_warned: set[str] = set()  # warnings already logged by this process (evals reload their data)


def on_bad_row_rule(prefix: str = "data.") -> Rule:
    """The config rule of ``<prefix>on_bad_row``."""
    return (prefix + "on_bad_row", lambda v: v in ON_BAD_ROW,
            "must be 'error' (stop at the first bad row) or 'skip' (drop bad rows, with a "
            "warning)")


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`ON_BAD_ROW`, else a ConfigError."""
    if policy not in ON_BAD_ROW:
        raise ConfigError(
            f"data.on_bad_row must be one of {ON_BAD_ROW}; got {policy!r}."
        )
    return policy


class BadRows:
    """The bad rows of one source under one policy: raises at the first ('error') or collects
    them ('skip'); :meth:`report` logs what was skipped."""

    def __init__(self, policy: str, where: str) -> None:
        self.policy, self.where = check_policy(policy), where
        self.found: list[tuple[str, str]] = []  # (row label, problem)

    def __len__(self) -> int:
        return len(self.found)

    def add(self, label: str, problem: str) -> None:
        """A bad row, ``label`` e.g. ``"Row 3"`` or ``"Line 4 (row 3)"``."""
        if self.policy == "error":
            raise ConfigError(f"{label} of {self.where}: {problem}. {FIX}.")
        self.found.append((label, problem))

    def keep(self, examples: Sequence[Any], rows: Sequence[int],
             check: Callable[[Any, int], Any]) -> list[Any]:
        """The examples that `check(example, row)` accepts (a ValueError marks a bad row, named
        by its row), after :meth:`report`."""
        kept = []
        for example, row in zip(examples, rows, strict=True):
            try:
                check(example, int(row))
            except ValueError as e:
                self.add(f"Row {row}", str(e).rstrip("."))
                continue
            kept.append(example)
        self.report(len(kept))
        return kept

    def report(self, kept: int) -> None:
        """One warning with the count and the first few bad rows (nothing when none)."""
        if not self.found:
            return
        first = "; ".join(f"{label}: {problem}" for label, problem in self.found[:REPORT_FIRST])
        more = f" (and {len(self.found) - REPORT_FIRST} more)" if len(self) > REPORT_FIRST else ""
        warn_once(
            f"Skipped {len(self)} bad row{'s' * (len(self) != 1)} of {self.where} "
            f"(data.on_bad_row='skip'); {kept} kept. {first}{more}."
        )


def warn_once(message: str) -> None:
    """``logging.warning(message)``, once per process."""
    if message not in _warned:
        _warned.add(message)
        logging.warning("%s", message)


def check_eval_rows(where: str, rows: int, minimum: int, what: str, more: str) -> None:
    """ConfigError when the eval set ``where`` has no rows; a warning (once) when it has fewer
    than ``minimum``: ``what`` says what a row is (e.g. "pair"), ``more`` how to get more."""
    if rows == 0:
        raise ConfigError(f"The eval set {where} has no {what}s: there is nothing to evaluate. "
                          f"{more}.")
    if rows < minimum:
        warn_once(
            f"The eval set {where} has only {rows} {what}{'s' * (rows != 1)} (fewer than "
            f"{minimum}): its metrics mean little. {more}."
        )
