"""Batched autoregressive decoding of a Llama-family model with a KV cache, on any mesh.

    gen = Generator(cfg, params)                       # params: scanned or unrolled, np or jax
    outs = gen.generate([[1, 5, 9], [1, 7]], SamplingConfig(max_new_tokens=32, eos_ids=(2,)))
    outs[0].tokens, outs[0].finish_reason              # new tokens (stop token kept), 'stop'

How a call runs:

* Prompts are LEFT-padded to a bucketed length ``P`` (the next power of two, >= 16), the batch
  to a bucketed size (the next power of two, rounded up to a multiple of the mesh's
  data-parallel size; the extra rows are dummies, dropped after); a row's positions count its
  real tokens from 0. The cache holds ``P + N`` slots, ``N`` = max_new_tokens bucketed the same
  way. So one compiled program serves every call with the same (batch bucket, prompt bucket,
  new-token bucket, sampling mode); :attr:`Generator.compiled_keys` lists them.
* One jitted program per call: the whole prompt in one forward pass (prefill), then a
  ``lax.while_loop`` that feeds each row its last token, one step per new token, on device,
  until every row has stopped or ``max_new_tokens`` are out (no host round trip per token).
* Token t of prompt row r is drawn with the key ``fold_in(fold_in(key(seed), r), t)``, so a
  seed reproduces its tokens whatever the batch, the bucket or the mesh. ``temperature == 0``
  is greedy (argmax). A row stops after it emits one of ``eos_ids`` / ``stop_ids`` (kept in its
  output); from then on it emits ``pad_id``, which is dropped.
* Parameters are placed on ``mesh`` (default: every device, data parallel) with the model's
  logical shardings (so FSDP / tensor axes shard them as in training); the batch is split over
  the data axes and the cache over the data axes and, when its kv heads divide, ``tensor``.
* Decoding runs the model unrolled (scanned parameters are converted with
  :func:`jaxtrain.models.llama.unstack_layers`), without remat, and for MoE models with a
  capacity factor of at least ``num_experts / num_experts_per_tok`` so no token is dropped
  (capacity >= the tokens of a row). Compute in ``cfg.dtype``; with bfloat16 the matmul weights
  are stored in bfloat16 (the model casts them so anyway), norms and the router in float32.

A LoRA run decodes with merged weights (:func:`jaxtrain.lora.merge`, as the LM task's
``eval_params`` does). Memory: the cache is ``2 · L · B · (P + N) · K · Dh`` values; callers
with many prompts pass them in chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.axes import BATCH_AXES
from jaxtrain.errors import ConfigError
from jaxtrain.generate.sampling import greedy, sample
from jaxtrain.mesh import DEFAULT_RULES, data_parallel_size, logical_shardings, make_mesh
from jaxtrain.models.llama import Llama, LlamaConfig, init_cache, init_params, unstack_layers
from jaxtrain.tree import path_str

MIN_BUCKET = 16  # shortest prompt / new-token bucket
MAX_PROGRAMS = 32  # compiled programs kept (shared by Generators of the same model and mesh)
_PROGRAMS: dict[tuple, Any] = {}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How :meth:`Generator.generate` picks tokens and when a row stops."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    eos_ids: tuple[int, ...] = ()  # stop after emitting one of these (kept in the output)
    stop_ids: tuple[int, ...] = ()  # extra stop token ids, same rule

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"SamplingConfig.{name} must be {rule}; got "
                               f"{getattr(self, name)!r}")

        if _not_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an int >= 1")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if _not_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1] (1 = off)")
        if _not_int(self.seed):
            raise bad("seed", "an int")
        for name in ("eos_ids", "stop_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, tuple | list) or any(_not_int(i) or i < 0 for i in ids):
                raise bad(name, "a tuple of token ids (ints >= 0)")

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """eos_ids and stop_ids together, sorted, without repeats."""
        return tuple(sorted({int(i) for i in (*self.eos_ids, *self.stop_ids)}))


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's result."""

    prompt_tokens: list[int]
    tokens: list[int]  # the new tokens, the stop token included if one was hit
    finish_reason: str  # 'stop' (a stop token was emitted) | 'length' (max_new_tokens reached)


