"""Ranking metrics of retrieval over a corpus: nDCG@k, MRR@k, recall@k, MAP@k (as MTEB reports
them through pytrec_eval / trec_eval), and the top-k documents of each query.

Inputs: for each of Q queries its ranked document indices (``top_ids`` ``[Q, K]``, best first)
and its graded judgments (``qrels[q] = {document index: relevance}``; a document missing from
``qrels[q]`` has relevance 0; relevance > 0 means relevant). With ``rel_i`` the relevance of the
document at rank i (1-based) and R_q the number of relevant documents of query q:

    DCG@k    = sum_{i<=k} max(rel_i, 0) / log2(i + 1)      (gain = relevance, trec_eval's
    nDCG@k   = DCG@k / IDCG@k                               ndcg_cut, used by MTEB and BEIR;
                                                             not the 2^rel - 1 gain variant)
    IDCG@k   = DCG@k of the judgments sorted by relevance, largest first
    MRR@k    = 1 / (rank of the first relevant document), 0 if none in the top k
    recall@k = #{relevant documents in the top k} / R_q     (trec_eval's recall_k)
    MAP@k    = sum_{i<=k, rel_i>0} precision@i / R_q         (trec_eval's map_cut_k)

Each is averaged over all Q queries. A query without a relevant document (R_q = 0: only
relevance-0 judgments) scores 0 on every metric and still counts in the mean, as trec_eval
and MTEB do (MTEB's MRR divides by the number of judged queries).

Ties: documents with equal scores are ranked by document index, lower first (a stable sort by
descending score; :func:`jax.lax.top_k` breaks ties the same way). trec_eval breaks ties by
document id instead, so tied scores may rank differently there; with real-valued embeddings
exact ties are rare.

Corpus size: :func:`top_k_by_similarity` scores queries against the corpus a chunk of queries
at a time on the default JAX device, so memory is O(chunk x N), never a full [Q, N] matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Score elements per chunk in top_k_by_similarity (2^25 float32 = 128 MiB).
CHUNK_ELEMENTS = 1 << 25


def top_k_from_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``min(k, N)`` best document indices of each query of a score matrix ``[Q, N]``,
    best first; ties by lower document index (stable sort). For small inputs: it sorts whole
    rows; use :func:`top_k_by_similarity` for a large corpus."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [queries, documents]; got shape {scores.shape}")
    _check_k(k)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@functools.partial(jax.jit, static_argnames="k")
def _chunk_top_k(queries: jax.Array, documents: jax.Array, exclude: jax.Array, k: int):
    scores = jnp.dot(queries, documents.T, preferred_element_type=jnp.float32)
    n = documents.shape[0]
    scores = jnp.where(jnp.arange(n)[None, :] == exclude[:, None], -jnp.inf, scores)
    return jax.lax.top_k(scores, k)


def top_k_by_similarity(
    queries: np.ndarray,
    documents: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    chunk_size: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [Q, min(k, N)], scores [Q, min(k, N)])``: each query's best documents by dot
    product (the cosine similarity of L2-normalised rows), computed in float32 on the default
    JAX device ``chunk_size`` queries at a time (0 = as many as keep a chunk's scores under
    2^25 elements). Ties by lower document index. ``exclude[q]`` (a document index, or -1)
    takes one document out of query q's ranking (MTEB's ``ignore_identical_ids``); an
    excluded document can still appear, last, when k exceeds the other documents."""
    q = np.asarray(queries, np.float32)
    d = np.asarray(documents, np.float32)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"queries and documents must be [Q, D] and [N, D]; got {q.shape} "
                         f"and {d.shape}")
    if d.shape[0] == 0:
        raise ValueError("top_k_by_similarity needs at least one document")
    _check_k(k)
    k = min(k, d.shape[0])
    exclude = (np.full(q.shape[0], -1, np.int32) if exclude is None
               else np.asarray(exclude, np.int32))
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // d.shape[0])
    chunk = min(chunk, max(q.shape[0], 1))
    docs = jnp.asarray(d)
    ids = np.zeros((q.shape[0], k), np.int64)
    scores = np.zeros((q.shape[0], k), np.float32)
    for start in range(0, q.shape[0], chunk):
        rows = min(chunk, q.shape[0] - start)
        # Pad the last chunk to the chunk size: one compiled shape per corpus.
        qc = np.zeros((chunk, q.shape[1]), np.float32)
        qc[:rows] = q[start:start + rows]
        ex = np.full(chunk, -1, np.int32)
        ex[:rows] = exclude[start:start + rows]
        s, i = jax.device_get(_chunk_top_k(jnp.asarray(qc), docs, jnp.asarray(ex), k))
        ids[start:start + rows], scores[start:start + rows] = i[:rows], s[:rows]
    return ids, scores


