"""Hyperparameter sweeps: grid, random and Bayesian (Optuna TPE) search over config keys.

    python -m jaxtrain.sweep --config=configs/clip.py:runlocal --sweep=sweeps/clip_lr.py
        [--workdir=runs/sweep_clip_lr] [--worker=I --num_workers=N] [--max_trials=K]
        [--config.KEY=VALUE ...]
    python -m jaxtrain.sweep --workdir=runs/sweep_clip_lr --results     # the table, no training

    result = run_sweep(config, "sweeps/clip_lr.py", "runs/sweep_clip_lr")   # SweepResult
    result.best.params, result.best.value
    print(result.table())

A sweep file is a Python file whose ``get_sweep()`` returns a dict (or ConfigDict)::

    method          "grid" | "random" | "bayes"
    metric          an eval metric the trainer records: "eval/mean_recall@1", "eval/loss", ...
    mode            "max" | "min"
    num_trials      random / bayes: how many trials (not grid: it runs every combination)
    seed            random / bayes (default 0)
    startup_trials  bayes: random trials before TPE (default min(10, max(1, num_trials // 2)))
    parameters      {config key path: spec}, each spec one of
        {"values": [...]}                    a list (grid; random / bayes: categorical)
        {"min": a, "max": b, "log": False}   a float range (log: log-uniform)
        {"min": a, "max": b, "int": True}    an int range, both ends included (may be log too)

Each trial is an ordinary :func:`jaxtrain.trainer.Trainer` run (the config validated as usual) on
a copy of the config with the trial's values, in ``<workdir>/trial_<NNNN>/``, which also holds
``config.json`` and ``trial.json`` (index, worker, params, status ``running`` | ``complete`` |
``early_stopped`` | ``failed``, metric value, best step, error). The trial's value is the best
value of ``metric`` over the run's evaluations (max or min by ``mode``; the config's own
``checkpoint.best_metric`` and early stopping are left as the user set them), and ``best_step``
the step of that evaluation.

* grid: the Cartesian product of the ``values`` lists in the order written, the last parameter
  varying fastest; trial i is combination i.
* random: each value is drawn from ``numpy.random.default_rng([seed, i, crc32(key)])``, so trial
  i's values depend only on the seed, i and the key: not on the worker count, the other keys, or
  which trials ran before. Ranges are uniform (``log``: uniform in log space; ``int``: inclusive).
* bayes: Optuna's TPE sampler over a study in ``<workdir>/optuna_journal.log``
  (``JournalStorage`` over a ``JournalFileBackend``, so worker processes on a shared filesystem
  share one study). Trials are numbered in the order they are asked; failed trials are told as
  failed. Seeded, but not bit-reproducible across interruptions or worker counts.

Workers: ``--worker=I --num_workers=N`` (default from ``SLURM_PROCID`` / ``SLURM_NTASKS``) runs
grid/random trials I, I+N, I+2N, ... one after another; bayes workers ask the shared study for
the next trial until ``num_trials`` are taken. Each worker trains single-host on the devices it
sees: give each its own GPUs (``CUDA_VISIBLE_DEVICES``, ``srun --gpus-per-task=1``) or run one
worker per host.

Re-running the same command continues a sweep: finished trials (``complete``, ``early_stopped``,
``failed``; ``--retry_failed`` runs failed ones again) are skipped and a trial left
``running`` resumes from its own latest checkpoint, by the worker that owns it (grid/random: by
index; bayes: the worker that asked for it). ``<workdir>/sweep.json`` records the search space:
another method, seed or parameters in the same workdir is an error, and so is another metric or
mode once a trial has a value; ``num_trials`` may change (random trial i keeps its values). A
trial that raises (a config the Trainer rejects, NaN with ``train.nonfinite='error'``, out of
memory, ...) is ``failed`` with the error in trial.json, and the sweep goes on; it stops when
3 trials in a row fail with the same error (a bug or a missing file, not the hyperparameters)
and when a checkpoint cannot be written. ``results.csv`` is rebuilt from every ``trial.json`` (all
workers') after each trial: ranked by the metric, unfinished trials after, failed ones last.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import difflib
import gc
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import zlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jaxtrain import trainer as trainer_lib
from jaxtrain.config import ConfigError, check_keys, check_types, validate

METHODS = ("grid", "random", "bayes")
MODES = ("max", "min")
SWEEP_KEYS = ("method", "metric", "mode", "num_trials", "seed", "startup_trials", "parameters")
SPEC_KEYS = ("values", "min", "max", "log", "int")
FINISHED = ("complete", "early_stopped", "failed")
STUDY_NAME = "jaxtrain"
JOURNAL = "optuna_journal.log"


REPEATED_FAILURES = 3  # this many trials in a row failing with one same error stop the sweep


class SweepError(ConfigError):
    """The sweep file, or the sweep workdir, is not usable. The message names the file and fix."""


class RepeatedFailureError(RuntimeError):
    """Several trials in a row failed with the same error: a problem of the task or the setup
    (a bug, a missing file), not of the hyperparameters. Fix it and re-run with retry_failed."""


# ---------------------------------------------------------------------------------------------
# The sweep file


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter's search space: `values` (a list), or a `min`..`max` range."""

    values: tuple | None = None
    min: float | None = None
    max: float | None = None
    log: bool = False
    int: bool = False

    def to_json(self) -> dict:
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
            return {name: _draw(spec, np.random.default_rng(
                [self.seed, index, zlib.crc32(name.encode())]))
                for name, spec in self.parameters.items()}
        raise ValueError("bayes trials are asked from the Optuna study, not enumerated")