def _not_int(x: Any) -> bool:
    return isinstance(x, bool) or not isinstance(x, int | np.integer)


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= n, at least ``minimum``."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def decode_config(cfg: LlamaConfig) -> LlamaConfig:
    """``cfg`` as decoding runs it: unrolled layers, no remat and, for MoE, a capacity factor
    that drops no token (``num_experts / num_experts_per_tok``: capacity >= a row's tokens)."""
    runtime: dict[str, Any] = {"scan_layers": False, "remat_policy": "none"}
    if cfg.num_experts:
        runtime["capacity_factor"] = max(cfg.capacity_factor,
                                         cfg.num_experts / cfg.num_experts_per_tok)
    return dataclasses.replace(cfg, **runtime)


def _storage_dtype(path: str, cfg: LlamaConfig) -> Any:
    """float32 for norm scales and the MoE router (the model computes them in float32), the
    compute dtype for everything else (the model casts those to it before use)."""
    if "norm" in path or "router" in path:
        return jnp.float32
    return cfg.compute_dtype


def _put(x: Any, sharding: NamedSharding, dtype: Any) -> jax.Array:
    """A global array of ``x`` (numpy or jax, the same on every process) with ``sharding``."""
    if isinstance(x, jax.Array):
        return jax.device_put(x.astype(dtype), sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda idx: np.asarray(host[idx], dtype=dtype))


def _check_fits(params: Any, abstract: Any) -> None:
    given = {path_str(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    missing = sorted(set(want) - set(given))
    unexpected = sorted(set(given) - set(want))
    shapes = [f"{k}: got {list(given[k])}, expected {list(want[k])}"
              for k in sorted(set(want) & set(given)) if tuple(given[k]) != tuple(want[k])]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:8]}" if missing else "",
                 f"unexpected {unexpected[:8]}" if unexpected else "",
                 f"wrong shapes {shapes[:8]}" if shapes else ""]
        raise ConfigError(
            "Generator: the parameters do not fit the model config (" +
            "; ".join(p for p in parts if p) + "): pass the config the weights were trained "
            "or converted with (scanned `layers/...` or unrolled `layers_{i}/...` both work).")


