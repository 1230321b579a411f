"""A retrieval set (queries, corpus, graded judgments) from a local directory in the BEIR /
MTEB retrieval layout:

    DIR/corpus.jsonl        one JSON object a line: {"_id": ..., "title": ..., "text": ...}
    DIR/queries.jsonl       one JSON object a line: {"_id": ..., "text": ...}
    DIR/qrels/<split>.tsv   a header line (query-id, corpus-id, score), then one judgment a
                            line: query id <TAB> document id <TAB> integer relevance

As BEIR's ``GenericDataLoader`` and MTEB read it: ids are strings (a number in JSON is its
decimal text); a document's text is ``(title + " " + text).strip()`` (``text.strip()`` when
it has no title); a query's text is used as it is; only queries with a judgment in the split
are evaluated, in the order of their first judgment; a repeated (query, document) judgment
keeps the last score. Unlike them, every problem is an error that names the file and the
line (1-based): a line that is not a JSON object, a missing or non-string field, a repeated
id, a judgment naming an unknown query or document, a score that is not an integer.

``max_queries`` keeps the first queries; ``max_documents`` keeps every document judged for the
kept queries, then fills up with the others in corpus order (so no judged document is lost).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

from jaxtrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """Queries and documents (texts, ids) and per query its judgments:
    ``qrels[q] = {document index: relevance}`` (indices into ``documents``)."""

    query_ids: list[str]
    queries: list[str]
    document_ids: list[str]
    documents: list[str]
    qrels: list[dict[int, int]]

    def __post_init__(self) -> None:
        if not (len(self.query_ids) == len(self.queries) == len(self.qrels)):
            raise ValueError("RetrievalSet: query_ids, queries and qrels must have one entry "
                             f"per query; got {len(self.query_ids)}, {len(self.queries)}, "
                             f"{len(self.qrels)}")
        if len(self.document_ids) != len(self.documents):
            raise ValueError("RetrievalSet: document_ids and documents must have one entry "
                             f"per document; got {len(self.document_ids)} and "
                             f"{len(self.documents)}")


def split_names(directory: str) -> list[str]:
    """The splits with a qrels file in `directory` (``qrels/<split>.tsv``)."""
    qrels = os.path.join(directory, "qrels")
    if not os.path.isdir(qrels):
        return []
    return sorted(f[:-4] for f in os.listdir(qrels) if f.endswith(".tsv"))


def load(directory: str, split: str = "test", *, max_queries: int = 0,
         max_documents: int = 0, key: str = "data") -> RetrievalSet:
    """The retrieval set of `directory` (the module docstring's layout) for `split`.
    `key` names the config key that gave the directory, for error messages."""
    layout = ("an MTEB/BEIR retrieval directory holds corpus.jsonl, queries.jsonl and "
              "qrels/<split>.tsv")
    if not os.path.isdir(directory):
        raise ConfigError(f"{key} = {directory!r} is not a directory: {layout}.")
    paths = {name: os.path.join(directory, name) for name in ("corpus.jsonl", "queries.jsonl")}
    paths["qrels"] = os.path.join(directory, "qrels", f"{split}.tsv")
    for name, path in paths.items():
        if not os.path.isfile(path):
            hint = ""
            if name == "qrels":
                splits = split_names(directory)
                hint = (f" Splits with qrels there: {splits}; set the split to one of them."
                        if splits else "")
            raise ConfigError(f"{key} = {directory!r}: no {os.path.relpath(path, directory)} "
                              f"({layout}).{hint}")

    corpus = _read_jsonl(paths["corpus.jsonl"], ("_id", "text"), ("title",))
    queries = _read_jsonl(paths["queries.jsonl"], ("_id", "text"), ())
    judgments = _read_qrels(paths["qrels"], set(queries), set(corpus))
    if not judgments:
        raise ValueError(f"{paths['qrels']} has no judgments (only a header or blank lines): "
                         "a retrieval set needs at least one (query-id, corpus-id, score) row.")
    all_queries = list(judgments)
    corpus_ids = list(corpus)
    position = {d: i for i, d in enumerate(corpus_ids)}
    kept_queries, kept_documents = select(
        [{position[d]: r for d, r in judgments[q].items()} for q in all_queries],
        len(corpus_ids), max_queries=max_queries, max_documents=max_documents)
    query_ids = [all_queries[i] for i in kept_queries]
    document_ids = [corpus_ids[i] for i in kept_documents]
    index = {d: i for i, d in enumerate(document_ids)}

    def doc_text(row: dict) -> str:
        title = row.get("title")
        return (title + " " + row["text"]).strip() if title is not None else row["text"].strip()

    return RetrievalSet(
        query_ids=query_ids,
        queries=[queries[q]["text"] for q in query_ids],
        document_ids=document_ids,
        documents=[doc_text(corpus[d]) for d in document_ids],
        qrels=[{index[d]: score for d, score in judgments[q].items()} for q in query_ids],
    )


def select(qrels: list[dict[int, int]], num_documents: int, *, max_queries: int = 0,
           max_documents: int = 0) -> tuple[list[int], list[int]]:
    """(query positions, document positions, both ascending) kept under the limits (0 = no
    limit): the first `max_queries` queries; every document judged for them, then the other
    documents in order up to `max_documents` in all (more when the judged ones alone exceed
    it: a judged document is never dropped)."""
    queries = list(range(len(qrels)))[:max_queries or None]
    if not max_documents or num_documents <= max_documents:
        return queries, list(range(num_documents))
    chosen = {d for q in queries for d in qrels[q]}
    room = max(0, max_documents - len(chosen))
    chosen.update([d for d in range(num_documents) if d not in chosen][:room])
    return queries, sorted(chosen)


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines of a UTF-8 file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {number}: not UTF-8 text ({e.reason} at byte "
                                 f"{e.start} of the line); save the file as UTF-8.") from None
            if line:
                yield number, line


def _read_jsonl(path: str, required: tuple[str, ...], optional: tuple[str, ...]
                ) -> dict[str, dict]:
    """id -> row of a JSON Lines file whose rows carry `required` (strings; `_id` may be a
    number) and maybe `optional` string fields."""
    rows: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for number, line in _lines(path):
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno}); every line "
                             "must be one JSON object.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a JSON {type(row).__name__}, not an object; every line "
                             f"must be an object with {list(required)}.")
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{where}: no {missing} field (the line has {sorted(row)}); every "
                             f"line needs {list(required)}.")
        raw_id = row["_id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            raise ValueError(f"{where}: _id must be a string or an integer; got "
                             f"{type(raw_id).__name__} {raw_id!r}.")
        for k in (*required[1:], *optional):
            if k in row and row[k] is not None and not isinstance(row[k], str):
                raise ValueError(f"{where}: {k!r} must be a string; got "
                                 f"{type(row[k]).__name__} {row[k]!r}.")
        doc_id = str(raw_id)
        if doc_id in rows:
            raise ValueError(f"{where}: _id {doc_id!r} repeats the one of line "
                             f"{first_line[doc_id]}; ids must be unique.")
        if row["text"] is None:
            raise ValueError(f"{where}: 'text' is null; give every row a text.")
        rows[doc_id] = {k: row[k] for k in (*required, *optional)
                        if k in row and row[k] is not None}
        first_line[doc_id] = number
    if not rows:
        raise ValueError(f"{path} has no rows: it needs one JSON object per line.")
    return rows


def _read_qrels(path: str, queries: set[str], documents: set[str]
                ) -> dict[str, dict[str, int]]:
    """query id -> {document id: relevance} of a qrels TSV (its first line is the header)."""
    judgments: dict[str, dict[str, int]] = {}
    header = True
    for number, line in _lines(path):
        fields = line.split("\t")
        where = f"{path}, line {number}"
        if header:
            header = False
            if [f.strip() for f in fields] != ["query-id", "corpus-id", "score"]:
                raise ValueError(f"{where}: the header must be 'query-id<TAB>corpus-id<TAB>"
                                 f"score'; got {line!r}.")
            continue
        if len(fields) != 3:
            raise ValueError(f"{where}: {len(fields)} tab-separated fields, not 3 (query-id, "
                             f"corpus-id, score): {line!r}.")
        query, doc, score = (f.strip() for f in fields)
        try:
            relevance = int(score)
        except ValueError:
            raise ValueError(f"{where}: score {score!r} is not an integer relevance.") from None
        if query not in queries:
            raise ValueError(f"{where}: query-id {query!r} is not an _id of queries.jsonl.")
        if doc not in documents:
            raise ValueError(f"{where}: corpus-id {doc!r} is not an _id of corpus.jsonl.")
        judgments.setdefault(query, {})[doc] = relevance
    if header:
        raise ValueError(f"{path} is empty: it needs the header 'query-id<TAB>corpus-id<TAB>"
                         "score' and one judgment a line.")
    return judgments
