"""LoRA: low-rank adapters on any task's chosen kernels, with the base weights frozen.

For a kernel W viewed as a matrix [in, out] (its input axes, then its output axes):

    W' = W + (alpha / r) · A B,      A: [in, r] ~ N(0, 1/in),   B: [r, out] = 0

so at init W' = W exactly and only A, B (and the `lora.trainable` parameters) are trained: the
optimizer holds state for them alone. The base weights live in the train state's `frozen` as
`frozen["lora_base"]` (optionally in bfloat16), sharded like the model. Adapters are merged into
the weights inside the jitted step (an [in, r] x [r, out] product per adapted kernel), so any
task's model runs unchanged: LoRA works for every task (LM, SFT, DPO, CLIP).

Which axes are inputs: a kernel's leading axes named `layers` (scanned layers) or `expert` are
batch axes (one adapter per layer / expert); then one input axis, or all but the last when the
last axis is `embed` (projections back to the model width: o_proj [H, Dh, D], down_proj [F, D]).

Dropout (`lora.dropout`) drops input features of the adapter path (rows of A), one mask per step
(the weight-space form of LoRA dropout; the original drops per example).

Trainable parameter tree: {"lora": {<path of W>: {"a", "b"}}, "train": {<path>: value}}, so
`optim.param_groups` can give them separate learning rates (`(("lora/.*", 1.0),
("train/.*", 0.1))`). Merge for export with :func:`merge`; adapters alone with
:func:`save_adapters` / :func:`load_adapters`.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtrain.task import Task, params_key
from jaxtrain.tree import nest, path_str

BATCH_AXES = ("layers", "expert")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _leaves(tree) -> dict[str, Any]:
    """path -> leaf (boxed leaves stay boxed)."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    return {path_str(p): x for p, x in flat}


def _unbox(x):
    return x.value if isinstance(x, nn.LogicallyPartitioned) else x


def split_axes(shape: tuple[int, ...], names: tuple | None) -> tuple[int, int]:
    """(number of leading batch axes, number of input axes) of a kernel."""
    names = tuple(names or (None,) * len(shape))
    lead = 0
    while lead < len(names) and names[lead] in BATCH_AXES:
        lead += 1
    rest = len(shape) - lead
    if rest < 2:
        raise ValueError(f"LoRA needs a kernel with input and output axes; got shape {shape}")
    n_in = rest - 1 if names[-1] == "embed" else 1
    return lead, n_in