class Generator:
    """Decodes prompts with one model's weights; compiled programs are kept between calls.

    ``cfg``: the model's config (any runtime fields: decoding overrides scan_layers, remat and
    the MoE capacity, see :func:`decode_config`); ``params``: plain arrays or numpy (boxed trees
    are unboxed), scanned or unrolled layout; ``mesh``: where to run (default: every device,
    data parallel); ``pad_id``: the token fed and emitted for padding and stopped rows (never
    part of a :class:`Completion`); ``max_context``: the longest sequence (prompt + new tokens)
    the model takes, None = unlimited.
    """

    def __init__(self, cfg: LlamaConfig, params: Any, *, mesh: Mesh | None = None,
                 pad_id: int = 0, max_context: int | None = None):
        self.cfg = decode_config(cfg)
        if _not_int(pad_id) or not 0 <= pad_id < cfg.vocab_size:
            raise ConfigError(f"Generator: pad_id must be a token id in [0, {cfg.vocab_size}); "
                              f"got {pad_id!r}")
        if max_context is not None and (_not_int(max_context) or max_context < 1):
            raise ConfigError(f"Generator: max_context must be an int >= 1 or None; "
                              f"got {max_context!r}")
        self.pad_id = int(pad_id)
        self.max_context = max_context
        self.mesh = mesh if mesh is not None else make_mesh({"data": -1})
        self._abstract = jax.eval_shape(lambda: init_params(self.cfg, jax.random.key(0)))
        self.param_shardings = logical_shardings(self._abstract, self.mesh)
        self.set_params(params)
        self._compiled: dict[tuple, Any] = {}

    def set_params(self, params: Any) -> None:
        """Decode with these weights from now on (same model: checked), placed like the first
        ones, keeping the compiled programs (an evaluator decoding each new checkpoint)."""
        params = unstack_layers(nn.unbox(params), self.cfg.num_layers)
        _check_fits(params, nn.unbox(self._abstract))
        self.params = jax.tree_util.tree_map_with_path(
            lambda p, x, s: _put(x, s, _storage_dtype(path_str(p), self.cfg)),
            params, self.param_shardings)

    @property
    def compiled_keys(self) -> tuple[tuple, ...]:
        """(batch bucket, prompt bucket, new-token bucket, stop-id slots, sampling mode) of each
        program compiled so far."""
        return tuple(self._compiled)

    # ------------------------------------------------------------------ the public call

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingConfig = SamplingConfig()) -> list[Completion]:
        """One :class:`Completion` per prompt (token id lists), in order.

        A prompt longer than ``max_context`` is a ConfigError (a ValueError) naming its row and
        the lengths; when the longest prompt + ``max_new_tokens`` exceeds ``max_context``,
        ``max_new_tokens`` is cut to fit, with a logged warning."""
        prompts = [self._checked(i, p) for i, p in enumerate(prompts)]
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        max_new = sampling.max_new_tokens
        if self.max_context is not None:
            for i, p in enumerate(prompts):
                if len(p) > self.max_context:
                    raise ConfigError(
                        f"prompt row {i} has {len(p)} tokens, more than the model's context of "
                        f"{self.max_context} (max_context): shorten the prompt (or truncate "
                        "it from the left).")
            if longest + max_new > self.max_context:
                cut = self.max_context - longest
                logging.warning(
                    "generate: the longest prompt (%d tokens) + max_new_tokens (%d) exceeds "
                    "max_context (%d): generating at most %d new tokens.", longest, max_new,
                    self.max_context, cut)
                max_new = cut
        if max_new < 1:
            return [Completion(p, [], "length") for p in prompts]

        n = len(prompts)
        dp = data_parallel_size(self.mesh)
        b = -(-bucket(n, 1) // dp) * dp
        p_len, n_len = bucket(longest), bucket(max_new)
        tokens = np.full((b, p_len), self.pad_id, np.int32)
        valid = np.zeros((b, p_len), bool)
        for i, p in enumerate(prompts):
            tokens[i, p_len - len(p):] = p
            valid[i, p_len - len(p):] = True
        stops = sampling.stop_tokens
        stop_ids = np.full((bucket(len(stops), 8),), -1, np.int32)
        stop_ids[:len(stops)] = stops

        greedy = sampling.temperature == 0
        mode = ("greedy",) if greedy else ("sample", min(sampling.top_k, self.cfg.vocab_size),
                                           sampling.top_p < 1.0)
        key = (b, p_len, n_len, stop_ids.shape[0], mode)
        args = (tokens, valid, stop_ids, np.int32(max_new),
                np.float32(sampling.temperature or 1.0), np.float32(sampling.top_p),
                np.uint32(sampling.seed % 2**32))
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = self._program(key, args)
        out = fn(self.params, *(_put(a, s, a.dtype) for a, s in
                                zip(args, self._arg_shardings(), strict=True)))
        out = np.asarray(out)
        return [self._completion(p, out[i, :max_new], set(stops))
                for i, p in enumerate(prompts)]

    # ------------------------------------------------------------------ helpers

    def _checked(self, row: int, prompt: Sequence[int]) -> list[int]:
        ids = [int(t) for t in prompt]
        if not ids:
            raise ConfigError(f"prompt row {row} is empty: a prompt needs at least one token "
                              "(e.g. the tokenizer's BOS token).")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ConfigError(f"prompt row {row}: token id {bad[0]} is outside the model's "
                              f"vocabulary [0, {self.cfg.vocab_size}): use the tokenizer the "
                              "model was trained with.")
        return ids

    def _completion(self, prompt: list[int], row: np.ndarray, stops: set[int]) -> Completion:
        tokens = [int(t) for t in row]
        for j, t in enumerate(tokens):
            if t in stops:
                return Completion(prompt, tokens[:j + 1], "stop")
        return Completion(prompt, tokens, "length")

    def _arg_shardings(self) -> tuple[NamedSharding, ...]:
        rows = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES, None))
        rep = NamedSharding(self.mesh, PartitionSpec())
        return (rows, rows, rep, rep, rep, rep, rep)

    def _program(self, key: tuple, args: tuple) -> Any:
        """The compiled program for ``key``: shared by every Generator of the same decoding
        config, mesh and pad id (an evaluator that builds a Generator per evaluation compiles
        once); the oldest of more than MAX_PROGRAMS is dropped."""
        shared = (self.cfg, self.mesh, self.pad_id, key)
        if shared not in _PROGRAMS:
            if len(_PROGRAMS) >= MAX_PROGRAMS:
                _PROGRAMS.pop(next(iter(_PROGRAMS)))
            _PROGRAMS[shared] = self._compile(key, args)
        return _PROGRAMS[shared]

    def _compile(self, key: tuple, args: tuple) -> Any:
        b, p_len, n_len, _, mode = key
        tensor = self.mesh.shape["tensor"]
        kv_axis = "tensor" if self.cfg.num_kv_heads % tensor == 0 else None
        cache_sharding = NamedSharding(self.mesh,
                                       PartitionSpec(None, BATCH_AXES, None, kv_axis, None))
        fn = functools.partial(
            _generate, self.cfg, mode, n_len, self.pad_id, cache_sharding,
            NamedSharding(self.mesh, PartitionSpec(BATCH_AXES, None)))
        jitted = jax.jit(fn, in_shardings=(self.param_shardings, *self._arg_shardings()),
                         out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        abstract = [jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for a in args]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(DEFAULT_RULES):
            return jitted.lower(self.params, *abstract).compile()


def _generate(cfg: LlamaConfig, mode: tuple, n_len: int, pad_id: int,
              cache_sharding: NamedSharding, rows_sharding: NamedSharding, params: Any,
              tokens: jax.Array, valid: jax.Array, stop_ids: jax.Array, max_new: jax.Array,
              temperature: jax.Array, top_p: jax.Array, seed: jax.Array) -> jax.Array:
    """Prefill + the decode loop. Returns the new tokens [B, n_len] (pad after a row stopped
    and beyond max_new)."""
    b, p_len = tokens.shape
    model = Llama(cfg)

    def constrain(cache):
        return {**cache,
                "k": jax.lax.with_sharding_constraint(cache["k"], cache_sharding),
                "v": jax.lax.with_sharding_constraint(cache["v"], cache_sharding),
                "valid": jax.lax.with_sharding_constraint(cache["valid"], rows_sharding)}

    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed),
                                                        jnp.arange(b, dtype=jnp.int32))

    def pick(logits: jax.Array, step: jax.Array) -> jax.Array:
        if mode[0] == "greedy":
            return greedy(logits)
        _, top_k, use_top_p = mode
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
        return sample(logits, keys, temperature=temperature, top_k=top_k,
                      top_p=top_p if use_top_p else 1.0)

    def stopped(tok: jax.Array) -> jax.Array:
        return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

    cache = constrain(init_cache(cfg, b, p_len + n_len))
    positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    logits, aux = model.apply({"params": params}, tokens, positions, valid.astype(jnp.int32),
                              cache=cache, last_logits_only=True)
    dummy = ~jnp.any(valid, axis=1)  # batch padding: stopped from the start
    tok = jnp.where(dummy, pad_id, pick(logits[:, -1], jnp.int32(0)))
    out = jnp.full((b, n_len), pad_id, jnp.int32).at[:, 0].set(tok)
    done = dummy | stopped(tok)
    state = (jnp.int32(1), tok, positions[:, -1] + 1, constrain(aux["cache"]), out, done)

    def cond(state):
        step, *_, done = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, tok, pos, cache, out, done = state
        logits, aux = model.apply({"params": params}, tok[:, None], pos[:, None], cache=cache)
        new = jnp.where(done, pad_id, pick(logits[:, 0], step))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        return step + 1, new, pos + 1, constrain(aux["cache"]), out, done | stopped(new)

    return jax.lax.while_loop(cond, body, state)[4]
