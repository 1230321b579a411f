"""A sweep's search space: the parameters' specs, and each trial's values.

    sweep.size                      # trials: the grid's combinations, else num_trials
    sweep.params(i)                 # grid / random: trial i's {config key: value}
    apply_params(config, params)    # a copy of the config with them set

The sweep file's format and its checks are :mod:`jaxtrain.sweep.spec`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import zlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter's search space: `values` (a list), or a `min`..`max` range."""

    values: tuple | None = None
    min: float | None = None
    max: float | None = None
    log: bool = False
    int: bool = False

    def to_json(self) -> dict:
        """The spec as sweep.json records it."""
        if self.values is not None:
            return {"values": list(self.values)}
        return {"min": self.min, "max": self.max, "log": self.log, "int": self.int}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A validated sweep. `parameters` keeps the file's order (grid order depends on it)."""

    source: str
    method: str
    metric: str
    mode: str
    parameters: dict[str, ParamSpec]
    num_trials: int | None = None
    seed: int = 0
    startup_trials: int | None = None

    @property
    def size(self) -> int:
        """Trials in the sweep: the grid's combinations, else `num_trials`."""
        if self.method == "grid":
            return math.prod(len(p.values) for p in self.parameters.values())
        return self.num_trials

    def space(self) -> dict:
        """What defines the trials (fingerprinted in sweep.json)."""
        return {"method": self.method, "seed": None if self.method == "grid" else self.seed,
                "parameters": [[k, p.to_json()] for k, p in self.parameters.items()]}

    def params(self, index: int) -> dict[str, Any]:
        """Grid / random: trial `index`'s values (bayes trials come from the Optuna study)."""
        if self.method == "grid":
            out, rest = {}, index
            for name, spec in reversed(self.parameters.items()):
                rest, i = divmod(rest, len(spec.values))
                out[name] = spec.values[i]
            return dict(reversed(out.items()))
        if self.method == "random":
            return {name: draw(spec, np.random.default_rng(
                [self.seed, index, zlib.crc32(name.encode())]))
                for name, spec in self.parameters.items()}
        raise ValueError("bayes trials are asked from the Optuna study, not enumerated")


def draw(spec: ParamSpec, rng: np.random.Generator) -> Any:
    """A random trial's value: a uniform choice of `values`, or uniform in the range (`log`:
    uniform in log space; `int`: both ends included)."""
    if spec.values is not None:
        return spec.values[int(rng.integers(len(spec.values)))]
    lo, hi = spec.min, spec.max
    if spec.int:
        if spec.log:
            value = int(math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))
        else:
            value = int(rng.integers(lo, hi + 1))
        return min(max(value, lo), hi)
    if spec.log:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def apply_params(config: ml_collections.ConfigDict,
                 params: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with `params` ({'optim.lr': 1e-3, ...}) set; the original untouched."""
    cfg = copy.deepcopy(config)
    for path, value in params.items():
        parent, _, leaf = path.rpartition(".")
        node = config_value(cfg, parent) if parent else cfg
        node[leaf] = value
    return cfg


def trial_plan(sweep: Sweep, worker: int = 0, num_workers: int = 1) -> list[tuple[int, dict]]:
    """Grid / random: [(trial index, params)] that `worker` of `num_workers` runs, in order."""
    return [(i, sweep.params(i)) for i in range(worker, sweep.size, num_workers)]


def config_value(config: ml_collections.ConfigDict, path: str) -> Any:
    """The value (or section) at a dotted key path, e.g. 'optim.lr'."""
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def format_value(v: Any) -> str:
    """A value as the results table and the log show it (4 significant digits, '-' for None)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return json.dumps(v)
    return str(v)


def format_params(params: Mapping[str, Any]) -> str:
    """'optim.lr=0.001, optim.weight_decay=0.05'."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