def targets(params, lora_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The (boxed) kernels whose path matches `lora.targets`. Error when none does."""
    pattern = re.compile(lora_cfg.targets)
    leaves = _leaves(params)
    chosen = {p: x for p, x in leaves.items() if pattern.fullmatch(p)
              and len(np.shape(_unbox(x))) >= 2}
    if not chosen:
        kernels = [p for p, x in leaves.items() if len(np.shape(_unbox(x))) >= 2][:8]
        raise ValueError(
            f"lora.targets {lora_cfg.targets!r} matches no kernel (>= 2-D parameter) of this "
            f"model. Parameter paths look like: {kernels}."
        )
    return chosen


def init_adapters(params, lora_cfg, rng: jax.Array) -> dict:
    """Boxed {"a", "b"} per target kernel: A ~ N(0, 1/in), B = 0."""
    r = lora_cfg.rank
    adapters = {}
    for i, (path, boxed) in enumerate(sorted(targets(params, lora_cfg).items())):
        w = _unbox(boxed)
        names = getattr(boxed, "names", None) or (None,) * w.ndim
        lead, n_in = split_axes(w.shape, names)
        lead_shape, in_shape = w.shape[:lead], w.shape[lead:lead + n_in]
        out_shape = w.shape[lead + n_in:]
        fan_in = int(np.prod(in_shape))
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead_shape, *in_shape, r),
                              jnp.float32) / np.sqrt(fan_in)
        b = jnp.zeros((*lead_shape, r, *out_shape), jnp.float32)
        lead_names, in_names = names[:lead], names[lead:lead + n_in]
        out_names = names[lead + n_in:]
        adapters[path] = {
            "a": nn.LogicallyPartitioned(a, (*lead_names, *in_names, None)),
            "b": nn.LogicallyPartitioned(b, (*lead_names, None, *out_names)),
        }
    return adapters


def delta(a: jax.Array, b: jax.Array, w_shape: tuple[int, ...], scale: float,
          lead: int) -> jax.Array:
    """(alpha / r) · A B reshaped to the kernel's shape (batch axes kept)."""
    lead_shape = w_shape[:lead]
    lead_n = int(np.prod(lead_shape)) if lead else 1
    a2 = a.reshape(lead_n, -1, a.shape[-1])
    b2 = b.reshape(lead_n, b.shape[lead], -1)
    return (scale * jnp.einsum("lir,lro->lio", a2, b2)).reshape(w_shape)


def merge(params: dict, base: Any, lora_cfg, dropout_rng: jax.Array | None = None) -> Any:
    """The full parameters: base with `train` leaves replaced and adapters added. Pure; works
    on host numpy trees too (for export). `dropout_rng` enables adapter dropout."""
    scale = lora_cfg.alpha / lora_cfg.rank
    adapters = _leaves(params.get("lora", {}))
    trained = _leaves(params.get("train", {}))

    def one(path, w):
        key = path_str(path)
        if key in trained:
            w = trained[key]
        a = adapters.get(f"{key}/a")
        if a is None:
            return w
        b = adapters[f"{key}/b"]
        lead = _lead_of(a, b, w)
        if dropout_rng is not None and lora_cfg.dropout > 0:
            keep = 1.0 - lora_cfg.dropout
            # a stable hash of the path: Python's hash() of a str differs per process, so
            # hosts (and a resumed run) would draw different masks
            rng = jax.random.fold_in(dropout_rng, zlib.crc32(key.encode()) % (2**31))
            mask = jax.random.bernoulli(rng, keep, a.shape[:-1]).astype(a.dtype) / keep
            a = a * mask[..., None]
        return (w.astype(jnp.float32) + delta(a, b, w.shape, scale, lead)).astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(one, base)


def merged_state_params(state: dict, lora_cfg) -> Any:
    """The full params of a saved LoRA run's train state (host arrays, as
    `checkpoint.read_state` returns it): its adapters merged into the base weights it keeps in
    `frozen["lora_base"]`, as float32 numpy (the base may be bfloat16)."""
    params = jax.device_get(merge(state["params"], state["frozen"]["lora_base"], lora_cfg))
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _lead_of(a, b, w) -> int:
    # a: [*lead, *in, r], b: [*lead, r, *out], w: [*lead, *in, *out]
    #   a.ndim + b.ndim - 2 = 2·lead + w.ndim - lead  =>  lead = a.ndim + b.ndim - 2 - w.ndim
    return a.ndim + b.ndim - 2 - w.ndim


class LoraTask:
    """Wraps a task (`jaxtrain.api.build_task` does, when `lora.rank > 0`), with the Task interface:
    trainable = adapters (+ `lora.trainable` params), frozen = the base weights."""

    def __init__(self, inner: Task):
        self.config = inner.config
        self.inner = inner
        self.name = inner.name
        self.activation_sharding = inner.activation_sharding
        self.lora = inner.config.lora
        self._base_dtype = DTYPES[self.lora.base_dtype]

    def _base(self):
        # The base's random init (replaced by pretrained weights when the task has them) comes
        # from the params key, so init_params and init_frozen agree on it.
        return self.inner.init_params(params_key(self.config.seed))

    def init_params(self, rng):
        base = self._base()
        out = {"lora": nest(init_adapters(base, self.lora, rng))}
        if self.lora.trainable:
            pattern = re.compile(self.lora.trainable)
            extra = {p: x for p, x in _leaves(base).items() if pattern.fullmatch(p)}
            if extra:
                out["train"] = nest(extra)
        return out

    def init_frozen(self, rng):
        cast = lambda x: x.astype(self._base_dtype)  # noqa: E731
        base = jax.tree.map(cast, self._base())
        return {**self.inner.init_frozen(rng), "lora_base": base}

    def pretrained(self) -> dict[str, Any]:
        inner = self.inner.pretrained()
        out: dict[str, Any] = {}
        if "frozen" in inner:
            out["frozen"] = dict(inner["frozen"])
        if "params" in inner:
            full = inner["params"]
            out.setdefault("frozen", {})["lora_base"] = full
            if self.lora.trainable:
                pattern = re.compile(self.lora.trainable)
                extra = {p: x for p, x in _leaves(full).items() if pattern.fullmatch(p)}
                if extra:
                    out["params"] = {"train": nest(extra)}
        return out

    def full_params(self, params, frozen, rng=None):
        return merge(params, frozen["lora_base"], self.lora, rng)

    def loss_fn(self, params, batch, rng, frozen):
        return self.inner.loss_fn(self.full_params(params, frozen, rng), batch, rng, frozen)

    def grad_fn(self, mesh, full_params=None):
        return self.inner.grad_fn(mesh, full_params=self.full_params)

    def eval_params(self, params, frozen):
        return self.full_params(params, frozen), frozen

    def inference_inputs(self, batch_size):
        return self.inner.inference_inputs(batch_size)

    def inference(self, params, frozen, inputs):
        return self.inner.inference(self.full_params(params, frozen), frozen, inputs)

    def train_iterator(self, **kw):
        return self.inner.train_iterator(**kw)

    def num_train_examples(self):
        return self.inner.num_train_examples()

    def step_tokens(self, batch):
        return self.inner.step_tokens(batch)

    def model_flops_per_step(self, batch):
        return self.inner.model_flops_per_step(batch)


def save_adapters(path: str, params: dict, lora_cfg) -> None:
    """`<path>/adapters.safetensors` (the trainable tree, flattened by path) + `lora.json`."""
    from jaxtrain.file_modes import save_safetensors as save_file  # mode 0644, not 0600

    os.makedirs(path, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(_unbox(v)), np.float32))
            for k, v in _leaves(params).items()}
    save_file(flat, os.path.join(path, "adapters.safetensors"))
    with open(os.path.join(path, "lora.json"), "w") as f:
        json.dump(lora_cfg.to_dict() if hasattr(lora_cfg, "to_dict") else dict(lora_cfg), f,
                  indent=2)


def load_adapters(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(lora config, trainable tree) written by :func:`save_adapters`."""
    from safetensors.numpy import load_file

    files = [os.path.join(path, n) for n in ("adapters.safetensors", "lora.json")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"Not a LoRA adapter directory: missing {missing}.")
    with open(files[1]) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    return cfg, nest(load_file(files[0]))
