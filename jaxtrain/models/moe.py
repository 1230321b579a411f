"""Top-k mixture of SwiGLU experts: dropless (grouped matmul) or with a capacity factor.

Every token picks its k most probable experts; its output is the sum over its experts of
``w_j · expert_j(x)``, with w = the top-k probabilities renormalised to sum to 1 (Mixtral's
routing), ``expert_j(x) = down_j(silu(gate_j(x)) * up_j(x))``. Two ways to run the experts
(``impl``, ``LlamaConfig.moe_impl``):

``'dropless'`` (the default): no token is dropped. The B·T·k token-expert assignments are sorted
by expert (a stable argsort), the tokens gathered in that order, and the experts run as one
grouped matmul per projection, ``jax.lax.ragged_dot(x_sorted [N·k, D], W [C, D, F],
group_sizes [C])`` (rows ``start_e .. start_e + n_e − 1`` use expert e's weights); the outputs
are un-sorted and summed with their weights. Cost: the active-parameter FLOPs (k of C experts
per token) wherever the backend has a native ragged dot (the TPU compiler). JAX lowers
``ragged_dot`` on CPU (and XLA:GPU by default) to a masked dense dot over all C groups, which
costs C times the expert FLOPs and C copies of the sorted tokens: right, but not fast.

``'capacity'``: GShard/Switch dispatch. Each sequence is a routing group of T tokens; an expert
takes at most ``capacity = ceil(k · T · capacity_factor / C)`` tokens per sequence, filled
first-choice-first (all tokens' first choices, then their second, ...); assignments beyond it
are dropped (the token keeps its residual). Dispatch is by one-hot einsums through a [B, T, C,
capacity] tensor, so GSPMD turns it into all-to-alls when the expert weights are sharded over
the mesh's ``expert`` axis; its memory and FLOPs grow as k · T² · capacity_factor per sequence.

Expert parallelism of the dropless path (a mesh with an ``expert`` axis E > 1, active while the
step is traced, C divisible by E and the batch by the data-parallel size): a ``jax.shard_map``
manual over the axes that split the rows (``data``, ``fsdp``, ``expert``; ``tensor`` stays with
GSPMD). Each of the E shards of an ``expert`` group holds C/E experts ([C/E, D, F]: the weights
are never gathered over ``expert``) and b rows. It routes its rows, all-gathers them with their
chosen experts and weights over ``expert`` (E·b rows), runs the ragged dot over the assignments
routed to its own experts (the others are sorted last, outside every group, and masked), and a
reduce-scatter (``psum_scatter``) over ``expert`` sums each row's expert outputs back onto the
shard that owns the row. All-gather + reduce-scatter rather than a ragged all-to-all: static
shapes, no per-shard buffer size to guess (nothing dropped), and the same collectives as FSDP;
it moves E times the rows of an all-to-all, which is cheap next to the expert matmuls at MoE
sizes. The ragged dot's rows are sized for the worst case (all E·b·T·k assignments on one
shard), so a backend without a native ragged dot pays that size. Without such a mesh (none, E =
1, or sizes that do not divide) the same code runs unsharded and GSPMD places it.

The module computes no loss: it returns what the router did (its logits, the chosen experts, the
dropped fraction: 0 for dropless) and the task applies :mod:`jaxtrain.losses.router` to it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtrain.axes import BATCH_AXES
from jaxtrain.errors import ConfigError
from jaxtrain.models.layers import Dtype, partitioned

Array = jax.Array

IMPLS = ("dropless", "capacity")
EXPERT_AXIS = "expert"  # the mesh axis the dropless path splits the experts over


def route(probs: Array, k: int) -> tuple[Array, Array]:
    """Top-k routing: (expert_index [..., k], weights [..., k]), the weights the top-k
    probabilities renormalised to sum to 1."""
    top_p, top_i = jax.lax.top_k(probs, k)
    return top_i, top_p / jnp.sum(top_p, axis=-1, keepdims=True)


def dispatch_and_combine(
    probs: Array, k: int, capacity: int
) -> tuple[Array, Array, Array, Array]:
    """Routing of one batch of groups. ``probs`` [B, T, C] (float32).

    Returns (dispatch [B, T, C, cap] 0/1, combine [B, T, C, cap] weights, expert_index [B, T, k],
    kept fraction of the k·T assignments per group [B])."""
    b, t, c = probs.shape
    top_i, weights = route(probs, k)  # [B, T, k]
    choice = jax.nn.one_hot(top_i, c, dtype=jnp.int32)  # [B, T, k, C]
    # Priority: choice 0 of every token, then choice 1, ... (choice-major order).
    order = choice.transpose(0, 2, 1, 3).reshape(b, k * t, c)
    slot = jnp.cumsum(order, axis=1) - 1  # position in the expert's buffer
    kept = order * (slot < capacity)
    slot = jnp.where(kept > 0, slot, 0)
    one_slot = jax.nn.one_hot(slot, capacity, dtype=probs.dtype) * kept[..., None]
    one_slot = one_slot.reshape(b, k, t, c, capacity).transpose(0, 2, 1, 3, 4)  # [B,T,k,C,cap]
    dispatch = jnp.sum(one_slot, axis=2)
    combine = jnp.einsum("btk,btkce->btce", weights, one_slot)
    kept_fraction = jnp.sum(kept, axis=(1, 2)) / (k * t)
    return dispatch, combine, top_i, kept_fraction


def dropless_experts(
    x: Array, expert_index: Array, weights: Array, gate: Array, up: Array, down: Array,
    first_expert: Array | int = 0,
) -> Array:
    """``y_n = Σ_j w_nj · down_e(silu(x_n gate_e) * (x_n up_e))`` over the assignments (n, j) whose
    expert ``e = expert_index[n, j]`` is one of the G experts held here (``first_expert ..
    first_expert + G − 1``, G = ``gate.shape[0]``); the others contribute 0.

    ``x`` [N, D], ``expert_index`` / ``weights`` [N, k], ``gate`` / ``up`` [G, D, F], ``down``
    [G, F, D]. The N·k assignments are sorted by local expert (others last, in no group), the
    tokens gathered in that order and each projection run as one ``jax.lax.ragged_dot`` with
    ``group_sizes`` = the assignments per expert; the outputs are un-sorted and combined."""
    n, k = expert_index.shape
    g = gate.shape[0]
    local = expert_index.reshape(n * k) - first_expert
    mine = (local >= 0) & (local < g)
    key = jnp.where(mine, local, g).astype(jnp.int32)  # g: not here, sorted last
    order = jnp.argsort(key, stable=True)  # assignment indices, grouped by expert
    group_sizes = jnp.bincount(key, length=g + 1)[:g].astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [N·k, D]
    h = nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(
        xs, up, group_sizes)
    out = jax.lax.ragged_dot(h, down, group_sizes)  # [N·k, D]
    # Rows past sum(group_sizes) belong to no group: zero them whatever the backend leaves there.
    out = jnp.where(jnp.take(mine, order)[:, None], out, 0)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    out = jnp.take(out, inverse, axis=0).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


def _expert_mesh(num_experts: int, batch: int):
    """The mesh in context when the dropless path can split the experts over its ``expert`` axis
    (size E > 1 dividing C, the batch divisible by the rows' axes); None otherwise (then GSPMD
    places everything)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.manual_axes:
        return None  # no mesh, no expert axis, or already inside a shard_map
    e = mesh.shape[EXPERT_AXIS]
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
    if e == 1 or num_experts % e or batch % rows:
        return None
    return mesh


