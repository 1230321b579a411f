"""A sweep's results: every trial's `trial.json`, ranked, as a table and `results.csv`.

    result = load_results("runs/sweep_clip_lr")      # no training; rewrites results.csv
    result.best.params, result.best.value
    print(result.table())

A trial's value is the best value of the sweep's metric over its run's evaluations
(:func:`best_value`). Trials rank best first (by the sweep's mode), then the unfinished, then the
failed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from jaxtrain.sweep.space import format_value
from jaxtrain.sweep.spec import SweepError

FINISHED = ("complete", "early_stopped", "failed")


@dataclasses.dataclass
class Trial:
    """One trial, as its trial.json records it."""

    index: int
    status: str  # running | timeout (stopped by the sweep's timeout) | complete | ... | failed
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
    timed_out: bool = False  # the sweep's timeout stopped a trial or kept one from starting

    @property
    def best(self) -> Trial | None:
        """The best trial with a value, or None."""
        first = self.trials[0] if self.trials else None
        return first if first is not None and first.value is not None else None

    @property
    def finished(self) -> bool:
        """Every trial of the sweep has finished (whichever worker ran it)."""
        done = [t for t in self.trials if t.status in FINISHED]
        return len(done) >= self.size

    def columns(self) -> list[str]:
        """The table's columns: rank, trial, status, the metric, best_step, the parameters."""
        extra = sorted({k for t in self.trials for k in t.params} - set(self.parameters))
        return ["rank", "trial", "status", self.metric, "best_step", *self.parameters, *extra]

    def rows(self) -> list[list[Any]]:
        """One row per trial, in rank order, under :meth:`columns`."""
        params = self.columns()[5:]
        return [[rank, t.index, t.status, t.value, t.best_step,
                 *[t.params.get(p, "") for p in params]]
                for rank, t in enumerate(self.trials, start=1)]

    def table(self) -> str:
        """The ranked trials as a plain-text table."""
        if not self.trials:
            return "(no trials yet)"
        header = self.columns()
        cells = [[format_value(v) for v in row] for row in self.rows()]
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


def trial_dir(workdir: str, index: int) -> str:
    """`<workdir>/trial_<NNNN>`: trial `index`'s run directory (with its trial.json)."""
    return os.path.join(workdir, f"trial_{index:04d}")


def read_json(path: str) -> dict | None:
    """The JSON file's contents, or None when it is missing or unreadable (half-written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj: Any) -> None:
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
            record = read_json(os.path.join(workdir, name, "trial.json"))
            if record is not None:
                out.append(Trial.from_json(record, os.path.join(workdir, name)))
    return out


def load_results(workdir: str, *, write: bool = True) -> SweepResult:
    """The sweep's results from its workdir alone (no training); rewrites results.csv."""
    workdir = os.path.abspath(workdir)
    meta = read_json(os.path.join(workdir, "sweep.json"))
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


def best_value(records: list[Mapping[str, Any]], metric: str,
               mode: str) -> tuple[float | None, int | None]:
    """(the best finite value of `metric` over the records that have it, its step); max or min
    by `mode`; the first of equal values; (None, None) when there is none."""
    best: tuple[float | None, int | None] = (None, None)
    for r in records:
        v = r.get(metric)
        if v is None or not math.isfinite(v):
            continue
        if best[0] is None or (v > best[0] if mode == "max" else v < best[0]):
            best = (float(v), int(r["step"]))
    return best
