"""Run this jaxtrain StableHLO bundle with jax, numpy and safetensors only (no jaxtrain).

    python run_exported.py                                 # the example inputs, checked
    python run_exported.py --inputs=in.npz --outputs=out.npz

`in.npz` holds one array per input named in bundle.json ("inputs": shapes and dtypes are
fixed). As a library:

    from run_exported import load_bundle
    fn, bundle = load_bundle("path/to/bundle")
    outputs = fn({"tokens": tokens})        # {name: numpy array}

jax.export needs the `flatbuffers` package to deserialise (pip install flatbuffers).
This file is jaxtrain/export/runner.py, copied into every bundle: it imports nothing of jaxtrain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))


def load_bundle(path: str = HERE) -> tuple[Callable[[Mapping[str, Any]], dict], dict]:
    """(fn(inputs) -> outputs, bundle.json) of the bundle in `path`: `inputs` and the outputs
    are {name: numpy array}; inputs are checked against bundle.json's names and shapes and cast
    to its dtypes. Raises RuntimeError when the bundle was not exported for this platform."""
    with open(os.path.join(path, "bundle.json")) as f:
        bundle = json.load(f)
    here = jax.export.default_export_platform()
    if here not in bundle["platforms"]:
        raise RuntimeError(f"This bundle was exported for {bundle['platforms']}; jax here runs "
                           f"on {here!r}: export again with --platforms including {here}.")
    with open(os.path.join(path, bundle["function"]), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    params = load_file(os.path.join(path, bundle["params"]))
    if sorted(params) != sorted(bundle["param_keys"]):
        raise ValueError(f"{bundle['params']} does not hold the params bundle.json lists.")
    params = jax.device_put(params)  # once, not per call

    def fn(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        want = bundle["inputs"]
        if set(inputs) != set(want):
            raise ValueError(f"inputs {sorted(inputs)}; this model takes {sorted(want)}.")
        args = {}
        for name, spec in want.items():
            x = np.asarray(inputs[name])
            if list(x.shape) != spec["shape"]:
                raise ValueError(f"input {name!r} has shape {list(x.shape)}; the model was "
                                 f"exported for {spec['shape']} (pad the batch).")
            args[name] = x.astype(jax.numpy.dtype(spec["dtype"]))
        return {k: np.asarray(v) for k, v in exported.call(params, args).items()}

    return fn, bundle


def check_outputs(outputs: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                  rtol: float, atol: float) -> dict[str, tuple[float, bool]]:
    """{output: (max |diff|, within |got - ref| <= atol + rtol |ref|)} of `outputs` against the
    exporter's sampled outputs `want` (`<name>`: values at the flat indices `<name>.index`)."""
    result = {}
    for name, value in outputs.items():
        got = np.asarray(value).reshape(-1)[want[name + ".index"]].astype(np.float64)
        ref = np.asarray(want[name]).astype(np.float64)
        diff = float(np.max(np.abs(got - ref), initial=0.0))
        result[name] = diff, bool(np.all(np.abs(got - ref) <= atol + rtol * np.abs(ref)))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run the bundle on --inputs (or its example inputs, then check the
    outputs against the exporter's); 0 when it ran (and the check passed), 1 on a mismatch."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=HERE, help="the bundle directory (default: this file's)")
    p.add_argument("--inputs", help=".npz of inputs (default: the example inputs, checked)")
    p.add_argument("--outputs", help="write the outputs to this .npz")
    p.add_argument("--rtol", type=float, help="the check's tolerance (default: bundle.json's; "
                   "looser on another platform than the exporter's, e.g. TF32 GPUs)")
    p.add_argument("--atol", type=float)
    args = p.parse_args(argv)
    fn, bundle = load_bundle(args.bundle)
    examples = bundle["examples"]
    inputs = dict(np.load(args.inputs or os.path.join(args.bundle, examples["inputs"])))
    outputs = fn(inputs)
    for name, value in outputs.items():
        print(f"{name}: shape {list(value.shape)} {value.dtype}")
    if args.outputs:
        np.savez(args.outputs, **outputs)
    if args.inputs:
        return 0
    want = np.load(os.path.join(args.bundle, examples["outputs"]))
    tol = dict(bundle["tolerance"])
    tol.update({k: v for k, v in (("rtol", args.rtol), ("atol", args.atol)) if v is not None})
    checks = check_outputs(outputs, want, tol["rtol"], tol["atol"])
    for name, (diff, good) in checks.items():
        print(f"{name}: max |diff| vs the exporter's outputs {diff:.3g}: "
              f"{'ok' if good else 'MISMATCH'}")
    return 0 if all(good for _, good in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