def _draw(spec: ParamSpec, rng: np.random.Generator) -> Any:
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


def _close(word: str, valid) -> str:
    matches = difflib.get_close_matches(str(word), list(valid), n=3, cutoff=0.7)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def read_sweep_file(path: str) -> dict:
    """Import a sweep file and return its `get_sweep()` as a plain dict."""
    if not os.path.isfile(path):
        raise SweepError(f"Sweep file {path!r} not found. Pass --sweep=PATH to a Python file "
                         "with get_sweep(), e.g. sweeps/clip_lr.py.")
    name = f"_jaxtrain_sweep_{zlib.crc32(os.path.abspath(path).encode()):08x}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SweepError(f"Sweep file {path!r} failed to import: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"Sweep file {path!r} has no get_sweep() function. Define "
                         "get_sweep() returning a dict with method, metric, mode and parameters.")
    return module.get_sweep()


def _plain(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return value


def parse_sweep(raw: Mapping, config: ml_collections.ConfigDict, *, source: str = "<sweep>",
                task: type | None = None) -> Sweep:
    """Validate a sweep dict against `config` (keys, value types; for a grid every combination
    through the task's config validation). Errors name `source` and the fix."""
    raw = _plain(raw)
    if not isinstance(raw, Mapping):
        raise SweepError(f"{source}: get_sweep() must return a dict (or ConfigDict); got "
                         f"{type(raw).__name__}.")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise SweepError(f"{source}: unknown sweep key {key!r}.{_close(key, SWEEP_KEYS)} "
                             f"Valid keys: {', '.join(SWEEP_KEYS)}.")
    for key in ("method", "metric", "mode", "parameters"):
        if key not in raw:
            raise SweepError(f"{source}: get_sweep() must set {key!r} (see the format in "
                             "jaxtrain/sweep.py or sweeps/clip_lr.py).")
    method, metric, mode = raw["method"], raw["metric"], raw["mode"]
    if method not in METHODS:
        raise SweepError(f"{source}: 'method' must be one of {', '.join(METHODS)}; got "
                         f"{method!r}.{_close(method, METHODS)}")
    if not (isinstance(metric, str) and metric.startswith("eval/")):
        raise SweepError(f"{source}: 'metric' must name an eval metric the trainer records, such "
                         f"as 'eval/loss' or 'eval/mean_recall@1'; got {metric!r}.")
    if mode not in MODES:
        raise SweepError(f"{source}: 'mode' must be 'max' or 'min' (is a larger {metric} "
                         f"better?); got {mode!r}.")
    seed = raw.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        raise SweepError(f"{source}: 'seed' must be an int >= 0; got {seed!r}.")
    num_trials, startup = raw.get("num_trials"), raw.get("startup_trials")
    if method == "grid":
        if num_trials is not None:
            raise SweepError(f"{source}: 'num_trials' is for random and bayes sweeps; a grid "
                             "runs every combination of the 'values' lists. Remove it.")
    elif not _is_int(num_trials) or num_trials < 1:
        raise SweepError(f"{source}: a {method} sweep needs 'num_trials', an int >= 1; got "
                         f"{num_trials!r}.")
    if startup is not None and (method != "bayes" or not _is_int(startup) or startup < 1):
        raise SweepError(f"{source}: 'startup_trials' (random trials before TPE) is for bayes "
                         f"sweeps and must be an int >= 1; got {startup!r} with method {method!r}.")
    if method == "bayes" and startup is None:
        startup = min(10, max(1, num_trials // 2))

    params = _plain(raw["parameters"])
    if not isinstance(params, Mapping) or not params:
        raise SweepError(f"{source}: 'parameters' is empty: the search space needs at least one "
                         "config key, e.g. {'optim.lr': {'values': [1e-3, 3e-3]}}.")
    specs = {str(name): _parse_spec(_plain(spec), str(name), method, config, source)
             for name, spec in params.items()}
    sweep = Sweep(source=source, method=method, metric=metric, mode=mode, parameters=specs,
                  num_trials=num_trials, seed=seed, startup_trials=startup)
    if method == "grid":
        _validate_grid(sweep, config, task)
    if method == "bayes":
        import_optuna(source)
    return sweep


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _tree(path: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def _lookup(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _parse_spec(spec: Any, name: str, method: str, config, source: str) -> ParamSpec:
    where = f"{source}: parameter {name!r}"
    try:
        check_keys(_tree(name, None), config)
    except ConfigError as e:
        raise SweepError(f"{source}: parameters: {e} Fix the key in get_sweep()'s "
                         "'parameters'.") from None
    default = _lookup(config, name)
    if isinstance(default, ml_collections.ConfigDict):
        raise SweepError(f"{where} names a config section, not a value; sweep one of its keys: "
                         f"{', '.join(f'{name}.{k}' for k in default)}.")
    if not isinstance(spec, Mapping):
        raise SweepError(f"{where} must be a dict such as {{'values': [...]}} or "
                         f"{{'min': a, 'max': b}}; got {spec!r}.")
    for key in spec:
        if key not in SPEC_KEYS:
            raise SweepError(f"{where}: unknown spec key {key!r}.{_close(key, SPEC_KEYS)} Valid: "
                             f"{', '.join(SPEC_KEYS)}.")
    if "values" in spec:
        if set(spec) - {"values"}:
            raise SweepError(f"{where} has both 'values' and {sorted(set(spec) - {'values'})}: "
                             "give a list of values, or a min/max range.")
        values = spec["values"]
        if not isinstance(values, list | tuple) or not values:
            raise SweepError(f"{where}: 'values' must be a non-empty list; got {values!r}.")
        for v in values:
            _check_value(name, v, config, where)
        return ParamSpec(values=tuple(values))
    if method == "grid":
        raise SweepError(f"{where} is a range ({spec!r}), but a grid needs 'values' lists. List "
                         "the values to try, or use method 'random' or 'bayes'.")
    if "min" not in spec or "max" not in spec:
        raise SweepError(f"{where} needs 'values' or both 'min' and 'max'; got {spec!r}.")
    lo, hi = spec["min"], spec["max"]
    log, is_int = spec.get("log", False), spec.get("int", False)
    if not (isinstance(log, bool) and isinstance(is_int, bool)):
        raise SweepError(f"{where}: 'log' and 'int' must be True or False; got {spec!r}.")
    if not (_is_number(lo) and _is_number(hi)) or lo >= hi:
        raise SweepError(f"{where}: 'min' and 'max' must be numbers with min < max; got "
                         f"{lo!r}, {hi!r}.")
    if log and lo <= 0:
        raise SweepError(f"{where}: a log range needs min > 0; got min={lo!r}.")
    if is_int and not (_is_int(lo) and _is_int(hi)):
        raise SweepError(f"{where}: an int range needs int min and max; got {lo!r}, {hi!r}.")
    if _is_int(default) and not is_int:
        raise SweepError(f"{where}: config key {name!r} is an int (default {default!r}); add "
                         "\"int\": True to the range.")
    if not (_is_number(default) or default is None):
        raise SweepError(f"{where}: config key {name!r} is a {type(default).__name__} (default "
                         f"{default!r}); a min/max range needs a number: give a 'values' list.")
    for v in (lo, hi):
        _check_value(name, v, config, where)
    return ParamSpec(min=lo if is_int else float(lo), max=hi if is_int else float(hi), log=log,
                     int=is_int)


def _check_value(name: str, value: Any, config, where: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: value {value!r} is not JSON-serialisable (use numbers, "
                         "strings, bools, None or lists of them).") from None
    if isinstance(value, Mapping):
        raise SweepError(f"{where}: value {value!r} is a dict; sweep the section's keys one by "
                         "one instead.")
    try:
        check_types(_tree(name, value), config)
    except ConfigError as e:
        raise SweepError(f"{where}: {e} Fix the value in get_sweep()'s 'parameters'.") from None


def _validate_grid(sweep: Sweep, config, task) -> None:
    """Every grid combination must pass the task's config validation (cheap: no JAX)."""
    from jaxtrain.tasks import get_task

    task_cls = task or get_task(config.task)  # an unknown task is a ConfigError naming it
    schema, rules = task_cls.default_config(), task_cls.config_rules()
    for index in range(sweep.size):
        params = sweep.params(index)
        try:
            validate(apply_params(config, params), schema, rules)
        except (ConfigError, TypeError, ValueError) as e:
            raise SweepError(f"{sweep.source}: grid trial {index} ({_fmt_params(params)}) gives "
                             f"an invalid config: {e} Fix the values in 'parameters'.") from None


def load_sweep(sweep: str | os.PathLike | Mapping | Sweep, config: ml_collections.ConfigDict,
               *, task: type | None = None) -> Sweep:
    """A Sweep from a sweep file path, a dict / ConfigDict, or a Sweep (returned as is)."""
    if isinstance(sweep, Sweep):
        return sweep
    if isinstance(sweep, str | os.PathLike):
        path = os.fspath(sweep)
        return parse_sweep(read_sweep_file(path), config, source=path, task=task)
    return parse_sweep(sweep, config, task=task)


def import_optuna(source: str = "<sweep>"):
    """Optuna, imported only for bayes sweeps."""
    try:
        import optuna
    except ImportError:
        raise SweepError(f"{source}: method 'bayes' needs Optuna, which is not installed: "
                         "pip install optuna (or pip install -e \".[sweep]\"). Grid and random "
                         "sweeps need nothing extra.") from None
    return optuna


def apply_params(config: ml_collections.ConfigDict, params: Mapping[str, Any]):
    """A copy of `config` with `params` ({'optim.lr': 1e-3, ...}) set; the original untouched."""
    cfg = copy.deepcopy(config)
    for path, value in params.items():
        parent, _, leaf = path.rpartition(".")
        node = _lookup(cfg, parent) if parent else cfg
        node[leaf] = value
    return cfg


def trial_plan(sweep: Sweep, worker: int = 0, num_workers: int = 1) -> list[tuple[int, dict]]:
    """Grid / random: [(trial index, params)] that `worker` of `num_workers` runs, in order."""
    return [(i, sweep.params(i)) for i in range(worker, sweep.size, num_workers)]


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Trial:
    """One trial, as its trial.json records it."""

    index: int
    status: str  # running | complete | early_stopped | failed
    params: dict[str, Any]
    value: float | None = None  # best `metric` over the run's evaluations
    best_step: int | None = None
    final_step: int | None = None
    error: str | None = None
    worker: int = 0
    wall_seconds: float = 0.0
    workdir: str = ""

    @classmethod
    def from_json(cls, record: dict, workdir: str) -> Trial:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in fields}, workdir=workdir)


@dataclasses.dataclass
class SweepResult:
    """Every trial in the sweep workdir (all workers'), ranked: best first by `mode`, then the
    unfinished, then the failed. `ran` lists the trials this call ran or resumed."""

    workdir: str
    metric: str
    mode: str
    size: int
    trials: list[Trial]
    parameters: list[str]
    ran: list[int] = dataclasses.field(default_factory=list)
    preempted: bool = False

    @property
    def best(self) -> Trial | None:
        first = self.trials[0] if self.trials else None
        return first if first is not None and first.value is not None else None

    @property
    def finished(self) -> bool:
        """Every trial of the sweep has finished (whichever worker ran it)."""
        done = [t for t in self.trials if t.status in FINISHED]
        return len(done) >= self.size

    def columns(self) -> list[str]:
        extra = sorted({k for t in self.trials for k in t.params} - set(self.parameters))
        return ["rank", "trial", "status", self.metric, "best_step", *self.parameters, *extra]

    def rows(self) -> list[list[Any]]:
        params = self.columns()[5:]
        return [[rank, t.index, t.status, t.value, t.best_step,
                 *[t.params.get(p, "") for p in params]]
                for rank, t in enumerate(self.trials, start=1)]

    def table(self) -> str:
        """The ranked trials as a plain-text table."""
        if not self.trials:
            return "(no trials yet)"
        header = self.columns()
        cells = [[_fmt(v) for v in row] for row in self.rows()]
        width = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, width, strict=True))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, width, strict=True)) for r in cells]
        failed = [t for t in self.trials if t.status == "failed"]
        lines += [f"trial {t.index} failed: {(t.error or '').splitlines()[0][:200]}"
                  for t in failed]
        return "\n".join(lines)

    def write_csv(self, path: str | None = None) -> str:
        """`results.csv`: the ranked rows plus wall seconds and the error message."""
        path = path or os.path.join(self.workdir, "results.csv")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*self.columns(), "wall_seconds", "error"])
            for row, t in zip(self.rows(), self.trials, strict=True):
                row = [json.dumps(v) if isinstance(v, list | tuple) else v for v in row]
                writer.writerow([*("" if v is None else v for v in row),
                                 round(t.wall_seconds, 1), t.error or ""])
        os.replace(tmp, path)
        return path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return json.dumps(v)
    return str(v)


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def rank_trials(trials: list[Trial], mode: str) -> list[Trial]:
    """Best value first (max or min by `mode`), then unfinished trials, then failed ones; ties
    by trial index."""
    def key(t: Trial):
        if t.status == "failed":
            return (2, 0.0, t.index)
        if t.value is None:
            return (1, 0.0, t.index)
        return (0, -t.value if mode == "max" else t.value, t.index)

    return sorted(trials, key=key)


