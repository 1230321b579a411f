"""``information_retrieval``: nDCG@10, MRR@10, recall@k and MAP@10 of queries against a corpus,
as text-embedding benchmarks (MTEB, BEIR) report them.

    c.evals.ir = eval_config("information_retrieval")                       # built-in set
    c.evals.ir = eval_config("information_retrieval", data="/data/scifact")  # MTEB layout

Every corpus document is embedded once (``task.encode``, L2-normalised), every query once;
each query's documents are ranked by cosine similarity, ties by lower document index
(:mod:`jaxtrain.metrics.ranking`: the formulas, trec_eval's gains and discounts, queries
without a relevant document counted as 0). Rows are split over hosts and the mesh like every
batched evaluator's: each host embeds its share, the embeddings are gathered, and every host
ranks them, a chunk of queries at a time on its first device.

The set (``data``):

- ``''``: built from the task's held-out pairs (``task.heldout_batches``). Queries are the
  held-out queries and the corpus the held-out positives, each deduplicated (identical token
  rows or identical images are one query / one document), so a query may have several
  relevant documents (relevance 1) and a document several queries. Queries and documents
  keep the task's modalities (``i2t``: image queries, text documents; ``t2i`` the reverse;
  ``t2t`` / ``i2i``). The corpus is put in a fixed pseudo-random order (from ``seed``), so the
  tie order (by document index) tells nothing about the pairing.
- a directory in the BEIR / MTEB retrieval layout (:mod:`jaxtrain.data.mteb_retrieval`:
  ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, graded relevance), read at
  the start of the run. Its texts go through the text tower, tokenised as the training rows
  are (``task.tokenize_texts``: queries with ``contrastive.query_prefix``, documents with
  ``positive_prefix``). ``ignore_identical_ids`` takes a document whose id equals the query's
  out of that query's ranking (MTEB's option, for sets such as ArguAna or Quora).

Keys: ``data``, ``split``, ``ndcg_at``, ``mrr_at``, ``recall_at``, ``map_at``, ``max_queries``,
``max_documents``, ``ignore_identical_ids``, ``seed`` (and ``every``, ``batch_size``).
Metrics: ``ndcg@k``, ``mrr@k``, ``recall@k``, ``map@k`` for the configured k, ``queries`` and
``documents`` (the set's size).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections
import numpy as np

from jaxtrain.data import mteb_retrieval, pipeline
from jaxtrain.errors import ConfigError
from jaxtrain.evaluator import Evaluator
from jaxtrain.metrics.ranking import ranking_metrics, top_k_by_similarity

_READ_BATCH = 256  # held-out rows read at a time to build the built-in set


@dataclasses.dataclass(frozen=True)
class EncodedSet:
    """A retrieval set as model inputs: query and document rows (token ids or images) with
    their modalities, per query its judgments, and per query the document to leave out of its
    ranking (-1: none)."""

    queries: np.ndarray
    documents: np.ndarray
    modalities: tuple[str, str]
    qrels: list[dict[int, int]]
    exclude: np.ndarray


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows in order of first appearance, each row's position among them)."""
    first: dict[bytes, int] = {}
    keep, inverse = [], []
    for i, row in enumerate(rows):
        key = np.ascontiguousarray(row).tobytes()
        if key not in first:
            first[key] = len(keep)
            keep.append(i)
        inverse.append(first[key])
    return rows[np.asarray(keep, np.int64)], np.asarray(inverse, np.int64)


def heldout_set(task: Any, *, seed: int, max_queries: int = 0, max_documents: int = 0
                ) -> EncodedSet:
    """The built-in set from the task's held-out pairs (see the module docstring)."""
    queries, positives = [], []
    for batch in task.heldout_batches(batch_size=_READ_BATCH, process_index=0,
                                      process_count=1):
        valid = np.asarray(batch["valid"], bool)
        queries.append(np.asarray(batch["query"])[valid])
        positives.append(np.asarray(batch["positive"])[valid])
    if not queries or sum(len(q) for q in queries) == 0:
        raise ConfigError("The task's held-out split has no pairs to build the built-in "
                          "retrieval set from: give data.* a held-out split, or point the "
                          "evaluator's `data` at an MTEB retrieval directory.")
    query_rows, query_of = _unique_rows(np.concatenate(queries))
    doc_rows, doc_of = _unique_rows(np.concatenate(positives))
    order = np.random.default_rng(seed).permutation(len(doc_rows))  # new index -> old
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    doc_rows = doc_rows[order]
    qrels: list[dict[int, int]] = [{} for _ in range(len(query_rows))]
    for q, d in zip(query_of, doc_of, strict=True):
        qrels[q][int(position[d])] = 1
    kept_q, kept_d = mteb_retrieval.select(qrels, len(doc_rows), max_queries=max_queries,
                                           max_documents=max_documents)
    renumber = {d: i for i, d in enumerate(kept_d)}
    return EncodedSet(
        queries=query_rows[kept_q], documents=doc_rows[kept_d],
        modalities=(task.query_modality, task.positive_modality),
        qrels=[{renumber[d]: r for d, r in qrels[q].items()} for q in kept_q],
        exclude=np.full(len(kept_q), -1, np.int64))


