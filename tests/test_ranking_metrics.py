"""jaxtrain.metrics.ranking against a plain per-query NumPy reference (and hand-computed values)
on hand-made graded qrels: ties, several relevant documents, a query with none."""

import math

import numpy as np
import pytest

from jaxtrain.metrics.ranking import ranking_metrics, top_k_by_similarity, top_k_from_scores


def reference(scores, qrels, k_ndcg=10, k_mrr=10, recall_ks=(1, 5, 10), k_map=10):
    """One query at a time, as the formulas read: rank = sort by (-score, doc index)."""
    scores = np.asarray(scores, np.float64)
    totals = {f"ndcg@{k_ndcg}": 0.0, f"mrr@{k_mrr}": 0.0, f"map@{k_map}": 0.0,
              **{f"recall@{k}": 0.0 for k in recall_ks}}
    for q, judged in enumerate(qrels):
        order = sorted(range(scores.shape[1]), key=lambda j, q=q: (-scores[q, j], j))
        rels = [judged.get(j, 0) for j in order]
        relevant = [v for v in judged.values() if v > 0]
        dcg = sum(max(r, 0) / math.log2(i + 2) for i, r in enumerate(rels[:k_ndcg]))
        idcg = sum(r / math.log2(i + 2)
                   for i, r in enumerate(sorted(relevant, reverse=True)[:k_ndcg]))
        totals[f"ndcg@{k_ndcg}"] += dcg / idcg if idcg > 0 else 0.0
        first = next((i for i, r in enumerate(rels[:k_mrr]) if r > 0), None)
        totals[f"mrr@{k_mrr}"] += 0.0 if first is None else 1.0 / (first + 1)
        for k in recall_ks:
            hits = sum(1 for r in rels[:k] if r > 0)
            totals[f"recall@{k}"] += hits / len(relevant) if relevant else 0.0
        ap, hits = 0.0, 0
        for i, r in enumerate(rels[:k_map]):
            if r > 0:
                hits += 1
                ap += hits / (i + 1)
        totals[f"map@{k_map}"] += ap / len(relevant) if relevant else 0.0
    return {key: value / len(qrels) for key, value in totals.items()}


# 4 queries x 12 documents. Query 0: graded relevance, ties at the top; query 1: several
# relevant documents, one tied with a non-relevant one; query 2: only a relevance-0
# judgment (no relevant document: scores 0, counted); query 3: its relevant document ranked
# below 10 (nothing in the top 10).
SCORES = np.array([
    [0.9, 0.9, 0.9, 0.2, 0.1, 0.0, 0.0, 0.3, 0.3, 0.5, 0.4, 0.6],
    [0.1, 0.8, 0.8, 0.7, 0.2, 0.2, 0.6, 0.5, 0.0, 0.0, 0.3, 0.3],
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.9, 0.8, 0.7, 0.6, 0.1, 0.1],
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.0],
])
QRELS = [{2: 2, 0: 1, 9: 3, 5: 1}, {2: 1, 6: 1, 8: 1}, {4: 0}, {11: 1}]


def test_top_k_breaks_ties_by_document_index() -> None:
    ids = top_k_from_scores(SCORES, 4)
    np.testing.assert_array_equal(ids[0], [0, 1, 2, 11])
    np.testing.assert_array_equal(ids[1], [1, 2, 3, 6])


def test_hand_computed_values() -> None:
    top = top_k_from_scores(SCORES, 12)
    m = ranking_metrics(top, QRELS, ndcg_at=(3, 10), mrr_at=(1, 10), recall_at=(1, 5, 10),
                        map_at=(10,))
    # Query 0 ranks 0, 1, 2 (tied 0.9: by index), 11, 9, 10, 7, 8, 3, 4, 5, 6.
    # Gains 1, 0, 2, 0, 3, 0, 0, 0, 0, 0 | 1 (doc 5 at rank 11): DCG@3 = 1 + 2/2 = 2,
    # IDCG@3 = 3 + 2/log2(3) + 1/2.
    ndcg3_q0 = 2.0 / (3 + 2 / math.log2(3) + 0.5)
    # Query 1 ranks 1, 2, 3, 6, 7, 10, 11, 4, 5, 0, 8, 9: relevant at ranks 2, 4, 11.
    # DCG@3 = 1/log2(3), IDCG@3 = 1 + 1/log2(3) + 1/2.
    ndcg3_q1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3) + 0.5)
    assert m["ndcg@3"] == pytest.approx((ndcg3_q0 + ndcg3_q1) / 4)
    assert m["mrr@1"] == pytest.approx(1 / 4)  # only query 0 has a relevant document first
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2) / 4)
    assert m["recall@1"] == pytest.approx((1 / 4) / 4)
    assert m["recall@5"] == pytest.approx((3 / 4 + 2 / 3) / 4)
    # MAP@10: query 0 hits at ranks 1, 3, 5 over R=4; query 1 at 2, 4 over R=3.
    ap0 = (1 / 1 + 2 / 3 + 3 / 5) / 4
    ap1 = (1 / 2 + 2 / 4) / 3
    assert m["map@10"] == pytest.approx((ap0 + ap1) / 4)


def test_matches_reference_on_hand_made_qrels() -> None:
    got = ranking_metrics(top_k_from_scores(SCORES, 10), QRELS)
    assert got == pytest.approx(reference(SCORES, QRELS), abs=1e-12)
    assert set(got) == {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "map@10"}


def test_matches_reference_on_random_graded_qrels_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(40, 30)).astype(np.float64)  # many ties
    qrels = []
    for _ in range(40):
        docs = rng.choice(30, size=rng.integers(1, 6), replace=False)
        qrels.append({int(d): int(rng.integers(0, 4)) for d in docs})
    got = ranking_metrics(top_k_from_scores(scores, 10), qrels)
    assert got == pytest.approx(reference(scores, qrels), abs=1e-12)


def test_corpus_smaller_than_k() -> None:
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    qrels = [{0: 1}, {2: 2, 1: 1}]
    got = ranking_metrics(top_k_from_scores(scores, 10), qrels)
    assert got == pytest.approx(reference(scores, qrels), abs=1e-12)
    assert got["recall@10"] == 1.0


def test_similarity_top_k_equals_sorted_scores_in_chunks() -> None:
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(23, 8)).astype(np.float32)
    docs[[5, 17]] = docs[3]  # exact ties: equal rows score equally
    queries = rng.normal(size=(11, 8)).astype(np.float32)
    queries[2] = docs[3]
    scores = queries @ docs.T
    for chunk in (0, 1, 4):
        ids, top = top_k_by_similarity(queries, docs, 7, chunk_size=chunk)
        np.testing.assert_array_equal(ids, top_k_from_scores(scores, 7))
        np.testing.assert_allclose(top, np.take_along_axis(scores, ids, 1), rtol=1e-5)
    assert list(top_k_by_similarity(queries, docs, 3)[0][2]) == [3, 5, 17]


def test_similarity_top_k_exclude() -> None:
    docs = np.eye(4, dtype=np.float32)
    queries = np.eye(4, dtype=np.float32)[:2] + 0.1
    ids, _ = top_k_by_similarity(queries, docs, 2, exclude=np.array([0, -1]))
    np.testing.assert_array_equal(ids, [[1, 2], [1, 0]])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        top_k_from_scores(SCORES, 0)
    with pytest.raises(ValueError, match="len\\(qrels\\)"):
        ranking_metrics(np.zeros((2, 3), int), [{}])
