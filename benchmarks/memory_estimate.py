"""Per-device memory of a train step from shapes alone: the exact parts and an activation formula.

Exact (from the abstract train state and its shardings, nothing allocated):

    params    = sum over parameters    prod(shard_shape) * itemsize
    opt_state = sum over optimizer leaves prod(shard_shape) * itemsize   (AdamW: mu, nu, count)
    grads     = params                 (a gradient has its parameter's shape, dtype, sharding)

Leaves whose sharding's memory kind is ``pinned_host`` / ``unpinned_host`` count as host bytes;
the step brings offloaded state to the device for the update (jaxtrain/offload.py), and the TPU
compile shows that copy overlapping the peak, so the estimate's total counts it on the device too.

Estimated (Llama-family decoders; bytes per device, one microbatch of ``b`` rows of ``T``
tokens, ``c`` = bytes of the compute dtype, ``tp`` = the `tensor` mesh axis):

    saved     = L * b * T * per_token_layer(policy)        what the backward pass keeps
    transient = b * T * max(2 * per_token_layer('none'),   one layer recomputed with its
                            logits)                         gradients, or the fp32 logits
                + gathered                                  and, with FSDP, two layers'
    gathered  = 2 * layer_params * 4 bytes / tp             weights all-gathered in fp32
    total     = params + opt_state + grads + saved + transient + offloaded state

per_token_layer (elements per token, times c unless marked fp32):

    none           4D + 2*H*Dh + 2*K*Dh + 4F  +  H*T*(4 + c)/c   everything, and the attention
                                                                  scores (fp32 logits + probs) when
                                                                  the attention is XLA's (not cuDNN)
    dots           (2H + 2K)*Dh + 2D + 2F     +  H*T*4/c          every matmul output, QK^T too
    dots_no_batch  (H + 2K)*Dh + 2D + 2F                          the weight matmuls only
    attention_out  D + H*Dh                                       the block input and attention out
    full           D                                              the block input only
    offload_dots / offload_attention_out: dots_no_batch / attention_out on the host, D on the
                   device

with D = hidden, F = intermediate, H / K = query / key-value heads over tp, Dh = head dim,
logits = V * (8 + c) / tp bytes per token (fp32 logits, their gradient, the compute-dtype copy).
The formula is checked against the TPU compiler's figures by `benchmarks/memory_plan.py` (it
prints both); it is a planning figure, not what an allocator will report. Checked (libtpu
0.0.50.1, scan_layers, batch = 1 row of 4096 tokens per chip, FSDP over all chips, total GiB
per chip, estimate / TPU compile):

    Llama-7B   v5p-16   full 22.5 / 23.5   attention_out 23.5 / 25.5   dots_no_batch 31.9 / 37.3
                        dots 96.9 / 95.6   none 136.3 / >141.7 (temporaries alone; no fit)
    Llama-70B  v5p-128  full 42.1 / 41.7   attention_out 47.1 / 49.5   dots_no_batch 88.3 / 93.1

so within -15% .. +2%; dots_no_batch is the one it underestimates most (the TPU compiler keeps
more than the weight matmuls' outputs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

GIB = 1024**3
HOST_KINDS = ("pinned_host", "unpinned_host")
# activation-offload remat policies (jaxtrain.models.llama) -> the policy whose activations they
# send to the host
OFFLOADED = {"offload_dots": "dots_no_batch", "offload_attention_out": "attention_out"}


@dataclasses.dataclass
class StateBytes:
    """Exact per-device bytes of the train state (device-resident unless `host_*`)."""

    params: int
    opt_state: int
    grads: int
    other: int  # step, rng, frozen (a teacher, a LoRA base)
    host_params: int = 0
    host_opt_state: int = 0


def shard_bytes(x: Any, sharding: Any) -> int:
    """Bytes one device holds of an array of `x`'s shape and dtype under `sharding`."""
    shape = sharding.shard_shape(tuple(x.shape)) if hasattr(sharding, "shard_shape") else x.shape
    return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def tree_bytes(abstract: Any, shardings: Any) -> tuple[int, int]:
    """(device bytes, host bytes) one device holds of a tree of abstract arrays."""
    device = host = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        n = shard_bytes(x, s)
        if getattr(s, "memory_kind", None) in HOST_KINDS:
            host += n
        else:
            device += n
    return device, host


