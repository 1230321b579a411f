"""The run's task built for inference, and what an export feeds it: input shapes, random
example inputs, the tolerance of an exported function."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxtrain.errors import ConfigError
from jaxtrain.export.checks import ExportError
from jaxtrain.tasks import Task, get_task
from jaxtrain.tree import path_str


def inference_task(config: Mapping[str, Any], platforms: Sequence[str] = ()) -> Task:
    """The run's task, built from its saved config for inference: LoRA off (the params are
    merged), no distillation teacher; a kernel attention (cuDNN, Pallas GPU, TPU Splash)
    becomes XLA's when exporting for another platform than the kernel's; a config saved before
    ``model.name`` existed gets its task's default model family. An ExportError when the task
    cannot be built."""
    c = copy.deepcopy(dict(config))
    if not c.get("task"):
        raise ExportError("The checkpoint's config names no task (config['task']): is it a "
                          "jaxtrain run?")
    c["lora"] = {**c.get("lora", {}), "rank": 0}
    if isinstance(c.get("distill"), dict):
        c["distill"] = {**c["distill"], "teacher": ""}
    model = c.get("model")
    kernel_platform = {"cudnn": "cuda", "pallas": "cuda", "splash": "tpu"}
    impl = model.get("attention_impl") if isinstance(model, dict) else None
    if impl in kernel_platform and any(p != kernel_platform[impl] for p in platforms):
        logging.info("Exporting for %s: %s attention replaced by XLA's.", ",".join(platforms),
                     impl)
        c["model"] = {**model, "attention_impl": "xla"}
    try:
        task_cls = get_task(c["task"])
        default_model = task_cls.default_config().get("model")
        if isinstance(c.get("model"), dict) and not c["model"].get("name") and \
                default_model is not None and default_model.get("name"):
            # a run saved before config.model.name existed: its task's default model family
            c["model"] = {**c["model"], "name": default_model.get("name")}
        return task_cls(ml_collections.ConfigDict(c))
    except ConfigError as e:
        hint = (f" The run started from init_from={c['init_from']!r}, which gives the model its "
                "shape: it must still be readable." if c.get("init_from") else "")
        raise ExportError(f"Cannot build the run's {c['task']!r} task from its saved config: "
                          f"{e}{hint}") from None


def check_params(task: Task, params: Any) -> None:
    """The checkpoint's params have the shapes of the model its config describes; an
    ExportError naming the first differences if not."""
    from flax.core import meta

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(meta.unbox(tree))[0]
        return {path_str(p): tuple(np.shape(x)) for p, x in leaves}

    want = shapes(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    got = shapes(params)
    if want != got:
        differ = [f"{k}: checkpoint {got[k]} vs model {want[k]}"
                  for k in sorted(set(want) & set(got)) if want[k] != got[k]][:3]
        raise ExportError(
            f"The checkpoint's params do not fit the {task.name!r} model its config describes "
            f"(only in the checkpoint: {sorted(set(got) - set(want))[:3]}, only in the model: "
            f"{sorted(set(want) - set(got))[:3]}, shapes: {differ}).")


def input_specs(task: Task, batch_size: int,
                seq_len: int | None) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of `task.inference`'s inputs for `batch_size` rows (and `seq_len` tokens, if
    given); an ExportError when the task has no inference function or no sequence length."""
    if any(getattr(type(task), m, None) is getattr(Task, m)
           for m in ("inference_inputs", "inference")):
        raise ExportError(f"format 'stablehlo': the {task.name!r} task has no inference function "
                          "to export (it implements no inference_inputs / inference); use "
                          "--format=safetensors.")
    if seq_len is None:
        return dict(task.inference_inputs(batch_size))
    if "seq_len" not in inspect.signature(task.inference_inputs).parameters:
        raise ExportError(f"--seq_len: the {task.name!r} task's inputs have no sequence length "
                          "to set (their shapes come from the model config).")
    return dict(task.inference_inputs(batch_size, seq_len=seq_len))


def int_range(task: Task, dtype: Any) -> tuple[int, int]:
    """[low, high) of valid integer inputs: token ids in [0, vocab_size)."""
    if np.dtype(dtype) == np.bool_:
        return 0, 2
    vocab = getattr(getattr(task, "model_config", None), "vocab_size", 2)
    return 0, max(int(vocab), 2)


def example_inputs(task: Task, specs: Mapping[str, jax.ShapeDtypeStruct], seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Random inputs: floats ~ N(0, 1), integers uniform in :func:`int_range` but 0 (CLIP's
    padding)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in specs.items():
        if np.issubdtype(s.dtype, np.floating):
            out[name] = rng.standard_normal(s.shape).astype(s.dtype)
        else:
            low, high = int_range(task, s.dtype)
            out[name] = rng.integers(max(low, 1), high, s.shape).astype(s.dtype)
    return out


def tolerance(task: Task) -> tuple[float, float]:
    """(rtol, atol) of the exported vs the in-memory function: same program, same compiler."""
    dtype = getattr(getattr(task, "model_config", None), "dtype", "float32")
    return (1e-5, 1e-5) if dtype == "float32" else (2e-2, 2e-2)
