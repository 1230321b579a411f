"""The console a person reads (jaxtrain/console.py): log text never on a progress-bar line, rate
and ETA on completed steps, headline metrics, status lines, the final summary within 100
columns, and the library advisories that say nothing about the run (no TPU, no torch) hidden."""

import io
import logging as pylogging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from jaxtrain import console

ROOT = Path(__file__).resolve().parents[1]
BAR = re.compile(r"^train: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")  # a whole bar, up to its "]"


def bar_and_text_segments(text: str) -> list[str]:
    """What a terminal shows: each line split at carriage returns (tqdm redraws a bar with a
    leading '\\r'), ANSI cursor moves dropped, blank segments dropped."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return [seg for line in text.split("\n") for seg in line.split("\r") if seg.strip()]


def glued(segments: list[str]) -> list[str]:
    """Segments where a bar and other text share a line (`train: 8%|...| 50/600 [...]I1202 ...`,
    or text with a bar after it)."""
    return [seg for seg in segments
            if (BAR.match(seg) and seg[BAR.match(seg).end():].strip())
            or re.search(r".train: +\d+%\|", seg)]


def test_glued_finds_the_issues_console():
    seen = ("train:   8%|▊         | 50/600 [00:40<14:02, 1.53s/it, loss=3.2]I1202 10:23:19.11 "
            "writers.py:79] step 50 | train/loss=3.246")
    ok = ["train:  25%|##5       | 5/20 [00:00, eta 00:00 | loss=1]", "I1207 step 5 | loss=1"]
    assert glued([seen, *ok]) == [seen]


# ------------------------------------------------------------------------------ headline metrics

def test_train_headline_is_loss_lr_throughput_and_mfu():
    summary = {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 3.0,
               "perf/samples_per_second": 180.0, "perf/tokens_per_second": 9000.0,
               "perf/mfu": 0.31, "perf/host_rss_gib": 1.2, "train/nonfinite_steps": 0.0}
    assert console.headline(summary) == {"loss": 2.5, "lr": 1e-3, "tokens/s": 9000.0,
                                         "mfu": 0.31}
    del summary["perf/tokens_per_second"], summary["perf/mfu"]
    assert console.headline(summary) == {"loss": 2.5, "lr": 1e-3, "samples/s": 180.0}


def test_eval_headline_tracked_first_then_losses_then_one_per_evaluator_at_most_4():
    metrics = {f"eval/retrieval/{k}": 0.1 for k in (
        "i2t/recall@1", "i2t/recall@5", "i2t/mean_rank", "mean_recall@1", "loss",
        "chance_recall@1")}
    metrics |= {"eval/zero_shot/chance": 0.25, "eval/zero_shot/accuracy": 0.3,
                "eval/heldout/loss": 2.0, "eval/gen/exact_match": 0.5}
    config = {"checkpoint": {"best_metric": "eval/retrieval/mean_recall@1"},
              "eval": {"early_stop_metric": "eval/zero_shot/accuracy"}}
    tracked = console.tracked_metrics(config)
    assert tracked == ("eval/retrieval/mean_recall@1", "eval/zero_shot/accuracy")
    assert list(console.headline(metrics, tracked)) == [
        "retrieval/mean_recall@1", "zero_shot/accuracy", "retrieval/loss", "heldout/loss"]
    # no tracked metric: losses, then each evaluator's first metric that is not a chance level
    assert list(console.headline(metrics)) == [
        "retrieval/loss", "heldout/loss", "zero_shot/accuracy", "gen/exact_match"]
    line = console.metrics_line(60, metrics, tracked)
    assert line.startswith("step 60 | eval retrieval/mean_recall@1=0.1 ")
    assert line.endswith(f"(+{len(metrics) - 4} more)")
    assert len(line) < 110


def test_eval_headline_fills_up_to_4_from_one_evaluator():
    metrics = {"eval/val/loss": 2.0, "eval/val/perplexity": 7.4, "eval/val/accuracy": 0.3}
    assert console.headline(metrics) == {"val/loss": 2.0, "val/perplexity": 7.4,
                                         "val/accuracy": 0.3}


def test_other_records_are_shown_whole():
    record = {"perf/compile_seconds": 10.85, "perf/xla_flops_per_step": 9.3e9}
    assert console.metrics_line(0, record) == \
        "step 0 | perf/compile_seconds=10.85 perf/xla_flops_per_step=9.3e+09"


# ------------------------------------------------------------------------------ the bar

def test_rate_and_eta_count_completed_steps_not_dispatched_ones():
    bar = console.ProgressBar(total=600, initial=100, enabled=False)
    assert bar.rate_and_eta(100, now=5.0) == (None, None)  # nothing ran yet
    bar.dispatched(1, now=0.0)  # the first step of this call (after the compile)
    for _ in range(59):  # dispatch runs ahead: 60 steps queued, 50 done at the fetch
        bar.dispatched(1, now=0.1)
    rate, eta = bar.rate_and_eta(150, now=25.0)
    assert rate == pytest.approx(50 / 25.0) and eta == pytest.approx(450 / 2.0)
    text = bar.completed(150, {"loss": 2.5}, epoch=1.5, now=25.0)
    assert text == "eta 03:45, 2 step/s | epoch 1.50 | loss=2.5"


def test_log_lines_are_written_above_the_bar(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    handler = pylogging.StreamHandler(sys.stderr)  # like absl's: holds the stderr object
    logger = pylogging.getLogger("jaxtrain-test-console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        bar = console.ProgressBar(total=20, initial=0, enabled=True)
        assert handler.stream is not err  # redirected while the bar is open
        for step in range(1, 21):
            bar.dispatched(1)
            if step % 5 == 0:
                logger.warning("step %d | loss=1.0", step)
                bar.completed(step, {"loss": 1.0})
            if step == 7:
                print("a print", end="", file=sys.stderr)  # a line in two writes
                print(" in two writes", file=sys.stderr)
        bar.close()
    finally:
        logger.removeHandler(handler)
    assert handler.stream is err and sys.stderr is err  # restored
    segments = bar_and_text_segments(err.getvalue())
    assert not glued(segments), segments
    assert "step 20 | loss=1.0" in segments and "a print in two writes" in segments
    assert any(BAR.match(s) and "20/20" in s and "loss=1" in s for s in segments)


# ------------------------------------------------------------------------------ noise, summary

@pytest.mark.parametrize("logger,message,dropped", [
    ("jax._src.xla_bridge", "Unable to initialize backend 'tpu': INTERNAL: Failed to open "
     "libtpu.so: libtpu.so: cannot open shared object file", True),
    ("jax._src.xla_bridge", "Unable to initialize backend 'cuda': no CUDA", True),
    ("jax._src.xla_bridge", "Platform 'cpu' is experimental", False),
    ("transformers", "PyTorch was not found. Models won't be available and only tokenizers, "
     "configuration and file/data utilities can be used.", True),
    ("transformers", "Some other advisory", False),
])
def test_known_library_noise_is_dropped_exactly(logger, message, dropped):
    console.quiet_known_noise()
    console.quiet_known_noise()  # idempotent
    log = pylogging.getLogger(logger)
    level = pylogging.INFO if logger.startswith("jax") else pylogging.WARNING
    record = log.makeRecord(logger, level, __file__, 1, message, (), None)
    assert log.filter(record) is (not dropped)
    if dropped:  # the same text as an error is never hidden
        record.levelno = pylogging.ERROR
        assert log.filter(record)


NO_TORCH = """
import importlib.abc, importlib.util, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoTorch())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a, **k: None if n.split(".")[0] == "torch" else \\
    find_spec(n, *a, **k)
