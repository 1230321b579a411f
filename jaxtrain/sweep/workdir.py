"""A sweep workdir's identity: `sweep.json` records the search space it was started with.

Re-running a sweep in its workdir continues it; :func:`record_sweep` refuses another search space
there (its trials would not match), and another metric or mode once a trial has a value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from jaxtrain.sweep.results import read_json, read_trials, write_json
from jaxtrain.sweep.space import Sweep
from jaxtrain.sweep.spec import SweepError


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


def record_sweep(workdir: str, sweep: Sweep, config: ml_collections.ConfigDict) -> None:
    """Record the sweep in sweep.json; refuse another search space in the same workdir."""
    path = os.path.join(workdir, "sweep.json")
    base = json.loads(config.to_json_best_effort())
    new = {"sweep_file": sweep.source, "metric": sweep.metric, "mode": sweep.mode,
           "size": sweep.size, "num_trials": sweep.num_trials, "space": sweep.space(),
           "fingerprint": _fingerprint(sweep.space()), "base_config": base}
    old = read_json(path)
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
        write_json(path, new)