def _trial_dir(workdir: str, index: int) -> str:
    return os.path.join(workdir, f"trial_{index:04d}")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: Any) -> None:
    """Atomically (other workers read these files while we write)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def read_trials(workdir: str) -> list[Trial]:
    """Every `trial_*/trial.json` under the sweep workdir (any worker's), by index."""
    out = []
    if not os.path.isdir(workdir):
        return out
    for name in sorted(os.listdir(workdir)):
        if name.startswith("trial_"):
            record = _read_json(os.path.join(workdir, name, "trial.json"))
            if record is not None:
                out.append(Trial.from_json(record, os.path.join(workdir, name)))
    return out


def load_results(workdir: str, *, write: bool = True) -> SweepResult:
    """The sweep's results from its workdir alone (no training); rewrites results.csv."""
    workdir = os.path.abspath(workdir)
    meta = _read_json(os.path.join(workdir, "sweep.json"))
    if meta is None:
        raise SweepError(f"{workdir!r} holds no sweep (no sweep.json). Pass the --workdir of a "
                         "sweep that has started.")
    result = SweepResult(
        workdir=workdir, metric=meta["metric"], mode=meta["mode"], size=meta["size"],
        trials=rank_trials(read_trials(workdir), meta["mode"]),
        parameters=[name for name, _ in meta["space"]["parameters"]],
    )
    if write:
        result.write_csv()
    return result


# ---------------------------------------------------------------------------------------------
# Running


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_sweep_json(workdir: str, sweep: Sweep, config) -> None:
    """Record the sweep in sweep.json; refuse another search space in the same workdir."""
    path = os.path.join(workdir, "sweep.json")
    base = json.loads(config.to_json_best_effort())
    new = {"sweep_file": sweep.source, "metric": sweep.metric, "mode": sweep.mode,
           "size": sweep.size, "num_trials": sweep.num_trials, "space": sweep.space(),
           "fingerprint": _fingerprint(sweep.space()), "base_config": base}
    old = _read_json(path)
    if old is not None:
        if old["fingerprint"] != new["fingerprint"]:
            a, b = old["space"], sweep.space()
            what = [k for k in ("method", "seed") if a[k] != b[k]]
            pa, pb = dict(map(tuple, a["parameters"])), dict(map(tuple, b["parameters"]))
            what += [f"parameter {k!r}" for k in dict.fromkeys([*pa, *pb])
                     if json.dumps(pa.get(k)) != json.dumps(pb.get(k))]
            if not what:
                what = ["the order of the parameters"]
            raise SweepError(
                f"{workdir} holds a sweep over another search space ({', '.join(what)} differ "
                f"from its sweep.json, written from {old['sweep_file']}). Its trials would not "
                f"match {sweep.source}: use a new --workdir, or restore the sweep file.")
        if (old["metric"], old["mode"]) != (sweep.metric, sweep.mode):
            scored = [t.index for t in read_trials(workdir) if t.value is not None]
            if scored or (sweep.method == "bayes" and old["mode"] != sweep.mode):
                raise SweepError(
                    f"{workdir} was swept for {old['mode']} {old['metric']}, and "
                    f"{sweep.source} now asks for {sweep.mode} {sweep.metric}; the finished "
                    "trials were scored by the old one. Use a new --workdir, or restore the "
                    "metric and mode.")
        before = _flat(old["base_config"])
        changed = sorted(k for k, v in _flat(base).items()
                         if json.dumps(before.get(k)) != json.dumps(v))
        if changed:
            logging.warning("Sweep %s: the base config differs from the one the sweep started "
                            "with in %s; earlier trials used the old values.", workdir, changed)
    if old != new:
        _write_json(path, new)


@dataclasses.dataclass
class _Outcome:
    status: str
    value: float | None = None
    best_step: int | None = None
    preempted: bool = False


class _Runner:
    """Runs trials of one worker; shared by the grid/random and bayes loops."""

    def __init__(self, config, sweep: Sweep, workdir: str, worker: int, num_workers: int,
                 task, devices, max_trials: int | None, retry_failed: bool):
        self.config, self.sweep, self.workdir = config, sweep, workdir
        self.worker, self.num_workers = worker, num_workers
        self.task, self.devices, self.max_trials = task, devices, max_trials
        self.retry_failed = retry_failed
        self.ran: list[int] = []
        self.errors: list[str] = []  # of the trials that failed in a row, most recent last
        self.preempted = False

    def budget_left(self) -> bool:
        return not self.preempted and (self.max_trials is None
                                       or len(self.ran) < self.max_trials)

    def run_trial(self, index: int, params: dict[str, Any]) -> _Outcome:
        """Train one trial in its own workdir (resuming its checkpoint), record trial.json."""
        tdir = _trial_dir(self.workdir, index)
        os.makedirs(tdir, exist_ok=True)
        path = os.path.join(tdir, "trial.json")
        previous = _read_json(path) or {}
        record = {"index": index, "worker": self.worker, "status": "running", "params": params,
                  "metric": self.sweep.metric, "value": None, "best_step": None,
                  "final_step": None, "error": None,
                  "wall_seconds": previous.get("wall_seconds", 0.0),
                  "started_at": previous.get("started_at") or _now()}
        _write_json(path, record)
        self.ran.append(index)
        logging.info("Sweep: trial %d (worker %d/%d, %s): %s", index, self.worker,
                     self.num_workers, "resuming" if previous else "starting",
                     _fmt_params(params))
        t0 = time.perf_counter()
        outcome = _Outcome("failed")
        try:
            cfg = apply_params(self.config, params)
            with open(os.path.join(tdir, "config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=2))
            result = trainer_lib.Trainer(cfg, tdir, task=self.task,
                                         devices=self.devices).train()
        except trainer_lib.CheckpointSaveError:
            raise  # the disk, not the trial: stop; a re-run resumes this trial
        except Exception as e:  # noqa: BLE001 - a trial's failure is a result of the sweep
            record["error"] = f"{type(e).__name__}: {e}"
            logging.error("Sweep: trial %d failed: %s\n%s", index, record["error"],
                          traceback.format_exc())
        else:
            if result.preempted:
                self.preempted = True
                outcome = _Outcome("running", preempted=True)
            else:
                value, step = self._score(result.metrics, index)
                record.update(final_step=result.final_step, value=value, best_step=step)
                if value is None:
                    record["error"] = f"{self.sweep.metric} was never finite in the evaluations"
                    outcome = _Outcome("failed")
                else:
                    status = "early_stopped" if result.stopped_early else "complete"
                    outcome = _Outcome(status, value, step)
        finally:
            result = None  # drop the final state, then free arrays held in reference cycles
            gc.collect()
        record["status"] = outcome.status
        record["wall_seconds"] = record["wall_seconds"] + time.perf_counter() - t0
        if outcome.status != "running":
            record["finished_at"] = _now()
        _write_json(path, record)
        logging.info("Sweep: trial %d %s%s", index, outcome.status,
                     f": {self.sweep.metric} = {outcome.value:.4g} (step {outcome.best_step})"
                     if outcome.value is not None else "")
        self.write_results()
        self.errors = [*self.errors, record["error"]] if outcome.status == "failed" else []
        return outcome

    def check_failures(self) -> None:
        last = self.errors[-REPEATED_FAILURES:]
        if len(last) == REPEATED_FAILURES and len(set(last)) == 1:
            raise RepeatedFailureError(
                f"The last {REPEATED_FAILURES} trials, with different values, all failed with "
                f"the same error: {last[0]} That is a problem of the task or the setup, not of "
                "the hyperparameters (the traceback is in the log above): fix it, then re-run "
                "the same command with --retry_failed to run the failed trials again.")

    def done(self, record: dict | None) -> bool:
        """Skip this trial: it finished (and is not a failure to retry)."""
        status = (record or {}).get("status")
        return status in FINISHED and not (self.retry_failed and status == "failed")

    def _score(self, records: list[dict], index: int) -> tuple[float | None, int | None]:
        """Best (value, step) of the metric over the eval records."""
        metric, mode = self.sweep.metric, self.sweep.mode
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        if evals and not any(metric in r for r in evals):
            available = sorted({k for r in evals for k in r if k.startswith("eval/")})
            raise SweepError(
                f"{self.sweep.source}: metric {metric!r} is not recorded by this task (trial "
                f"{index} evaluated {available}). Set 'metric' to one of them and re-run: "
                "the trial resumes without training again.")
        best: tuple[float | None, int | None] = (None, None)
        for r in evals:
            v = r.get(metric)
            if v is None or not math.isfinite(v):
                continue
            if best[0] is None or (v > best[0] if mode == "max" else v < best[0]):
                best = (float(v), int(r["step"]))
        return best

    def write_results(self) -> None:
        try:
            load_results(self.workdir)
        except OSError as e:  # a results file is a convenience: never stop the sweep for it
            logging.warning("Sweep: could not write results.csv: %s", e)

    # ---------------------------------------------------------------- grid / random

    def run_indexed(self) -> None:
        for index, params in trial_plan(self.sweep, self.worker, self.num_workers):
            record = _read_json(os.path.join(_trial_dir(self.workdir, index), "trial.json"))
            if self.done(record):
                continue
            if not self.budget_left():
                return
            self.run_trial(index, params)
            self.check_failures()

    # ---------------------------------------------------------------- bayes

    def run_bayes(self) -> None:
        optuna = import_optuna(self.sweep.source)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState

        sweep = self.sweep
        storage = JournalStorage(JournalFileBackend(os.path.join(self.workdir, JOURNAL)))
        direction = "maximize" if sweep.mode == "max" else "minimize"
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=direction,
                                    load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=sweep.seed))
        # a fresh seed per (worker, restart): two workers, or a resumed worker, must not draw
        # the same startup trials again
        seed = np.random.SeedSequence([sweep.seed, self.worker, len(study.trials)])
        study.sampler = optuna.samplers.TPESampler(
            seed=int(seed.generate_state(1)[0]), n_startup_trials=sweep.startup_trials)

        def tell(number: int, outcome: _Outcome) -> None:
            if outcome.status == "running":
                return
            if outcome.status == "failed":
                study.tell(number, state=TrialState.FAIL)
            else:
                study.tell(number, outcome.value)

        # this worker's trials left running by an interrupted run: resume (or just tell)
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.user_attrs.get("surplus"):
                continue
            record = _read_json(os.path.join(_trial_dir(self.workdir, frozen.number),
                                             "trial.json"))
            owner = record["worker"] if record else frozen.user_attrs.get("worker", 0)
            if owner % self.num_workers != self.worker:
                continue
            if record and record.get("status") in FINISHED:  # crashed before telling
                tell(frozen.number, _Outcome(record["status"], record.get("value")))
                continue
            if not self.budget_left():
                return
            trial = optuna.trial.Trial(study, frozen._trial_id)
            trial.set_user_attr("worker", self.worker)
            tell(frozen.number, self.run_trial(frozen.number, self._suggest(trial)))
            self.check_failures()

        def used(upto: int | None = None) -> int:
            """Trials taken (up to number `upto`); with retry_failed, failed ones are replaced."""
            return sum(1 for t in study.get_trials(deepcopy=False)
                       if not t.user_attrs.get("surplus") and (upto is None or t.number <= upto)
                       and not (self.retry_failed and t.state == TrialState.FAIL))

        while self.budget_left() and used() < sweep.num_trials:
            trial = study.ask()
            if used(trial.number) > sweep.num_trials:  # another worker took the last one
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                break
            trial.set_user_attr("worker", self.worker)
            tell(trial.number, self.run_trial(trial.number, self._suggest(trial)))
            self.check_failures()

    def _suggest(self, trial) -> dict[str, Any]:
        out = {}
        for name, spec in self.sweep.parameters.items():
            if spec.values is not None:
                if all(v is None or isinstance(v, bool | int | float | str) for v in spec.values):
                    out[name] = trial.suggest_categorical(name, list(spec.values))
                else:  # Optuna takes primitives only: choose by the value's JSON text
                    choices = {json.dumps(v): v for v in spec.values}
                    out[name] = choices[trial.suggest_categorical(name, list(choices))]
            elif spec.int:
                out[name] = trial.suggest_int(name, spec.min, spec.max, log=spec.log)
            else:
                out[name] = trial.suggest_float(name, spec.min, spec.max, log=spec.log)
        return out


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def run_sweep(
    config: ml_collections.ConfigDict,
    sweep: str | os.PathLike | Mapping | Sweep,
    workdir: str | os.PathLike,
    *,
    worker: int = 0,
    num_workers: int = 1,
    task: type | None = None,
    devices: list | None = None,
    max_trials: int | None = None,
    retry_failed: bool = False,
) -> SweepResult:
    """Run (or continue) this worker's share of a sweep; return every trial's result so far.

    `sweep` is a sweep file path, a dict in the sweep-file format, or a :class:`Sweep`. Trials
    run one after another in this process, each a normal Trainer run in
    `<workdir>/trial_<NNNN>/` (`task` and `devices` go to the Trainer). `max_trials` stops after
    that many trials (started or resumed) in this call; re-running continues the sweep.
    `retry_failed` runs failed trials again (grid / random: in their directories, resuming any
    checkpoint; bayes: new trials are asked in place of the failed ones). Raises
    RepeatedFailureError when 3 trials in a row fail with the same error.
    """
    if not (0 <= worker < num_workers):
        raise SweepError(f"--worker must be in [0, --num_workers={num_workers}); got {worker}.")
    from jaxtrain.tasks import get_task

    task or get_task(config.task)  # an unknown task fails here, not once per trial
    spec = load_sweep(sweep, config, task=task)
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    _check_sweep_json(workdir, spec, config)
    runner = _Runner(config, spec, workdir, worker, num_workers, task, devices, max_trials,
                     retry_failed)
    logging.info("Sweep %s (%s, %d trials, %s %s) in %s: worker %d of %d.", spec.source,
                 spec.method, spec.size, spec.mode, spec.metric, workdir, worker, num_workers)
    if spec.method == "bayes":
        runner.run_bayes()
    else:
        runner.run_indexed()
    result = load_results(workdir)
    result.ran, result.preempted = runner.ran, runner.preempted
    return result


def workers_from_env() -> tuple[int, int]:
    """(worker, num_workers) from SLURM_PROCID / SLURM_NTASKS, else (0, 1)."""
    env = os.environ
    return int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))