def sharded_dropless_experts(
    x: Array, probs: Array, k: int, gate: Array, up: Array, down: Array, mesh,
) -> tuple[Array, Array]:
    """:func:`dropless_experts` under a ``shard_map`` manual over the rows' mesh axes
    (:data:`jaxtrain.axes.BATCH_AXES`: ``data``, ``fsdp``, ``expert``; ``tensor`` stays with
    GSPMD): rows ([B, ...] inputs) split as the batch is, experts ([C, ...] weights) over
    ``expert`` (gathered over ``fsdp`` on entry, like any FSDP weight). Each shard routes its
    own rows (top-k of ``probs``), all-gathers the rows of its ``expert`` group with their
    choices, computes its own experts' share of every row, and a reduce-scatter over ``expert``
    sums the shares onto the shard that owns the row. ``x`` [B, T, D], ``probs`` [B, T, C];
    returns (y [B, T, D], expert_index [B, T, k])."""

    def local(x, probs, gate, up, down):
        top_i, w = route(probs, k)
        x, idx, w = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
                     for a in (x, top_i, w))
        b, t, d = x.shape
        first = jax.lax.axis_index(EXPERT_AXIS) * gate.shape[0]
        y = dropless_experts(x.reshape(b * t, d), idx.reshape(b * t, -1),
                             w.reshape(b * t, -1), gate, up, down, first)
        y = jax.lax.psum_scatter(y.reshape(b, t, d), EXPERT_AXIS, scatter_dimension=0,
                                 tiled=True)
        return y, top_i

    row_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    rows, experts = P(row_axes), P(EXPERT_AXIS)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(rows, rows, experts, experts, experts),
        out_specs=(rows, rows), axis_names=set(row_axes),
    )(x, probs, gate, up, down)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts. Returns (y [B, T, D], stats) with the router's statistics:
    ``router_logits`` [B, T, C] float32, ``expert_index`` [B, T, k] (each token's chosen experts,
    before any capacity drop) and ``dropped_fraction`` (the share of the k·T assignments per
    group over capacity, averaged over groups; 0 for ``impl='dropless'``)."""

    num_experts: int  # C
    num_experts_per_tok: int  # k
    intermediate_size: int  # F of each expert
    capacity_factor: float  # used by impl='capacity'
    initializer_range: float
    dtype: Dtype = jnp.float32  # compute dtype (router and parameters are float32)
    impl: str = "dropless"  # one of IMPLS

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        if self.impl not in IMPLS:
            raise ConfigError(f"model.moe_impl must be one of {list(IMPLS)}; got {self.impl!r}")
        b, t, d = x.shape
        c, k, f = self.num_experts, self.num_experts_per_tok, self.intermediate_size
        dt = self.dtype
        init = nn.initializers.normal(stddev=self.initializer_range)
        logits = nn.Dense(
            c, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
            kernel_init=partitioned(init, ("embed", None)), name="router",
        )(x.astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)

        def expert_param(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
            return self.param(name, partitioned(init, axes), shape, jnp.float32).astype(dt)

        gate = expert_param("gate_proj", (c, d, f), ("expert", "embed", "mlp"))
        up = expert_param("up_proj", (c, d, f), ("expert", "embed", "mlp"))
        down = expert_param("down_proj", (c, f, d), ("expert", "mlp", "embed"))

        if self.impl == "dropless":
            mesh = _expert_mesh(c, b)
            if mesh is not None:
                y, top_i = sharded_dropless_experts(x.astype(dt), probs, k, gate, up, down, mesh)
            else:
                top_i, weights = route(probs, k)
                y = dropless_experts(x.astype(dt).reshape(b * t, d), top_i.reshape(b * t, k),
                                     weights.reshape(b * t, k), gate, up, down).reshape(b, t, d)
            dropped = jnp.zeros((), jnp.float32)
        else:
            capacity = max(1, math.ceil(k * t * self.capacity_factor / c))
            dispatch, combine, top_i, kept = dispatch_and_combine(probs, k, capacity)
            xin = jnp.einsum("btd,btce->bced", x.astype(dt), dispatch.astype(dt))
            xin = nn.with_logical_constraint(xin, ("expert_batch", "act_expert", None, "act_embed"))
            h = nn.silu(jnp.einsum("bced,cdf->bcef", xin, gate)) * jnp.einsum(
                "bced,cdf->bcef", xin, up)
            out = jnp.einsum("bcef,cfd->bced", h, down)
            out = nn.with_logical_constraint(out, ("expert_batch", "act_expert", None, "act_embed"))
            y = jnp.einsum("bced,btce->btd", out, combine.astype(dt))
            dropped = 1.0 - jnp.mean(kept)
        stats = {"router_logits": logits, "expert_index": top_i, "dropped_fraction": dropped}
        return y, stats