def state_bytes(abstract_state: Any, state_shardings: Any) -> StateBytes:
    """The exact part of the plan from a Trainer's `abstract_state` and `state_shardings`."""
    params, host_params = tree_bytes(abstract_state.params, state_shardings.params)
    opt, host_opt = tree_bytes(abstract_state.opt_state, state_shardings.opt_state)
    other = sum(tree_bytes(getattr(abstract_state, f), getattr(state_shardings, f))[0]
                for f in ("step", "rng", "frozen"))
    grads = sum(shard_bytes(x, s) for x, s in zip(
        jax.tree.leaves(abstract_state.params), jax.tree.leaves(state_shardings.params),
        strict=True))
    return StateBytes(params=params, opt_state=opt, grads=grads, other=other,
                      host_params=host_params, host_opt_state=host_opt)


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """What the activation formula needs of a Llama-family config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    compute_bytes: int
    flash_attention: bool  # cuDNN / Pallas / Splash flash attention: no T x T scores kept

    @classmethod
    def from_model_config(cls, model: Any) -> DecoderShape:
        """From a config's `model` block (LlamaConfig's keys)."""
        head_dim = model.get("head_dim", 0) or model.hidden_size // model.num_heads
        return cls(hidden=model.hidden_size, intermediate=model.intermediate_size,
                   heads=model.num_heads, kv_heads=model.num_kv_heads, head_dim=head_dim,
                   layers=model.num_layers, vocab=model.vocab_size,
                   compute_bytes=np.dtype(model.dtype).itemsize,
                   flash_attention=model.get("attention_impl") in ("cudnn", "pallas", "splash"))

    def layer_params(self) -> int:
        d, f, h, k, dh = self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim
        return d * (h + 2 * k) * dh + h * dh * d + 3 * d * f + 2 * d


def per_token_layer_bytes(m: DecoderShape, policy: str, seq_len: int, tp: int = 1) -> int:
    """Bytes one decoder layer keeps per token for the backward pass under `policy` (see the
    module docstring)."""
    c, d, f = m.compute_bytes, m.hidden, m.intermediate // tp
    h, k, dh = max(m.heads // tp, 1), max(m.kv_heads // tp, 1), m.head_dim
    scores = 0 if m.flash_attention else h * seq_len
    base = OFFLOADED.get(policy, policy)
    if base == "none":
        return c * (4 * d + 2 * h * dh + 2 * k * dh + 4 * f) + scores * (4 + c)
    if base == "dots":
        return c * ((2 * h + 2 * k) * dh + 2 * d + 2 * f) + scores * 4
    if base == "dots_no_batch":
        return c * ((h + 2 * k) * dh + 2 * d + 2 * f)
    if base == "attention_out":
        return c * (d + h * dh)
    if base == "full":
        return c * d
    raise ValueError(f"memory_estimate: no activation formula for remat policy {policy!r}; "
                     f"known: none, full, dots, dots_no_batch, attention_out, "
                     f"{', '.join(OFFLOADED)}.")


def activation_bytes(m: DecoderShape, policy: str, rows: int, seq_len: int, tp: int = 1,
                     fsdp: int = 1) -> dict[str, int]:
    """Estimated per-device activation bytes: `saved` (kept for the backward pass, on the
    device), `host` (offloaded by an offload_* policy) and `transient` (the working set of one
    layer's backward pass, the logits, and FSDP's gathered weights)."""
    tokens = rows * seq_len
    saved = m.layers * tokens * per_token_layer_bytes(m, policy, seq_len, tp)
    host = 0
    if policy in OFFLOADED:
        host, saved = saved, m.layers * tokens * m.compute_bytes * m.hidden
    logits = tokens * m.vocab * (8 + m.compute_bytes) // tp
    layer = 2 * tokens * per_token_layer_bytes(m, "none", seq_len, tp)
    gathered = 2 * m.layer_params() * 4 // tp if fsdp > 1 else 0
    return {"saved": saved, "host": host, "transient": max(layer, logits) + gathered}


def estimate(state: StateBytes, m: DecoderShape | None, policy: str, rows: int, seq_len: int,
             tp: int = 1, fsdp: int = 1) -> dict[str, float]:
    """The whole per-device estimate in GiB (activations None when the model is not a
    Llama-family decoder)."""
    out = {"params": state.params / GIB, "opt_state": state.opt_state / GIB,
           "grads": state.grads / GIB, "host_state": (state.host_params +
                                                      state.host_opt_state) / GIB}
    exact = state.params + state.opt_state + state.grads + state.other
    if m is None:
        out.update(activations=None, transient=None, total=None)
        return out
    act = activation_bytes(m, policy, rows, seq_len, tp, fsdp)
    out.update(activations=act["saved"] / GIB, host_activations=act["host"] / GIB,
               transient=act["transient"] / GIB,
               total=(exact + act["saved"] + act["transient"] + state.host_params
                      + state.host_opt_state) / GIB)
    return out
