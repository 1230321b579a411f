"""The sweep file: reading it and checking it against the config it sweeps.

A sweep file is a Python file whose ``get_sweep()`` returns a dict (or ConfigDict); its format is
in :mod:`jaxtrain.sweep`. :func:`load_sweep` turns it (or such a dict) into a
:class:`~jaxtrain.sweep.space.Sweep`, or raises :class:`SweepError` naming the file and the fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import zlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import ml_collections

from jaxtrain.config import check_keys, check_types, validate
from jaxtrain.errors import ConfigError
from jaxtrain.sweep.space import ParamSpec, Sweep, apply_params, config_value, format_params
from jaxtrain.task import Task
from jaxtrain.tasks import get_task

METHODS = ("grid", "random", "bayes")
MODES = ("max", "min")
SWEEP_KEYS = ("method", "metric", "mode", "num_trials", "seed", "startup_trials", "parameters")
SPEC_KEYS = ("values", "min", "max", "log", "int")


class SweepError(ConfigError):
    """The sweep file, or the sweep workdir, is not usable. The message names the file and fix."""


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
                task: type[Task] | None = None) -> Sweep:
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
                             "jaxtrain/sweep/__init__.py or sweeps/clip_lr.py).")
    method, metric, mode = raw["method"], raw["metric"], raw["mode"]
    if method not in METHODS:
        raise SweepError(f"{source}: 'method' must be one of {', '.join(METHODS)}; got "
                         f"{method!r}.{_close(method, METHODS)}")
    _check_metric(metric, config, source)
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


def _check_metric(metric: Any, config: ml_collections.ConfigDict, source: str) -> None:
    """`eval/<evaluator>/<metric>`, of an evaluator the config has (`config.evals`)."""
    evaluators = sorted(config.get("evals", {}))
    example = f"'eval/{(evaluators or ['val'])[0]}/loss'"
    if not (isinstance(metric, str) and metric.startswith("eval/") and metric.count("/") >= 2):
        raise SweepError(f"{source}: 'metric' must name an eval metric the trainer records, "
                         f"'eval/<evaluator>/<metric>' such as {example} or "
                         f"'eval/retrieval/mean_recall@1'; got {metric!r}.")
    name = metric.split("/")[1]
    if name not in evaluators:
        raise SweepError(f"{source}: 'metric' {metric!r} names the evaluator {name!r}, which the "
                         f"config does not have.{_close(name, evaluators)} Its evaluators: "
                         f"{evaluators} (config.evals); e.g. {example}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _tree(path: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def _parse_spec(spec: Any, name: str, method: str, config, source: str) -> ParamSpec:
    where = f"{source}: parameter {name!r}"
    try:
        check_keys(_tree(name, None), config)
    except ConfigError as e:
        raise SweepError(f"{source}: parameters: {e} Fix the key in get_sweep()'s "
                         "'parameters'.") from None
    default = config_value(config, name)
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


def _validate_grid(sweep: Sweep, config: ml_collections.ConfigDict,
                   task: type[Task] | None) -> None:
    """Every grid combination must pass the task's config validation (cheap: no JAX)."""
    task_cls = task or get_task(config.task)  # an unknown task is a ConfigError naming it
    schema, rules = task_cls.schema(config), task_cls.config_rules()
    for index in range(sweep.size):
        params = sweep.params(index)
        try:
            validate(apply_params(config, params), schema, rules)
        except (ConfigError, TypeError, ValueError) as e:
            raise SweepError(f"{sweep.source}: grid trial {index} ({format_params(params)}) gives "
                             f"an invalid config: {e} Fix the values in 'parameters'.") from None


def load_sweep(sweep: str | os.PathLike | Mapping | Sweep, config: ml_collections.ConfigDict,
               *, task: type[Task] | None = None) -> Sweep:
    """A Sweep from a sweep file path, a dict / ConfigDict, or a Sweep (returned as is)."""
    if isinstance(sweep, Sweep):
        return sweep
    if isinstance(sweep, str | os.PathLike):
        path = os.fspath(sweep)
        return parse_sweep(read_sweep_file(path), config, source=path, task=task)
    return parse_sweep(sweep, config, task=task)


def import_optuna(source: str = "<sweep>") -> ModuleType:
    """Optuna, imported only for bayes sweeps."""
    try:
        import optuna
    except ImportError:
        raise SweepError(f"{source}: method 'bayes' needs Optuna, which is not installed: "
                         "pip install optuna (or pip install -e \".[sweep]\"). Grid and random "
                         "sweeps need nothing extra.") from None
    return optuna
