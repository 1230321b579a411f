"""Self-attention over packed rows, dispatched to the best kernel for the backend.

:func:`attention` takes queries [B, T, H, D], keys and values [B, T, K, D] (grouped-query: query
head h reads key/value head h // (H / K)) and optional ``segment_ids`` [B, T] (packed rows: a
query attends only to keys of its own segment). It computes, per row b and head h,

    out[b, i, h] = sum_j softmax_j(s_ij) v[b, j, h // G],
    s_ij = scale · q[b, i, h] · k[b, j, h // G]    if allowed(i, j), else -inf

    allowed(i, j) = seg[b, i] == seg[b, j]  and  (not causal or j <= i)
                    and  (no window or  i - left <= j <= i + right)

with ``scale = D ** -0.5`` and ``window = (left, right)`` (``jax.nn.dot_product_attention``'s
``local_window_size``). Implementations (``impl``, the model's ``attention_impl``):

* ``'xla'``: ``jax.nn.dot_product_attention`` with the [B, 1, T, T] segment mask built here; XLA
  materialises the [B, H, T, T] scores (the reference the others are tested against).
* ``'cudnn'``: the same call with ``implementation='cudnn'`` (GPU): cuDNN flash attention; a
  segment mask goes to cuDNN as a [B, 1, T, T] bias.
* ``'pallas'``: the Pallas flash-attention kernel for GPUs
  (``jax.experimental.pallas.ops.gpu.attention.mha``, Triton) with segment ids: no T×T array in
  memory. Grouped-query keys/values are repeated to H heads; no sliding window.
* ``'splash'``: the Splash kernel for TPUs (``jax.experimental.pallas.ops.tpu.splash_attention``)
  with ``SegmentIds`` and a causal / local / full block-sparse mask: no T×T array in memory;
  grouped-query attention and sliding windows natively.
* ``'auto'`` (or None): TPU ``'splash'``; GPU ``'pallas'`` for packed rows without a window,
  else jax's own choice (cuDNN where it applies, else XLA); CPU ``'xla'``.

The kernels need T to be a multiple of their block size: rows are padded at the end with a
segment id no real token has (-1; padded queries see only padded keys, real ones never see them)
and the output is cut back to T. Compiled for a CPU the kernels run in Pallas interpret mode
(exact, slow: for tests). Under a mesh (``jax.set_mesh``) with flax logical-axis rules active,
the kernels run in ``jax.shard_map`` over the batch axes ('batch') and, when the head counts
divide, the tensor axis ('act_heads'): each device runs the kernel on its own rows and heads
(axes already manual, inside an outer ``shard_map``, are left alone).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxtrain.errors import ConfigError
from jaxtrain.models.layers import dot_product_attention

Array = jax.Array

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas", "splash")
PAD_SEGMENT = -1  # segment id of the positions padded to a kernel's block multiple


def check_impl(impl: str | None, where: str = "model.attention_impl") -> None:
    """Raises a ConfigError naming the choices unless ``impl`` is None or one of them."""
    if impl is not None and impl not in ATTENTION_IMPLS:
        raise ConfigError(
            f"{where} must be one of {', '.join(map(repr, ATTENTION_IMPLS))} (or None = 'auto'); "
            f"got {impl!r}. 'xla' is the portable one, 'cudnn'/'pallas' run on GPU, 'splash' on "
            "TPU, 'auto' picks the best for the backend.")


def resolve_impl(impl: str | None, backend: str, packed: bool, window: bool) -> str | None:
    """The implementation ``impl`` ('auto'/None resolved for ``backend`` 'cpu'/'gpu'/'tpu';
    ``packed``: segment ids given, ``window``: a sliding window). None = jax's own choice."""
    check_impl(impl)
    if impl not in (None, "auto"):
        return impl
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas" if packed and not window else None
    return "xla"