def mteb_set(task: Any, config: ml_collections.ConfigDict, key: str) -> EncodedSet:
    """A local MTEB-layout set, tokenised as the task's training rows."""
    s = mteb_retrieval.load(config.data, config.split, max_queries=config.max_queries,
                            max_documents=config.max_documents, key=key)
    exclude = np.full(len(s.query_ids), -1, np.int64)
    if config.ignore_identical_ids:
        index = {d: i for i, d in enumerate(s.document_ids)}
        exclude = np.array([index.get(q, -1) for q in s.query_ids], np.int64)
    return EncodedSet(
        queries=task.tokenize_texts(s.queries, "query"),
        documents=task.tokenize_texts(s.documents, "positive"),
        modalities=("text", "text"), qrels=s.qrels, exclude=exclude)


class InformationRetrievalEvaluator(Evaluator):
    type = "information_retrieval"
    requires = ("encode", "heldout_batches")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(
            data="",  # '' = built from the task's held-out pairs; else an MTEB-layout dir
            split="test",  # the qrels file of an MTEB-layout dir: qrels/<split>.tsv
            ndcg_at=(10,),  # nDCG@k for each k
            mrr_at=(10,),  # MRR@k for each k
            recall_at=(1, 5, 10),  # recall@k for each k
            map_at=(10,),  # MAP@k for each k
            max_queries=0,  # evaluate the first this many queries (0 = all)
            max_documents=0,  # corpus limit: judged documents + others up to it (0 = all)
            ignore_identical_ids=False,  # MTEB dir: never rank a document with the query's id
            seed=0,  # the built-in set's corpus order
        ))

    @classmethod
    def config_rules(cls, prefix: str):
        ks = [(prefix + key, lambda v: len(v) > 0 and all(int(k) == k >= 1 for k in v),
               "must be a non-empty list of ranks >= 1")
              for key in ("ndcg_at", "mrr_at", "recall_at", "map_at")]
        return [*ks,
                (prefix + "split", lambda v: bool(v), "must name a qrels split ('test')"),
                (prefix + "max_queries", lambda v: v >= 0, "must be >= 0 (0 = all)"),
                (prefix + "max_documents", lambda v: v >= 0, "must be >= 0 (0 = all)")]

    @functools.cached_property
    def retrieval_set(self) -> EncodedSet:
        """The set as model inputs, built once per run."""
        c, key = self.config, f"evals.{self.name}.data"
        if c.data:
            if not hasattr(self.task, "tokenize_texts"):
                raise ConfigError(
                    f"{key} = {c.data!r} (an MTEB text set) needs a task that tokenises "
                    f"texts (tokenize_texts); the {getattr(self.task, 'name', '?')!r} task "
                    f"has none. Leave {key} empty for the built-in set.")
            return mteb_set(self.task, c, key)
        if c.ignore_identical_ids:
            raise ConfigError(f"evals.{self.name}.ignore_identical_ids needs an MTEB set "
                              f"({key}): the built-in set has no ids.")
        for attr in ("query_modality", "positive_modality"):
            if not hasattr(self.task, attr):
                raise ConfigError(
                    f"evals.{self.name} (built-in set) needs a task with query and positive "
                    f"modalities; the {getattr(self.task, 'name', '?')!r} task has no {attr}. "
                    f"Set {key} to an MTEB retrieval directory.")
        return heldout_set(self.task, seed=c.seed, max_queries=c.max_queries,
                           max_documents=c.max_documents)

    def prepare(self, *, batch_size, process_index, process_count):
        """Read, check and tokenise the set now (a bad file fails before anything compiles)."""
        s = self.retrieval_set
        if len(s.queries) == 0 or len(s.documents) == 0:
            raise ConfigError(f"evals.{self.name}: the retrieval set has "
                              f"{len(s.queries)} queries and {len(s.documents)} documents; "
                              "it needs at least one of each.")

    def batches(self, *, batch_size, process_index, process_count):
        """This host's share of the queries, then of the documents."""
        s = self.retrieval_set
        kw = dict(batch_size=batch_size, process_index=process_index,
                  process_count=process_count)
        for role, rows in (("query", s.queries), ("document", s.documents)):
            yield from pipeline.eval_batches(pipeline.ArrayRows(
                {role: rows, f"{role}_index": np.arange(len(rows), dtype=np.int32)}), **kw)

    def step(self, params, batch, frozen):
        query_modality, document_modality = self.retrieval_set.modalities
        if "query" in batch:
            return {"query": self.task.encode(params, query_modality, batch["query"]),
                    "query_index": batch["query_index"]}
        return {"document": self.task.encode(params, document_modality, batch["document"]),
                "document_index": batch["document_index"]}

    def metrics(self, outputs) -> dict[str, float]:
        s, c = self.retrieval_set, self.config
        queries = outputs["query"][np.argsort(outputs["query_index"])]  # hosts interleave
        documents = outputs["document"][np.argsort(outputs["document_index"])]
        kmax = max(*c.ndcg_at, *c.mrr_at, *c.recall_at, *c.map_at)
        top, _ = top_k_by_similarity(queries, documents, kmax, exclude=s.exclude)
        metrics = ranking_metrics(top, s.qrels, ndcg_at=c.ndcg_at, mrr_at=c.mrr_at,
                                  recall_at=c.recall_at, map_at=c.map_at)
        return {**metrics, "queries": float(len(queries)), "documents": float(len(documents))}
