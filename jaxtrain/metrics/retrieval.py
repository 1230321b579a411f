"""Image-text retrieval metrics (NumPy, host side)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_CHUNK = 1024


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _ranks(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """1-based rank of ``keys[i]`` among all keys for ``queries[i]`` (pessimistic ties).

    rank_i = #{j : sim(q_i, k_j) >= sim(q_i, k_i)}, so a tied wrong candidate ranks ahead of
    the true match. Computed in row chunks: memory is O(chunk * N).
    """
    n = queries.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        sim = queries[start:stop] @ keys.T  # [chunk, N]
        rows = np.arange(stop - start)
        true = sim[rows, np.arange(start, stop)]
        ranks[start:stop] = np.sum(sim >= true[:, None], axis=1)
    return ranks


def retrieval_metrics(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    ks: Sequence[int] = (1, 5),
    names: tuple[str, str] = ("i2t", "t2i"),
) -> dict[str, float]:
    """Recall@k and mean rank for paired image/text embeddings (row i of each is a pair).

    Similarity is the cosine similarity (rows are L2-normalised here, in float64). The rank of
    the true match is 1-based and ties are broken pessimistically: every other candidate whose
    similarity equals the true match's counts as ranked ahead of it.

    Returns keys ``i2t/recall@{k}``, ``t2i/recall@{k}`` for each k in ``ks`` (fractions in
    [0, 1]), ``i2t/mean_rank``, ``t2i/mean_rank`` and ``mean_recall@1`` (mean of the two
    recall@1, always reported). ``names`` renames the two directions (the first embeds are
    the queries: e.g. ``("q2p", "p2q")`` for query/positive text pairs).
    """
    img = np.asarray(image_embeds)
    txt = np.asarray(text_embeds)
    if img.ndim != 2 or txt.ndim != 2 or img.shape != txt.shape:
        raise ValueError(
            f"image_embeds and text_embeds must be [N, D] with equal shapes; "
            f"got {img.shape} and {txt.shape}"
        )
    if img.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    ks = tuple(ks)
    if any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers; got {ks}")
    img, txt = _normalize(img), _normalize(txt)
    forward, backward = names
    ranks = {forward: _ranks(img, txt), backward: _ranks(txt, img)}
    out: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            out[f"{direction}/recall@{int(k)}"] = float(np.mean(r <= k))
        out[f"{direction}/mean_rank"] = float(np.mean(r))
    out["mean_recall@1"] = float(
        0.5 * (np.mean(ranks[forward] <= 1) + np.mean(ranks[backward] <= 1)))
    return out
