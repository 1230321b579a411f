"""Dual-encoder losses: pure functions of L2-normalised embeddings.

Conventions shared by every loss here:

* ``query`` and ``key`` are ``[B, D]``; row ``i`` of each is a matched (positive) pair, every
  other row of the batch is a negative.
* ``hard_negatives`` (optional) is ``[B, N, D]``: N extra keys mined for each query. Following
  sentence-transformers' ``MultipleNegativesRankingLoss``, the hard negatives of the whole batch
  are flattened into ``B·N`` extra candidates that *every* query is scored against (not only the
  query they were mined for); they are never queries themselves.
* Embeddings are assumed already L2-normalised (dot product = cosine similarity). Logits are
  computed in float32 whatever the input dtype.
* Every function returns ``(loss, metrics)``; metrics are scalars.

Under ``jit`` with the batch sharded over devices, :func:`info_nce_loss` and
:func:`siglip_loss` see the *global* batch, and the compiler materialises the full ``[B, B]``
logits. :func:`sharded_info_nce_loss` and :func:`sharded_siglip_loss` compute the same values
and gradients with ``jax.shard_map``: each device scores only its local queries against the
all-gathered keys, so it holds a ``[B/n, B]`` logits block (n = devices over the batch axes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxtrain.axes import BATCH_AXES

Array = jax.Array
Metrics = dict[str, Array]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_scalar(name: str, x) -> None:
    if jnp.ndim(x) != 0:
        raise ValueError(f"{name} must be a scalar; got shape {jnp.shape(x)}.")


def _check_pair(a: Array, b: Array, names: tuple[str, str] = ("query", "key")) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both be [B, D] with equal shapes; got "
            f"{names[0]} {a.shape} and {names[1]} {b.shape}."
        )


def _check_hard_negatives(hard_negatives: Array | None, query: Array) -> None:
    if hard_negatives is None:
        return
    b, d = query.shape
    if hard_negatives.ndim != 3 or hard_negatives.shape[0] != b or hard_negatives.shape[2] != d:
        raise ValueError(
            f"hard_negatives must be [B, N, D] = [{b}, N, {d}] to match query {query.shape}; "
            f"got {hard_negatives.shape}."
        )


def _check_batch_axes(mesh: Mesh, batch_axes: Sequence[str], batch: int) -> tuple[str, ...]:
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"batch_axes {axes} name axes {missing} that the mesh {mesh.axis_names} lacks; "
            "pass batch_axes= the mesh axes the batch is split over."
        )
    n = math.prod(mesh.shape[a] for a in axes)
    if batch % n:
        raise ValueError(
            f"the batch size {batch} does not divide by the {n} devices of batch_axes {axes} "
            f"(mesh {dict(mesh.shape)}); use a batch size that is a multiple of {n}."
        )
    return axes


# --------------------------------------------------------------------------------------------
# Shared pieces (used by the global and the shard_map versions alike)
# --------------------------------------------------------------------------------------------


def _scale(logit_scale, max_logit_scale: float | None) -> Array:
    """``exp(logit_scale)``, clipped with ``min`` (zero gradient once clipped) if a max is set."""
    s = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    return s if max_logit_scale is None else jnp.minimum(s, max_logit_scale)


def _candidates(key: Array, hard_negatives: Array | None) -> Array:
    """``[K; H]``: the B keys then the B·N hard negatives flattened row-major, float32."""
    key = key.astype(jnp.float32)
    if hard_negatives is None:
        return key
    flat = hard_negatives.reshape(-1, hard_negatives.shape[-1]).astype(jnp.float32)
    return jnp.concatenate([key, flat], axis=0)


def _softmax_ce(logits: Array, labels: Array, axis: int = 1) -> tuple[Array, Array]:
    """``(Σ −log softmax(logits)[label], Σ [argmax = label])`` over the rows; ``axis`` is the
    class axis (0 scores the columns of ``logits`` as the rows of ``logits^T``)."""
    lse = jax.nn.logsumexp(logits, axis=axis)
    picked = jnp.take_along_axis(logits, jnp.expand_dims(labels, axis), axis=axis)
    nll = lse - jnp.squeeze(picked, axis)
    hits = jnp.argmax(logits, axis=axis) == labels
    return jnp.sum(nll), jnp.sum(hits.astype(jnp.float32))


def _info_nce_result(
    q2k_nll: Array, k2q_nll: Array, q2k_hits: Array, k2q_hits: Array, scale: Array, batch: int,
    symmetric: bool,
) -> tuple[Array, Metrics]:
    loss = (q2k_nll + k2q_nll) / (2 * batch) if symmetric else q2k_nll / batch
    return loss, {
        "loss": loss,
        "q2k_acc": q2k_hits / batch,
        "k2q_acc": k2q_hits / batch,
        "temperature": 1.0 / scale,
    }


def _siglip_sums(
    query: Array, candidates: Array, t: Array, bias: Array, labels: Array
) -> tuple[Array, Array]:
    """``(−Σ_ij log σ(z_ij · logits_ij), Σ_i [argmax_j logits_ij = label_i])`` for the given
    query rows against all candidates; ``z_ij = +1`` where ``j = label_i``, else −1."""
    logits = t * (query.astype(jnp.float32) @ candidates.T) + bias  # [rows, B + B·N]
    positive = jnp.arange(candidates.shape[0])[None, :] == labels[:, None]
    z = jnp.where(positive, 1.0, -1.0)
    nll = -jnp.sum(jax.nn.log_sigmoid(z * logits))
    hits = jnp.argmax(logits, axis=1) == labels
    return nll, jnp.sum(hits.astype(jnp.float32))


def _siglip_result(
    nll: Array, hits: Array, t: Array, bias: Array, batch: int
) -> tuple[Array, Metrics]:
    loss = nll / batch
    return loss, {"loss": loss, "q2k_acc": hits / batch, "temperature": 1.0 / t, "bias": bias}


# --------------------------------------------------------------------------------------------
# Global-batch losses
# --------------------------------------------------------------------------------------------


def info_nce_loss(
    query: Array,
    key: Array,
    logit_scale: Array,
    max_logit_scale: float = 100.0,
    *,
    hard_negatives: Array | None = None,
    symmetric: bool = True,
) -> tuple[Array, Metrics]:
    r"""InfoNCE (softmax cross-entropy over in-batch and hard negatives).

    With ``q_i``, ``k_i`` the rows of ``query``, ``key`` and ``H`` the ``B·N`` hard negatives
    flattened (row ``i·N + n`` is ``hard_negatives[i, n]``)::

        s       = min(exp(logit_scale), max_logit_scale)
        CE_q2k  = -1/B * sum_i log softmax(s * q_i . [K; H]^T)_i      (B + B·N candidates)
        CE_k2q  = -1/B * sum_j log softmax(s * k_j . Q^T)_j           (the B queries only)
        loss    = (CE_q2k + CE_k2q) / 2    if symmetric,   else CE_q2k

    Every query is scored against the hard negatives of the whole batch (sentence-transformers'
    ``MultipleNegativesRankingLoss`` convention); hard negatives are never queries, so the
    key->query direction ignores them. ``symmetric=True`` without hard negatives is CLIP's loss.
    Clipping uses ``min``, so the gradient w.r.t. ``logit_scale`` is zero once
    ``exp(logit_scale) > max_logit_scale``.

    Args:
      query: ``[B, D]`` L2-normalised query embeddings.
      key: ``[B, D]`` L2-normalised key embeddings; row ``i`` is query ``i``'s positive.
      logit_scale: scalar log of the inverse temperature s.
      max_logit_scale: upper bound on s.
      hard_negatives: optional ``[B, N, D]`` L2-normalised extra negatives.
      symmetric: add the key->query direction (static; a Python bool).

    Returns:
      ``(loss, metrics)``; metrics: ``'loss'``; ``'q2k_acc'``, the top-1 accuracy of each query
      over its ``B + B·N`` candidates; ``'k2q_acc'``, the top-1 accuracy of each key over the B
      queries (computed even when ``symmetric=False``); ``'temperature'`` = 1/s.
    """
    _check_pair(query, key)
    _check_hard_negatives(hard_negatives, query)
    _check_scalar("logit_scale", logit_scale)
    batch = query.shape[0]
    s = _scale(logit_scale, max_logit_scale)
    logits = s * (query.astype(jnp.float32) @ _candidates(key, hard_negatives).T)  # [B, B+B·N]
    labels = jnp.arange(batch)
    q2k_nll, q2k_hits = _softmax_ce(logits, labels, axis=1)
    k2q_nll, k2q_hits = _softmax_ce(logits[:, :batch], labels, axis=0)  # columns = keys
    return _info_nce_result(q2k_nll, k2q_nll, q2k_hits, k2q_hits, s, batch, symmetric)


def clip_loss(
    image_embeds: Array,
    text_embeds: Array,
    logit_scale: Array,
    max_logit_scale: float = 100.0,
) -> tuple[Array, Metrics]:
    r"""Symmetric InfoNCE (CLIP) loss over the batch it is given.

    Row ``i`` of ``image_embeds`` (x) and ``text_embeds`` (y) is a matched pair; every other
    row of the batch is a negative. Both are assumed to be already L2-normalised (so the dot
    product is the cosine similarity). With B the batch size::

        s    = min(exp(logit_scale), max_logit_scale)
        L_ij = s * <x_i, y_j>
        loss = 1/2 * [ CE(L, I) + CE(L^T, I) ]
        CE(L, I) = -1/B * sum_i log softmax(L_i)_i

    This is :func:`info_nce_loss` with query = images, key = texts, ``symmetric=True`` and no
    hard negatives, with CLIP's metric names. Under ``jit`` with the batch sharded over devices
    the inputs are the *global* batch, so negatives come from every device (the compiler
    inserts the needed gathers); :func:`sharded_info_nce_loss` avoids the full ``[B, B]`` block.

    Logits are computed in float32 (inputs are cast). Clipping uses ``min``, so the gradient
    with respect to ``logit_scale`` is zero once ``exp(logit_scale) > max_logit_scale``.

    Args:
      image_embeds: ``[B, D]`` L2-normalised image embeddings.
      text_embeds: ``[B, D]`` L2-normalised text embeddings.
      logit_scale: scalar log of the inverse temperature.
      max_logit_scale: upper bound on ``exp(logit_scale)``.

    Returns:
      ``(loss, metrics)`` where metrics has ``'loss'``, ``'i2t_acc'`` and ``'t2i_acc'``
      (in-batch top-1 accuracy, image->text and text->image) and ``'temperature'`` (1/s).
    """
    _check_pair(image_embeds, text_embeds, ("image_embeds", "text_embeds"))
    loss, m = info_nce_loss(image_embeds, text_embeds, logit_scale, max_logit_scale)
    return loss, {
        "loss": m["loss"],
        "i2t_acc": m["q2k_acc"],
        "t2i_acc": m["k2q_acc"],
        "temperature": m["temperature"],
    }


def siglip_loss(
    query: Array,
    key: Array,
    logit_scale: Array,
    logit_bias: Array,
    *,
    hard_negatives: Array | None = None,
    max_logit_scale: float | None = None,
) -> tuple[Array, Metrics]:
    r"""Pairwise sigmoid loss (SigLIP, Zhai et al. 2023).

    Every (query, candidate) pair is an independent binary classification::

        t         = exp(logit_scale)      (then min(t, max_logit_scale) if that is given)
        logits_ij = t * <q_i, c_j> + logit_bias,    c = [K; H]   (B + B·N candidates)
        z_ij      = +1 if j == i else -1            (every hard-negative column has z = -1)
        loss      = -1/B * sum_i sum_j log sigmoid(z_ij * logits_ij)

    The hard negatives of the whole batch are flattened (row ``i·N + n`` of H is
    ``hard_negatives[i, n]``) and scored against every query. The paper initialises
    ``logit_scale = log 10`` and ``logit_bias = -10``.

    Args:
      query: ``[B, D]`` L2-normalised query embeddings.
      key: ``[B, D]`` L2-normalised key embeddings; row ``i`` is query ``i``'s positive.
      logit_scale: scalar log of the temperature-inverse t.
      logit_bias: scalar bias b.
      hard_negatives: optional ``[B, N, D]`` L2-normalised extra negatives.
      max_logit_scale: optional upper bound on t (``None``: unclipped, as in the paper).

    Returns:
      ``(loss, metrics)``; metrics: ``'loss'``; ``'q2k_acc'``, the top-1 accuracy of each
      query over its candidates; ``'temperature'`` = 1/t; ``'bias'`` = b.
    """
    _check_pair(query, key)
    _check_hard_negatives(hard_negatives, query)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("logit_bias", logit_bias)
    batch = query.shape[0]
    t = _scale(logit_scale, max_logit_scale)
    bias = jnp.asarray(logit_bias, jnp.float32)
    nll, hits = _siglip_sums(query, _candidates(key, hard_negatives), t, bias, jnp.arange(batch))
    return _siglip_result(nll, hits, t, bias, batch)


# --------------------------------------------------------------------------------------------
# shard_map versions: a [B/n, B] logits block per device
# --------------------------------------------------------------------------------------------


def _local_labels(axes: tuple[str, ...], rows: int) -> Array:
    """Global row indices of this device's ``rows`` local rows."""
    return jax.lax.axis_index(axes) * rows + jnp.arange(rows)


