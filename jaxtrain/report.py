"""The run report: one PNG of a run's curves, the training loss, the learning rate and every
eval metric over steps, one panel each, read from the workdir's ``metrics.jsonl``.

    python -m jaxtrain.report --workdir=runs/clip [--out=clip.png]   # default <workdir>/report.png

:class:`jaxtrain.Trainer` writes ``<workdir>/report.png`` at the end of every run (preempted
ones too; process 0) and returns its path as ``result.report_path``. The panels, in order:
``train/loss``, ``train/lr``, then each ``eval/...`` metric sorted by name; a metric that was
never finite gets no panel. Drawn with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

REPORT = "report.png"
TRAIN_PANELS = ("train/loss", "train/lr")
COLUMNS = 3


class ReportError(ValueError):
    """No report can be drawn: no metrics.jsonl, or no metric in it."""


def read_records(workdir: str) -> list[dict[str, float]]:
    """The records of ``<workdir>/metrics.jsonl`` ({"step": s, metric: value, ...}); a line cut
    short (a run killed mid-write) is skipped. A ReportError when there is no such file."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"No metrics in {workdir}: {path} does not exist (is it the workdir "
                          "of a jaxtrain run that logged at least once?).")
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def report_series(records: Sequence[Mapping[str, Any]]
                  ) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} of the panels, in panel order (module docstring): the finite
    values of ``train/loss``, ``train/lr`` and each ``eval/...`` metric, by step (a step logged
    twice, e.g. after a resume, keeps its last value)."""
    names = [k for k in TRAIN_PANELS if any(k in r for r in records)]
    names += sorted({k for r in records for k in r if k.startswith("eval/")})
    series = {}
    for name in names:
        by_step: dict[int, float] = {}
        for r in records:
            value = r.get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                by_step[int(r["step"])] = float(value)
        if by_step:
            steps = sorted(by_step)
            series[name] = (steps, [by_step[s] for s in steps])
    return series


def plot_report(records: Sequence[Mapping[str, Any]], title: str = ""):
    """A matplotlib Figure of the records (:func:`report_series`): one panel (Axes) per metric,
    :data:`COLUMNS` to a row, step on every x axis. A ReportError when there is nothing to
    plot."""
    from matplotlib.figure import Figure

    series = report_series(records)
    if not series:
        raise ReportError("Nothing to plot: the records hold no finite train/loss, train/lr "
                          "or eval/... value.")
    cols = min(COLUMNS, len(series))
    rows = -(-len(series) // cols)
    width, height = 4.2 * cols, 2.9 * rows + (0.4 if title else 0)
    fig = Figure(figsize=(width, height))
    # fixed margins in inches (a layout engine costs more than the drawing)
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.45 / height,
                        top=1 - (0.35 + (0.4 if title else 0)) / height, wspace=0.28,
                        hspace=0.45)
    grid = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, (steps, values)) in zip(grid.flat, series.items(), strict=False):
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3,
                linewidth=1.2)
        ax.set_title(f"{name}  (last {values[-1]:.4g})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(grid.flat)[len(series):]:
        fig.delaxes(ax)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def write_report(workdir: str, out: str | None = None, *, title: str | None = None,
                 records: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Draw the run's report (:func:`plot_report` of `records`, default: its metrics.jsonl)
    into the PNG `out` (default ``<workdir>/report.png``), written to a temporary file and
    renamed, so a reader never sees half a PNG. Returns the path. `title`: default the workdir's
    name and its last step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = read_records(workdir) if records is None else records
    if title is None:
        last = max((int(r["step"]) for r in records), default=0)
        title = f"{os.path.basename(os.path.abspath(workdir))} (step {last})"
    fig = plot_report(records, title)
    out = os.path.abspath(out or os.path.join(workdir, REPORT))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        FigureCanvasAgg(fig)
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def main(argv: Sequence[str]) -> None:
    """absl's entry: the report of --workdir into --out."""
    from absl import flags

    del argv
    values = flags.FLAGS
    try:
        path = write_report(values.workdir, values.out)
    except ReportError as e:
        raise SystemExit(f"jaxtrain.report: {e}") from None
    logging.info("Wrote the run report %s", path)
    print(path)


def run() -> None:
    """Define the flags and run `python -m jaxtrain.report`."""
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "The run whose metrics.jsonl to plot.")
    flags.DEFINE_string("out", None, f"The PNG to write (default: <workdir>/{REPORT}).")
    flags.mark_flag_as_required("workdir")
    app.run(main)


if __name__ == "__main__":
    run()