# ---------------------------------------------------------------------------------------------
# Command line


def _main(argv: list[str], cli: Any) -> int:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    workdir = cli._WORKDIR.value
    if workdir is None and f.sweep:
        workdir = os.path.join("runs", "sweep_" + os.path.splitext(os.path.basename(f.sweep))[0])
    try:
        if f.results:
            if workdir is None:
                raise app.UsageError("--results needs --workdir (or --sweep) to find the sweep.")
            sys.stdout.write(load_results(workdir).table() + "\n")
            return 0
        if cli._CONFIG.value is None or not f.sweep:
            raise app.UsageError("A sweep needs --config=CONFIG_FILE and --sweep=SWEEP_FILE.")
        env_worker, env_workers = workers_from_env()
        worker = env_worker if f.worker is None else f.worker
        num_workers = env_workers if f.num_workers is None else f.num_workers
        result = run_sweep(cli._CONFIG.value, f.sweep, workdir, worker=worker,
                           num_workers=num_workers, max_trials=f.max_trials,
                           retry_failed=f.retry_failed)
    except ConfigError as e:  # includes SweepError; the message says what to fix
        logging.error("%s: %s", type(e).__name__, e)
        return cli.EXIT_BAD_INPUT
    except (trainer_lib.CheckpointSaveError, RepeatedFailureError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        return cli.EXIT_RUN_FAILED
    logging.info("Sweep results (%s, %s; %s):\n%s", result.metric, result.mode,
                 os.path.join(result.workdir, "results.csv"), result.table())
    if result.preempted:
        return cli.EXIT_PREEMPTED
    if result.trials and all(t.status == "failed" for t in result.trials):
        logging.error("Every trial failed; the first: %s. Fix the cause, then re-run with "
                      "--retry_failed.", result.trials[0].error)
        return cli.EXIT_RUN_FAILED
    if not result.finished:
        logging.info("Trials still to run or running (other workers, or --max_trials): re-run "
                     "the same command to continue.")
    if result.best is not None:
        logging.info("Best: trial %d, %s = %.4g (step %s): %s", result.best.index,
                     result.metric, result.best.value, result.best.best_step,
                     _fmt_params(result.best.params))
    return 0


def run() -> None:
    from absl import app, flags

    from jaxtrain import main as cli  # defines --config and --workdir

    flags.DEFINE_string("sweep", None, "Sweep file with get_sweep(), e.g. sweeps/clip_lr.py.")
    flags.DEFINE_integer("worker", None, "This worker's index in [0, --num_workers); default "
                         "$SLURM_PROCID or 0.")
    flags.DEFINE_integer("num_workers", None, "Workers sharing the sweep; default "
                         "$SLURM_NTASKS or 1.")
    flags.DEFINE_integer("max_trials", None, "Run at most this many trials in this call.")
    flags.DEFINE_bool("retry_failed", False, "Run failed trials again (after fixing a cause "
                      "that was not the hyperparameters).")
    flags.DEFINE_bool("results", False, "Print the results table of --workdir and exit.")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(cli._QuietLibraries())
    app.run(lambda argv: _main(argv, cli))


if __name__ == "__main__":
    sys.exit(run())