def _gather(x: Array | None, axes: tuple[str, ...]) -> Array | None:
    """The global array from the local row blocks (in ``axis_index`` order)."""
    return None if x is None else jax.lax.all_gather(x, axes, tiled=True)


def sharded_info_nce_loss(
    query: Array,
    key: Array,
    logit_scale: Array,
    max_logit_scale: float = 100.0,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    hard_negatives: Array | None = None,
    symmetric: bool = True,
) -> tuple[Array, Metrics]:
    r""":func:`info_nce_loss` computed with ``jax.shard_map``; equal value, gradients, metrics.

    The global batch (``query``, ``key``, ``hard_negatives``) is split along its leading axis
    over ``batch_axes`` (n devices in all) and replicated over the other mesh axes. On each
    device, with ``Q_loc``/``K_loc`` its ``B/n`` rows at global offset ``o = axis_index · B/n``::

        K, H, Q  = all_gather(K_loc), all_gather(H_loc), all_gather(Q_loc)
        nll_q2k  = -sum_{i local} log softmax(s * q_i . [K; H]^T)_{o+i}   ([B/n, B+B·N] block)
        nll_k2q  = -sum_{j local} log softmax(s * k_j . Q^T)_{o+j}        ([B/n, B] block)
        loss     = psum(nll_q2k + nll_k2q) / (2B)   if symmetric,   else psum(nll_q2k) / B

    so each device materialises a ``[B/n, B(1+N)]`` (and ``[B/n, B]``) logits block instead of
    the global ``[B, B(1+N)]``. The queries are gathered for the key->query direction and the
    ``k2q_acc`` metric. Gradients flow back through the gathers (their transpose is a
    reduce-scatter), so they equal those of :func:`info_nce_loss`. Outputs are replicated.

    Args:
      query, key, logit_scale, max_logit_scale, hard_negatives, symmetric: as in
        :func:`info_nce_loss` (global shapes).
      mesh: the device mesh.
      batch_axes: mesh axes the batch is split over (default :data:`jaxtrain.mesh.BATCH_AXES`);
        B must divide by their total size.
    """
    _check_pair(query, key)
    _check_hard_negatives(hard_negatives, query)
    _check_scalar("logit_scale", logit_scale)
    batch = query.shape[0]
    axes = _check_batch_axes(mesh, batch_axes, batch)

    def local(q, k, hn, log_scale):
        s = _scale(log_scale, max_logit_scale)
        labels = _local_labels(axes, q.shape[0])
        candidates = _candidates(_gather(k, axes), _gather(hn, axes))
        q2k_logits = s * (q.astype(jnp.float32) @ candidates.T)  # [B/n, B + B·N]
        q2k_nll, q2k_hits = _softmax_ce(q2k_logits, labels)
        queries = _gather(q, axes).astype(jnp.float32)
        k2q_logits = s * (k.astype(jnp.float32) @ queries.T)  # [B/n, B]
        k2q_nll, k2q_hits = _softmax_ce(k2q_logits, labels)
        sums = jax.lax.psum((q2k_nll, k2q_nll, q2k_hits, k2q_hits), axes)
        return _info_nce_result(*sums, s, batch, symmetric)

    rows = P(axes)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(rows, rows, rows, P()), out_specs=P()
    )(query, key, hard_negatives, logit_scale)