def attention(q: Array, k: Array, v: Array, *, segment_ids: Array | None = None,
              causal: bool = True, window: tuple[int, int] | None = None,
              impl: str | None = None, interpret: bool | None = None) -> Array:
    """Attention of ``q`` [B, T, H, D] over ``k``, ``v`` [B, T, K, D] -> [B, T, H, D] in q's
    dtype (formula in the module docstring). ``segment_ids`` [B, T] int (None: one segment),
    ``causal``, ``window`` = (left, right) tokens or None, ``impl`` one of
    :data:`ATTENTION_IMPLS` or None (= 'auto'); ``interpret`` runs the Pallas kernels in
    interpret mode (default None: decided when lowering, by ``jax.lax.platform_dependent`` —
    interpret mode for a CPU, the compiled kernel for anything else, so a TPU program compiled
    ahead of time on a CPU host gets the real kernel)."""
    b, t, h, d = q.shape
    if k.shape[2] == 0 or h % k.shape[2]:
        raise ConfigError(f"attention: query heads ({h}) must be a multiple of key/value heads "
                          f"({k.shape[2]})")
    chosen = resolve_impl(impl, jax.default_backend(), segment_ids is not None,
                          window is not None)
    if chosen in (None, "xla", "cudnn"):
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                     local_window_size=window, implementation=chosen)
    if chosen == "pallas" and window is not None:
        raise ConfigError(
            "model.attention_impl='pallas' (the Pallas GPU flash kernel) has no sliding window, "
            f"but this model attends within window {window} (model.sliding_window): use "
            "attention_impl='cudnn' or 'xla' on GPU, 'splash' on TPU.")
    kernel = functools.partial(_pallas_gpu if chosen == "pallas" else _splash, causal=causal,
                               window=window)
    if interpret is not None:
        return _sharded(functools.partial(kernel, interpret=interpret), q, k, v, segment_ids)

    def by_platform(q, k, v, segment_ids):
        return jax.lax.platform_dependent(
            q, k, v, segment_ids, cpu=functools.partial(kernel, interpret=True),
            default=functools.partial(kernel, interpret=False))

    return _sharded(by_platform, q, k, v, segment_ids)


def _sharded(kernel, q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
    """``kernel(q, k, v, segment_ids)``, inside ``jax.shard_map`` over the active mesh's batch
    (and, where the head counts divide, head) axes when one is set; else called as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", None))

    def axes(entry) -> tuple[str, ...]:  # an entry's mesh axes, less absent or manual ones
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        return tuple(n for n in names if n in mesh.shape and n not in mesh.manual_axes)

    def size(names: tuple[str, ...]) -> int:
        return math.prod(mesh.shape[n] for n in names)

    batch, heads = axes(spec[0]), axes(spec[2])
    if q.shape[0] % size(batch):
        batch = ()
    if q.shape[2] % size(heads) or k.shape[2] % size(heads):
        heads = ()
    if not batch and not heads:
        return kernel(q, k, v, segment_ids)
    bspec, hspec = batch or None, heads or None
    qkv = PartitionSpec(bspec, None, hspec, None)
    if segment_ids is None:
        fn = jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh,
                           in_specs=(qkv, qkv, qkv), out_specs=qkv, check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(bspec, None)),
                       out_specs=qkv, check_vma=False)
    return fn(q, k, v, segment_ids)


def _pad_rows(q: Array, k: Array, v: Array, segment_ids: Array | None, padded: int):
    """Pads the T axis to ``padded``; the padding gets segment :data:`PAD_SEGMENT` (segment ids
    are made, all 0, when there were none). Returns (q, k, v, segment_ids or None)."""
    b, t = q.shape[:2]
    if padded == t:
        return q, k, v, (None if segment_ids is None else segment_ids.astype(jnp.int32))
    widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, padded - t)), constant_values=PAD_SEGMENT)
    return q, k, v, seg


def _pallas_gpu(q: Array, k: Array, v: Array, segment_ids: Array | None, *, causal: bool,
                window: tuple[int, int] | None, interpret: bool) -> Array:
    """The Pallas GPU (Triton) flash kernel with segment ids; T padded to its block size (128,
    or the power of two >= 16 covering T when shorter)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    del window  # refused by the caller
    t, h, d = q.shape[1], q.shape[2], q.shape[3]
    block = 128 if t > 128 else max(16, 1 << (t - 1).bit_length())
    padded = -(-t // block) * block
    group = h // k.shape[2]
    if group > 1:  # the kernel wants H key/value heads: query head i reads kv head i // group
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    q, k, v, seg = _pad_rows(q, k, v, segment_ids, padded)
    bwd = min(32, block)
    sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=bwd,
                                     block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)
    out = gpu_attention.mha(q, k, v, seg, sm_scale=d ** -0.5, causal=causal,
                            block_sizes=sizes, interpret=interpret)
    return out[:, :t]


def _splash(q: Array, k: Array, v: Array, segment_ids: Array | None, *, causal: bool,
            window: tuple[int, int] | None, interpret: bool) -> Array:
    """The TPU Splash kernel (vmapped over rows, [H, T, D] layout) with SegmentIds and a
    causal / local / full mask; T padded to a multiple of 128 (blocks of 512, 256 or 128)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    t, h, d = q.shape[1], q.shape[2], q.shape[3]
    padded = -(-t // 128) * 128
    block = next(s for s in (512, 256, 128) if padded % s == 0)
    q, k, v, seg = _pad_rows(q, k, v, segment_ids, padded)
    shape = (padded, padded)
    if window is not None:
        left, right = window
        mask = sm.LocalMask(shape, (left, min(right, 0) if causal else right), offset=0)
    else:
        mask = sm.CausalMask(shape) if causal else sm.FullMask(shape)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([mask] * h), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    q = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    if seg is None:
        out = jax.vmap(lambda q, k, v: kernel(q, k, v))(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
            q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
