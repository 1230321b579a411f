"""Where metrics go: the trackers of `logging.report_to` (tensorboardX events, `metrics.jsonl`,
W&B; :mod:`jaxtrain.trackers`), concise log lines, a tqdm bar.

Only process 0 writes. Metric names are namespaced: `train/loss`, `eval/mean_recall@1`, `perf/...`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from jaxtrain import console, trackers


class MetricsWriteError(OSError):
    """Writing the run's metrics (metrics.jsonl, tensorboard) failed: disk full, permissions."""


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class JsonlTracker:
    """`metrics.jsonl`: one JSON record per write; the history a resumed run reads back (a
    :class:`jaxtrain.trackers.Tracker`, the writer's own)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> list[dict]:
        """On resume: drop records past the restored step, return the ones kept. A line cut
        short (a crash or a full disk mid-write) is dropped with a warning. The file is
        replaced atomically: a crash here leaves the old one or the new one."""
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    logging.warning("Dropping line %d of %s: not a complete record (%r).", n,
                                    self.path, line[:80])
        kept = [r for r in records if r.get("step", 0) <= step]
        if self.enabled:
            tmp = self.path + ".tmp"
            try:
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(tmp, self.path)
            except OSError as e:
                raise MetricsWriteError(
                    f"Rewriting {self.path} failed ({e.strerror or e}); it is unchanged. "
                    "Free space (or fix permissions) and re-run the same command.") from e
        return kept

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise MetricsWriteError(
                f"Writing the metrics of step {step} to {self.path} failed "
                f"({e.strerror or e}). Free space (or fix permissions) and re-run the same "
                "command to resume from the latest checkpoint."
            ) from e

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Text records stay out of metrics.jsonl (numbers only)."""

    def close(self) -> None:
        pass


class MetricWriter:
    """The run's records to every tracker of `config.logging.report_to` (process 0 only), and
    a log line per write. Without a config: tensorboard (unless `tensorboard=False`) and jsonl.
    `jsonl_path` is `<workdir>/metrics.jsonl` whether or not 'jsonl' is reported to."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None,
                 config: Any = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        logging_cfg = config.get("logging", None) if config is not None else None
        names = trackers.report_to_names(logging_cfg.report_to) if logging_cfg is not None \
            else trackers.DEFAULT_REPORT_TO
        if not tensorboard:
            names = tuple(n for n in names if n != "tensorboard")
        self.report_to = names
        self.run_name = trackers.run_name(config, workdir)
        self.tracked = console.tracked_metrics(config)  # first in the console's eval lines
        self._jsonl = JsonlTracker(self.jsonl_path, self.enabled)
        self._trackers: list[trackers.Tracker] = []
        if self.enabled:
            if "jsonl" in names:
                self._trackers.append(self._jsonl)
            self._trackers += trackers.make_trackers(config, workdir, names)
            logging.info("Run %s: metrics to %s.", self.run_name, ", ".join(names) or "no tracker")

    def truncate_after(self, step: int) -> list[dict]:
        """On resume: the metrics.jsonl records up to the restored step (the later ones are
        dropped from the file); see :meth:`JsonlTracker.truncate_after`."""
        return self._jsonl.truncate_after(step)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for tracker in self._trackers:
            tracker.log(step, metrics)
        # the console gets a few headline metrics (jaxtrain.console.headline); --verbosity=1 all
        logging.info("%s", console.metrics_line(step, metrics, getattr(self, "tracked", ())))
        logging.vlog(1, "step %d | %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in
                                                       metrics.items()))

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A text record (e.g. sample completions) for the trackers that keep text."""
        for tracker in self._trackers:
            tracker.log_text(step, tag, text)

    def close(self) -> None:
        """Close every tracker (flush tensorboard, finish the W&B run); never raises for a
        tracker's failure: it must not hide the error that ended the run."""
        open_trackers, self._trackers = self._trackers, []
        for tracker in open_trackers:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                logging.warning("Could not close the %s tracker (%s).", type(tracker).__name__,
                                e)


class ProgressBar(console.ProgressBar):
    """The run's tqdm bar (:class:`jaxtrain.console.ProgressBar`: rate and ETA on completed
    steps, logs written above it), on process 0 only; a no-op when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        super().__init__(total, initial, enabled, desc, process_index=jax.process_index())