def sharded_siglip_loss(
    query: Array,
    key: Array,
    logit_scale: Array,
    logit_bias: Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    hard_negatives: Array | None = None,
    max_logit_scale: float | None = None,
) -> tuple[Array, Metrics]:
    r""":func:`siglip_loss` computed with ``jax.shard_map``; equal value, gradients, metrics.

    The global batch is split along its leading axis over ``batch_axes`` (n devices) and
    replicated over the other mesh axes. Each device all-gathers the keys and hard negatives
    and scores its ``B/n`` local queries (global offset ``o = axis_index · B/n``)::

        logits_ij = t * <q_i, [K; H]_j> + b          ([B/n, B + B·N] block per device)
        z_ij      = +1 if j == o + i else -1
        loss      = -psum(sum_{i local} sum_j log sigmoid(z_ij * logits_ij)) / B

    so each device materialises a ``[B/n, B(1+N)]`` logits block instead of ``[B, B(1+N)]``.
    (The paper's chunked variant rotates key blocks with ``ppermute`` to avoid even the
    gathered keys; gathering the ``[B, D]`` keys is cheap next to the logits.) Outputs are
    replicated.

    Args:
      query, key, logit_scale, logit_bias, hard_negatives, max_logit_scale: as in
        :func:`siglip_loss` (global shapes).
      mesh: the device mesh.
      batch_axes: mesh axes the batch is split over (default :data:`jaxtrain.mesh.BATCH_AXES`);
        B must divide by their total size.
    """
    _check_pair(query, key)
    _check_hard_negatives(hard_negatives, query)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("logit_bias", logit_bias)
    batch = query.shape[0]
    axes = _check_batch_axes(mesh, batch_axes, batch)

    def local(q, k, hn, log_scale, logit_b):
        t = _scale(log_scale, max_logit_scale)
        bias = jnp.asarray(logit_b, jnp.float32)
        candidates = _candidates(_gather(k, axes), _gather(hn, axes))
        sums = _siglip_sums(q, candidates, t, bias, _local_labels(axes, q.shape[0]))
        return _siglip_result(*jax.lax.psum(sums, axes), t, bias, batch)

    rows = P(axes)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(rows, rows, rows, P(), P()), out_specs=P()
    )(query, key, hard_negatives, logit_scale, logit_bias)


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------


