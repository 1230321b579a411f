"""The unparseable lines of a local json / jsonl / csv / txt file, and a copy without them.

``datasets`` reads a whole file at once and, on a bad line, fails without naming it (or, for a
string that is not UTF-8, loads it and fails later, wherever the row is read). This module reads
such a file itself, line by line, to say which lines are bad and why (:func:`scan`), and writes
the good rows to a new file (:func:`write_good`) for ``data.on_bad_row='skip'``
(:mod:`jaxtrain.data.sanity`).

What is checked, per format:

- JSON Lines (``.jsonl``, or a ``.json`` file that is not one JSON document): every non-blank
  line must be UTF-8 and one JSON object. Row N is the N-th non-blank line.
- a JSON document (``.json``): it must be UTF-8 and valid JSON; it is one unit, so a problem
  names its line and column but no line can be dropped.
- CSV: every line must be UTF-8 and every record (after the header) must have the header's
  number of fields. Row N is the N-th record after the header.
- text (``.txt``, one example per file): the file must be UTF-8.

A line is named 1-based (``line 3``), as editors count; a row 0-based (``row 2``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

FORMATS: dict[str, str] = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".txt": "text"}


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line that does not parse: ``line`` 1-based, ``row`` 0-based (-1: not a row)."""

    line: int
    row: int
    problem: str

    @property
    def label(self) -> str:
        return f"Line {self.line}" + (f" (row {self.row})" if self.row >= 0 else "")


@dataclasses.dataclass(frozen=True)
class Scan:
    """The result of :func:`scan`: the bad lines, the number of rows (bad ones included; -1:
    unknown), and whether dropping lines can fix the file (not a JSON document or a text
    file)."""

    bad: list[BadLine]
    rows: int
    droppable: bool


def _lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset in the file, raw line without its newline)."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            yield number, offset, raw.rstrip(b"\r\n")
            offset += len(raw)


def _utf8_problem(raw: bytes, offset: int) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte {e.start} of the line "
                f"(byte {offset + e.start} of the file) cannot be decoded ({e.reason}); save "
                "the file as UTF-8")
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), "null")


def _scan_jsonl(path: str) -> Scan:
    bad, row = [], 0
    for number, offset, raw in _lines(path):
        if not raw.strip():
            continue
        problem = _utf8_problem(raw, offset)
        if problem is None:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            else:
                if not isinstance(value, dict):
                    problem = f"a JSON {_kind(value)}, not an object ({{\"column\": value, ...}})"
        if problem is not None:
            bad.append(BadLine(number, row, problem))
        row += 1
    return Scan(bad, row, True)


def _scan_json(path: str) -> Scan:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        line = data[start:len(data) if end < 0 else end]
        problem = _utf8_problem(line, start) or "not UTF-8 text"
        return Scan([BadLine(data.count(b"\n", 0, e.start) + 1, -1, problem)], 0, False)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        first = next((s for s in text.splitlines() if s.strip()), "")
        try:
            is_lines = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_lines = False
        if is_lines:  # JSON Lines in a .json file
            return _scan_jsonl(path)
        return Scan([BadLine(e.lineno, -1, f"not valid JSON ({e.msg} at column {e.colno}); "
                             "the file is one JSON document, so no row can be dropped from it")],
                    0, False)
    return Scan([], len(document) if isinstance(document, list) else -1, False)


def _csv_records(path: str) -> Iterator[tuple[int, list[str], str | None]]:
    """(first line number, fields, problem or None) of each record, the header included; blank
    lines are skipped (as pandas does). A line that is not UTF-8 is decoded with
    ``surrogateescape`` so the record is still delimited, and its record is bad."""
    consumed: list[tuple[int, str | None]] = []

    def texts() -> Iterator[str]:
        for number, offset, raw in _lines(path):
            consumed.append((number, _utf8_problem(raw, offset)))
            yield raw.decode("utf-8", "surrogateescape") + "\n"

    for record in csv.reader(texts()):
        span, consumed[:] = list(consumed), []
        if record:
            yield span[0][0], record, next((p for _, p in span if p), None)


def _scan_csv(path: str) -> Scan:
    records = _csv_records(path)
    header = next(records, None)
    if header is None:
        return Scan([], 0, True)
    if header[2] is not None:
        return Scan([BadLine(header[0], -1, f"the header line is {header[2]}")], 0, False)
    bad, row = [], -1
    for row, (number, fields, problem) in enumerate(records):
        if problem is None and len(fields) != len(header[1]):
            problem = f"{len(fields)} fields, but the header has {len(header[1])}"
        if problem is not None:
            bad.append(BadLine(number, row, problem))
    return Scan(bad, row + 1, True)


def _scan_text(path: str) -> Scan:
    for number, offset, raw in _lines(path):
        problem = _utf8_problem(raw, offset)
        if problem is not None:
            return Scan([BadLine(number, 0, problem)], 1, False)
    return Scan([], 1, False)


def scan(path: str) -> Scan:
    """The bad lines of the file ``path`` (by its extension; module docstring)."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        return Scan([], -1, False)
    return {"jsonl": _scan_jsonl, "json": _scan_json, "csv": _scan_csv, "text": _scan_text}[fmt](
        path)


def write_good(path: str, bad: list[BadLine], out_dir: str) -> str:
    """A copy of the file ``path`` without its ``bad`` lines, in ``out_dir``; returns its path.

    JSON Lines and CSV only (:attr:`Scan.droppable`); a CSV copy keeps the header and the
    records whose lines are all good."""
    drop = {b.line for b in bad}
    name = os.path.basename(path)
    out = os.path.join(out_dir, name if not name.lower().endswith(".json") else name + "l")
    if os.path.splitext(path)[1].lower() != ".csv":
        with open(out, "wb") as f:
            for number, _, raw in _lines(path):
                if number not in drop and raw.strip():
                    f.write(raw + b"\n")
        return out
    records = _csv_records(path)
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        for number, fields, _ in records:
            if number not in drop:
                writer.writerow(fields)
    return out
