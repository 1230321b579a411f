"""Tests for jaxtrain.metrics.retrieval.retrieval_metrics."""

import numpy as np
import pytest

from jaxtrain.metrics.retrieval import retrieval_metrics


def test_identity_gives_perfect_recall() -> None:
    x = np.eye(7, 10)
    m = retrieval_metrics(3.0 * x, x)  # scale must not matter (cosine similarity)
    for key in ("i2t/recall@1", "i2t/recall@5", "t2i/recall@1", "t2i/recall@5", "mean_recall@1"):
        assert m[key] == 1.0
    assert m["i2t/mean_rank"] == 1.0 and m["t2i/mean_rank"] == 1.0
    assert set(m) == {
        "i2t/recall@1", "i2t/recall@5", "t2i/recall@1", "t2i/recall@5",
        "i2t/mean_rank", "t2i/mean_rank", "mean_recall@1",
    }  # fmt: skip


def test_cyclic_shift_permutation() -> None:
    # Text i is one-hot at (i - 1) % n: the true match has similarity 0, one wrong candidate
    # has 1 and the other n - 2 tie with the true match at 0 -> pessimistic rank = n.
    n = 6
    img = np.eye(n)
    txt = np.roll(np.eye(n), 1, axis=0)
    m = retrieval_metrics(img, txt, ks=(1, 5, 6))
    assert m["i2t/recall@1"] == 0.0 and m["t2i/recall@1"] == 0.0
    assert m["i2t/recall@5"] == 0.0 and m["i2t/recall@6"] == 1.0
    assert m["i2t/mean_rank"] == n and m["t2i/mean_rank"] == n
    assert m["mean_recall@1"] == 0.0


def test_hand_built_ranks() -> None:
    # 2-D unit vectors at chosen angles so the similarity ordering is known exactly.
    def at(deg):
        r = np.deg2rad(np.asarray(deg, dtype=np.float64))
        return np.stack([np.cos(r), np.sin(r)], axis=1)

    img = at([0, 90, 180])
    # text 0 at 10 deg (closest image: 0 -> rank 1); text 1 at 170 (closest: image 2, then 1);
    # text 2 at 185 (closest: image 2).
    txt = at([10, 170, 185])
    m = retrieval_metrics(img, txt, ks=(1, 2))
    # i2t: image 0 sims to texts [cos10, cos170, cos185] -> text 0 rank 1.
    # image 1 (90): sims [cos80, cos80, cos95] -> text 1 ties text 0 -> pessimistic rank 2.
    # image 2 (180): sims [cos170, cos10, cos5] -> text 2 rank 1.
    assert m["i2t/recall@1"] == pytest.approx(2 / 3)
    assert m["i2t/recall@2"] == 1.0
    assert m["i2t/mean_rank"] == pytest.approx(4 / 3)
    # t2i: text 0 -> image 0 rank 1; text 1 (170) -> images [cos170, cos80, cos10] -> image 1
    # rank 2; text 2 (185) -> images [cos185, cos95, cos5] -> image 2 rank 1.
    assert m["t2i/recall@1"] == pytest.approx(2 / 3)
    assert m["t2i/mean_rank"] == pytest.approx(4 / 3)
    assert m["mean_recall@1"] == pytest.approx(2 / 3)


def test_permutation_with_known_ranks() -> None:
    # Texts are the images under a permutation that swaps two pairs.
    n = 8
    rng = np.random.default_rng(0)
    img = rng.normal(size=(n, 16))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    perm = np.array([0, 1, 2, 3, 5, 4, 7, 6])  # swap pairs (4, 5) and (6, 7)
    txt = img[perm]
    m = retrieval_metrics(img, txt, ks=(1, 5))
    # Pairs 0..3 match exactly (rank 1). For i in {4,5,6,7} the text that equals image i sits
    # at the partner index, so the true match is never the best (rank >= 2).
    assert m["i2t/recall@1"] == pytest.approx(0.5)
    assert m["t2i/recall@1"] == pytest.approx(0.5)
    assert m["i2t/mean_rank"] > 1.0


def test_large_input_is_chunked_and_consistent() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(size=(2500, 8)).astype(np.float32)
    txt = img + 0.5 * rng.normal(size=img.shape).astype(np.float32)
    m = retrieval_metrics(img, txt, ks=(1, 5, 10))
    # Reference without chunking.
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = a.astype(np.float64) @ b.astype(np.float64).T
    ranks = (sim >= np.diag(sim)[:, None]).sum(axis=1)
    assert m["i2t/recall@1"] == pytest.approx(np.mean(ranks <= 1))
    assert m["i2t/recall@10"] == pytest.approx(np.mean(ranks <= 10))
    assert m["i2t/mean_rank"] == pytest.approx(ranks.mean())
    assert 0.0 <= m["t2i/recall@5"] <= 1.0


def test_errors() -> None:
    x = np.eye(3)
    with pytest.raises(ValueError, match="equal shapes"):
        retrieval_metrics(x, x[:2])
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_metrics(x, x, ks=(0,))
    with pytest.raises(ValueError, match="at least one"):
        retrieval_metrics(np.zeros((0, 3)), np.zeros((0, 3)))
