"""The command line end to end: the tiny CLIP variant trains, evaluates, checkpoints. (Re-running
the same command resumes: test_faults.py checks it on the run a SIGTERM stopped.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(workdir):
    return subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", f"--config={ROOT}/configs/clip.py:runlocal",
         f"--workdir={workdir}", "--config.train.progress_bar=False"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )


def test_tiny_clip_run_learns_and_checkpoints(tmp_path):
    proc = run_cli(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/retrieval/mean_recall@1" in r]
    assert [r["step"] for r in evals] == [30, 60]
    final = evals[-1]
    # 240 held-out captions: chance recall@1 is 1/240; the tiny run must be far above it
    assert final["eval/retrieval/chance_recall@1"] == 1 / 240
    assert final["eval/retrieval/mean_recall@1"] > 5 / 240, final
    assert final["eval/retrieval/i2t/recall@5"] > final["eval/retrieval/i2t/recall@1"]
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert train[-1]["perf/samples_per_second"] > 0
    assert any((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "clip"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "30", "60"]
    assert "mean_recall@1 = " in proc.stderr  # the final summary's best line
    assert "at step 60" in proc.stderr or "at step 30" in proc.stderr