def ranking_metrics(
    top_ids: np.ndarray,
    qrels: Sequence[Mapping[int, float]],
    *,
    ndcg_at: Sequence[int] = (10,),
    mrr_at: Sequence[int] = (10,),
    recall_at: Sequence[int] = (1, 5, 10),
    map_at: Sequence[int] = (10,),
) -> dict[str, float]:
    """``ndcg@k``, ``mrr@k``, ``recall@k``, ``map@k`` (the module docstring's formulas) for
    each requested k, averaged over the queries.

    Args:
      top_ids: ``[Q, K]`` ranked document indices per query, best first, with K at least the
        largest k asked for or the corpus size (a shorter ranking is the whole corpus).
      qrels: Q mappings ``document index -> relevance`` (graded; > 0 = relevant).
    """
    top_ids = np.asarray(top_ids)
    if top_ids.ndim != 2 or top_ids.shape[0] != len(qrels):
        raise ValueError(f"top_ids must be [Q, K] with Q = len(qrels) = {len(qrels)}; got "
                         f"shape {top_ids.shape}")
    if top_ids.shape[0] == 0:
        raise ValueError("ranking_metrics needs at least one query")
    ks = [*ndcg_at, *mrr_at, *recall_at, *map_at]
    for k in ks:
        _check_k(k)
    width = top_ids.shape[1]
    rel = np.array([[float(judged.get(int(d), 0)) for d in row]
                    for row, judged in zip(top_ids, qrels, strict=True)],
                   np.float64).reshape(top_ids.shape)
    kmax = max(ks)
    ideal = np.zeros((len(qrels), kmax))
    num_rel = np.zeros(len(qrels))
    for q, judged in enumerate(qrels):
        positive = sorted((float(v) for v in judged.values() if v > 0), reverse=True)
        num_rel[q] = len(positive)
        ideal[q, :min(kmax, len(positive))] = positive[:kmax]
    gains = np.maximum(rel, 0.0)
    hit = rel > 0
    discount = 1.0 / np.log2(np.arange(2, max(kmax, width) + 2))
    out: dict[str, float] = {}
    for k in ndcg_at:
        dcg = (gains[:, :k] * discount[:min(k, width)]).sum(axis=1)
        idcg = (ideal[:, :k] * discount[:k]).sum(axis=1)
        out[f"ndcg@{k}"] = _mean(dcg, idcg)
    for k in mrr_at:
        first = np.argmax(hit[:, :k], axis=1)
        found = hit[:, :k].any(axis=1)
        out[f"mrr@{k}"] = float(np.mean(np.where(found, 1.0 / (first + 1), 0.0)))
    for k in recall_at:
        out[f"recall@{k}"] = _mean(hit[:, :k].sum(axis=1), num_rel)
    for k in map_at:
        h = hit[:, :k]
        precision = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)
        out[f"map@{k}"] = _mean((precision * h).sum(axis=1), num_rel)
    return out


def _mean(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """Mean of numerator / denominator over queries, 0 where the denominator is 0."""
    ratio = np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64),
                      where=denominator > 0)
    return float(np.mean(ratio))


def _check_k(k: int) -> None:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
