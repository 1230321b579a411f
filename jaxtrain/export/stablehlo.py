"""The StableHLO format: `jax.export` of the task's inference function (params as an
argument), bundle.json describing the call, example inputs and outputs, and the standalone
runner (:mod:`jaxtrain.export.runner`, copied in as run_exported.py)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

import jaxtrain.export.runner as runner
from jaxtrain.export.checks import ExportError, ExportVerificationError, verify_outputs
from jaxtrain.export.inference import example_inputs, input_specs, int_range, tolerance
from jaxtrain.export.params import flatten_params
from jaxtrain.tasks import Task
from jaxtrain.tree import nest, path_str

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's platform names
EXAMPLE_SAMPLES = 4096  # values per output kept in example_outputs.npz
BUNDLE_FORMAT = "jaxtrain.stablehlo/1"
RUNNER_FILE = "run_exported.py"


def default_platforms() -> tuple[str, ...]:
    """cpu, plus this machine's platform when it is another (cuda, rocm, tpu)."""
    here = jax.export.default_export_platform()
    return ("cpu",) if here == "cpu" else ("cpu", here)


def sample_outputs(outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """<= EXAMPLE_SAMPLES values of each output, evenly spaced over its flat index: {name:
    values, name.index: flat indices} (example_outputs.npz, what the runner checks against)."""
    samples = {}
    for name, value in outputs.items():
        n = int(np.prod(value.shape))
        index = np.unique(np.linspace(0, max(n - 1, 0), min(n, EXAMPLE_SAMPLES)).round()
                          ).astype(np.int64)
        samples[name] = np.asarray(value).reshape(-1)[index]
        samples[f"{name}.index"] = index
    return samples


def export_stablehlo(out_dir: str, task: Task, params: Any, *, batch_size: int = 8,
                     seq_len: int | None = None, platforms: Sequence[str] | None = None,
                     seed: int = 0) -> dict:
    """`jax.export` of ``task.inference(params, {}, inputs)`` into `out_dir`: model.stablehlo,
    bundle.json, run_exported.py and example_{inputs,outputs}.npz; then checked: deserialised,
    called with the params of `out_dir`/params.safetensors (write it first) on random inputs and
    compared with the in-memory function. Returns the check's summary."""
    from safetensors.numpy import load_file

    if importlib.util.find_spec("flatbuffers") is None:
        raise ExportError("format 'stablehlo' needs the 'flatbuffers' package for "
                          "jax.export serialisation: pip install flatbuffers.")
    if batch_size < 1:
        raise ExportError(f"--batch_size must be >= 1; got {batch_size}.")
    platforms = tuple(platforms or default_platforms())
    params_file = os.path.join(out_dir, "params.safetensors")
    if not os.path.isfile(params_file):
        raise FileNotFoundError(f"{params_file} is missing: the exported function takes the "
                                "params as an argument; write them first (save_safetensors).")
    flat = flatten_params(params)
    specs = input_specs(task, batch_size, seq_len)
    param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}

    def fn(flat_params, inputs):
        return task.inference(nest(flat_params), {}, inputs)

    exported = jax.export.export(jax.jit(fn), platforms=platforms)(param_specs, specs)
    with open(os.path.join(out_dir, "model.stablehlo"), "wb") as f:
        f.write(exported.serialize())
    out_specs = jax.eval_shape(fn, param_specs, specs)

    inputs = example_inputs(task, specs, seed)
    want = jax.device_get(jax.jit(task.inference)(nest(flat), {}, inputs))
    np.savez(os.path.join(out_dir, "example_inputs.npz"), **inputs)
    np.savez(os.path.join(out_dir, "example_outputs.npz"), **sample_outputs(want))

    rtol, atol = tolerance(task)
    keys = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(param_specs)[0]]
    bundle = {
        "format": BUNDLE_FORMAT,
        "task": task.name,
        "function": "model.stablehlo",
        "params": "params.safetensors",
        "param_keys": keys,
        "inputs": {k: {"shape": list(s.shape), "dtype": np.dtype(s.dtype).name,
                       **({"range": list(int_range(task, s.dtype))}
                          if not np.issubdtype(s.dtype, np.floating) else {})}
                   for k, s in specs.items()},
        "outputs": {k: {"shape": list(s.shape), "dtype": np.dtype(s.dtype).name}
                    for k, s in out_specs.items()},
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "call": ("exported = jax.export.deserialize(bytearray(open('model.stablehlo', 'rb')"
                 ".read())); params = safetensors.numpy.load_file('params.safetensors'); "
                 "outputs = exported.call(params, inputs)  # params: the flat {path: array} "
                 "dict, inputs: {name: array} as in 'inputs'; outputs: {name: array}"),
        "examples": {"inputs": "example_inputs.npz", "outputs": "example_outputs.npz",
                     "outputs_layout": "<name>: values at flat indices <name>.index"},
        "tolerance": {"rtol": rtol, "atol": atol},
    }
    with open(os.path.join(out_dir, "bundle.json"), "w") as f:
        json.dump(bundle, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, RUNNER_FILE), "w") as f:
        f.write(inspect.getsource(runner))

    # the check: what a user does, from the files
    with open(os.path.join(out_dir, "model.stablehlo"), "rb") as f:
        loaded = jax.export.deserialize(bytearray(f.read()))
    here = jax.export.default_export_platform()
    if here not in loaded.platforms:
        logging.warning("stablehlo: exported for %s, not this machine's %s: checked the "
                        "deserialised signature only, not the outputs.", loaded.platforms, here)
        if [tuple(a.shape) for a in loaded.in_avals] != [tuple(a.shape) for a in
                                                         exported.in_avals]:
            raise ExportVerificationError("stablehlo: model.stablehlo deserialises to another "
                                          "signature than was exported.")
        return {"checked": "signature", "platforms": list(loaded.platforms)}
    got = jax.device_get(loaded.call(load_file(params_file), inputs))
    diff = verify_outputs("stablehlo", "model.stablehlo called with params.safetensors", got,
                          want, rtol, atol)
    return {"checked": "outputs", "max_abs_diff": diff, "rtol": rtol, "atol": atol,
            "platforms": list(loaded.platforms)}


def load_exported(path: str) -> tuple[Callable[[Mapping[str, Any]], dict], dict]:
    """(fn(inputs) -> outputs, bundle.json) of a stablehlo bundle: what its run_exported.py
    does (:func:`jaxtrain.export.runner.load_bundle`: inputs checked against bundle.json)."""
    return runner.load_bundle(path)