def _kl(p_logits: Array, q_logits: Array, axis: int) -> Array:
    """``KL(softmax(p) ‖ softmax(q))`` along ``axis`` (one value per slice)."""
    log_p = jax.nn.log_softmax(p_logits, axis=axis)
    log_q = jax.nn.log_softmax(q_logits, axis=axis)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)


def embedding_distillation_loss(
    student_query: Array,
    student_key: Array,
    teacher_query: Array,
    teacher_key: Array,
    student_scale: Array,
    teacher_scale: Array,
    temperature: float = 1.0,
    max_logit_scale: float = 100.0,
) -> tuple[Array, Metrics]:
    r"""Distil a dual encoder: the student matches the teacher's query–key similarities.

    Each model's in-batch logits use its own scale (log inverse temperature)::

        L_S = min(exp(student_scale), max_logit_scale) * Q_S K_S^T          [B, B]
        L_T = min(exp(teacher_scale), max_logit_scale) * Q_T K_T^T          [B, B]
        p_i = softmax(L_T[i, :] / T),   q_i = softmax(L_S[i, :] / T)         (query -> key)
        p'_j = softmax(L_T[:, j] / T),  q'_j = softmax(L_S[:, j] / T)        (key -> query)
        loss = T^2 * 1/2 * [ mean_i KL(p_i || q_i) + mean_j KL(p'_j || q'_j) ]
        KL(p || q) = sum_c p_c (log p_c - log q_c)

    The T² keeps the gradient scale independent of T (Hinton et al. 2015). Only the ``[B, B]``
    similarity matrices are compared, so teacher and student may have different embedding
    widths. The teacher gets no gradient (``stop_gradient`` on L_T). Embeddings are assumed
    L2-normalised; logits are float32.

    Args:
      student_query, student_key: ``[B, D_S]`` student embeddings; row ``i`` a matched pair.
      teacher_query, teacher_key: ``[B, D_T]`` teacher embeddings of the same B pairs.
      student_scale, teacher_scale: scalar log inverse temperatures of the two models.
      temperature: distillation temperature T > 0.
      max_logit_scale: upper bound on each ``exp(scale)``.

    Returns:
      ``(loss, metrics)``; metrics: ``'distill_kl'`` (= loss) and ``'distill_top1_agreement'``,
      the fraction of queries whose top-1 key is the same for student and teacher.
    """
    _check_pair(student_query, student_key, ("student_query", "student_key"))
    _check_pair(teacher_query, teacher_key, ("teacher_query", "teacher_key"))
    if student_query.shape[0] != teacher_query.shape[0]:
        raise ValueError(
            "student and teacher must embed the same batch; got student_query "
            f"{student_query.shape} and teacher_query {teacher_query.shape} (B differs)."
        )
    _check_scalar("student_scale", student_scale)
    _check_scalar("teacher_scale", teacher_scale)
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")

    def logits(q, k, log_scale):
        return _scale(log_scale, max_logit_scale) * (
            q.astype(jnp.float32) @ k.astype(jnp.float32).T
        )

    student = logits(student_query, student_key, student_scale)
    teacher = jax.lax.stop_gradient(logits(teacher_query, teacher_key, teacher_scale))
    row = jnp.mean(_kl(teacher / temperature, student / temperature, axis=1))
    col = jnp.mean(_kl(teacher / temperature, student / temperature, axis=0))
    loss = temperature**2 * 0.5 * (row + col)
    agree = jnp.argmax(student, axis=1) == jnp.argmax(teacher, axis=1)
    return loss, {"distill_kl": loss, "distill_top1_agreement": jnp.mean(agree.astype(jnp.float32))}