if sys.argv[1] == "quiet":
    from jaxtrain import cli
    cli.setup_logging()
import transformers
"""


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_transformers_without_torch_advisory_is_hidden_by_setup_logging(tmp_path, mode):
    """The real advisory, on a machine without torch (hidden from the import system): printed by
    a bare import, not after :func:`jaxtrain.cli.setup_logging`."""
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("PyTorch was not found" in proc.stderr) is (mode == "loud"), proc.stderr[-3000:]


def test_final_summary_fits_100_columns_and_says_where_everything_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = str(tmp_path / "runs" / "clip")
    result = types.SimpleNamespace(
        workdir=workdir, final_step=600, epoch=2.0, final_loss=1.2345678, run_name="clip",
        best_step=400, best_metric=0.6123, best_epoch=1.3333, stopped_early=False,
        preempted=False, best_checkpoint_path=f"{workdir}/checkpoints/400",
        checkpoint_paths=[f"{workdir}/checkpoints/400", f"{workdir}/checkpoints/600"],
        report_path=f"{workdir}/report.png", exports={"hf": f"{workdir}/export/hf"})
    lines = console.final_summary(result, ("eval/retrieval/mean_recall@1",),
                                  f"{workdir}/eval_table.txt")
    assert lines == [
        "Done: 600 steps (2.00 epochs), final train loss 1.235 (run clip)",
        "Best retrieval/mean_recall@1 = 0.6123 at step 400 (epoch 1.33)",
        "Workdir:     runs/clip",
        "Checkpoint:  <workdir>/checkpoints/400 (best)",
        "Report:      <workdir>/report.png",
        "Export hf:   <workdir>/export/hf",
        "Eval table:  <workdir>/eval_table.txt",
        "Curves:      tensorboard --logdir runs/clip/tensorboard",
    ]
    assert max(map(len, lines)) <= console.SUMMARY_WIDTH


# ------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_captured_console_of_a_default_like_run(tmp_path):
    """The CLI as a user runs it (JAX probing for a TPU: JAX_PLATFORMS unset), bar on: no log
    text on a bar line, status lines for the silent phases, the summary within 100 columns,
    the wide eval table in a file, no libtpu message."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["COLUMNS"] = "120"
    env.pop("TRANSFORMERS_VERBOSITY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", f"--config={ROOT}/configs/clip.py:runlocal",
         f"--workdir={tmp_path}/run", "--config.train.steps=20", "--config.train.log_every=5",
         "--config.eval.every=10", "--config.checkpoint.every=0",
         "--config.optim.warmup_steps=5", "--config.data.train_examples=512"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stderr)
    segments = bar_and_text_segments(proc.stderr)
    assert not glued(segments), "\n".join(glued(segments))
    bars = [s for s in segments if BAR.match(s)]
    assert bars and "20/20" in bars[-1] and "loss=" in bars[-1] and "eta 00:00" in bars[-1]
    text = [s for s in segments if not BAR.match(s)]
    for status in ("Building the task, its data and the model…", "Compiling the train step…",
                   "Initialising the model and the training data…"):
        assert any(status in s for s in text), status
    assert not [s for s in text if "libtpu" in s or "Unable to initialize backend" in s]
    assert not [s for s in text if "PyTorch was not found" in s]
    steps = [s for s in text if " step 10 | " in s]
    assert any("| loss=" in s for s in steps) and any("| eval " in s for s in steps), steps
    assert all(len(s) < 160 for s in steps), steps
    summary = text[next(i for i, s in enumerate(text) if s.startswith("Done: 20 steps")):]
    assert summary[1].startswith("Best retrieval/mean_recall@1 = ") and "at step" in summary[1]
    assert max(map(len, summary)) <= 100, summary
    assert any(s.startswith("Eval table:  <workdir>/eval_table.txt") for s in summary)
    table = (tmp_path / "run" / "eval_table.txt").read_text().splitlines()
    assert table[0].split()[0] == "step" and [r.split()[0] for r in table[1:]] == ["10", "20"]
