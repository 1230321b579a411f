"""The run report (`jaxtrain.report`): one panel per metric (train loss, learning rate, every
eval metric), in order, from metrics.jsonl records; the PNG written by the function and by
`python -m jaxtrain.report`; the errors when there is nothing to plot."""

import json
import math
import os
import subprocess
import sys

import pytest

from jaxtrain.report import ReportError, plot_report, read_records, report_series, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def records():
    """Train summaries every 10 steps, two evaluators every 20 (one metric NaN throughout),
    and a perf metric (no panel)."""
    out = []
    for step in range(10, 61, 10):
        out.append({"step": step, "train/loss": 5.0 / step, "train/lr": 1e-3 * step / 60,
                    "perf/steps_per_second": 3.0})
        if step % 20 == 0:
            out.append({"step": step, "eval/val/loss": 4.0 / step, "eval/val/perplexity":
                        math.exp(4.0 / step), "eval/retrieval/recall@1": step / 100,
                        "eval/retrieval/broken": float("nan")})
    return out


def write_jsonl(workdir, rows):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 70, "train/lo')  # a line cut short by a kill: skipped


def test_one_panel_per_metric_in_order():
    series = report_series(records())
    assert list(series) == ["train/loss", "train/lr", "eval/retrieval/recall@1",
                            "eval/val/loss", "eval/val/perplexity"]
    steps, values = series["eval/val/loss"]
    assert steps == [20, 40, 60] and values == pytest.approx([0.2, 0.1, 4.0 / 60])
    fig = plot_report(records(), "run")
    assert len(fig.axes) == len(series) == 5  # the empty grid cell is removed
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split()[0] for t in titles] == list(series)
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [10, 20, 30, 40, 50, 60]


def test_write_report_and_cli(tmp_path):
    workdir = str(tmp_path / "run")
    write_jsonl(workdir, records())
    assert len(read_records(workdir)) == 9
    path = write_report(workdir)
    assert path == os.path.join(workdir, "report.png")
    assert open(path, "rb").read(8) == PNG
    from PIL import Image

    assert Image.open(path).size == (1260, 620)  # 3 x 4.2 in wide, 2 x 2.9 + 0.4 in high
    out = tmp_path / "elsewhere" / "curves.png"
    done = subprocess.run([sys.executable, "-m", "jaxtrain.report", f"--workdir={workdir}",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out) and out.read_bytes()[:8] == PNG


def test_nothing_to_plot(tmp_path):
    with pytest.raises(ReportError, match="metrics.jsonl does not exist"):
        write_report(str(tmp_path))
    with pytest.raises(ReportError, match="Nothing to plot"):
        plot_report([{"step": 1, "perf/steps_per_second": 2.0}])


def test_end_of_run_report_and_its_switch(tmp_path, monkeypatch):
    """What api.Trainer.train() calls: the report (None and no file with JAXTRAIN_REPORT=0;
    None, not an error, for a run that logged nothing)."""
    from jaxtrain import run_end

    workdir = str(tmp_path / "run")
    write_jsonl(workdir, records())
    monkeypatch.setenv("JAXTRAIN_REPORT", "0")
    assert run_end.write_report(workdir, None) is None
    assert not os.path.exists(os.path.join(workdir, "report.png"))
    monkeypatch.setenv("JAXTRAIN_REPORT", "1")
    assert run_end.write_report(workdir, "t") == os.path.join(workdir, "report.png")
    assert run_end.write_report(str(tmp_path / "empty"), None) is None
