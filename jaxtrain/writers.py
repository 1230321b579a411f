"""Where metrics go: tensorboardX events, `metrics.jsonl`, concise log lines, a tqdm bar.

Only process 0 writes. Metric names are namespaced: `train/loss`, `eval/mean_recall@1`, `perf/...`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
from absl import logging


class MetricsWriteError(OSError):
    """Writing the run's metrics (metrics.jsonl, tensorboard) failed: disk full, permissions."""


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> list[dict]:
        """On resume: drop records past the restored step, return the ones kept. A line cut
        short (a crash or a full disk mid-write) is dropped with a warning. The file is
        replaced atomically: a crash here leaves the old one or the new one."""
        if not os.path.exists(self.jsonl_path):
            return []
        records = []
        with open(self.jsonl_path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    logging.warning("Dropping line %d of %s: not a complete record (%r).", n,
                                    self.jsonl_path, line[:80])
        kept = [r for r in records if r.get("step", 0) <= step]
        if self.enabled:
            tmp = self.jsonl_path + ".tmp"
            try:
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(tmp, self.jsonl_path)
            except OSError as e:
                raise MetricsWriteError(
                    f"Rewriting {self.jsonl_path} failed ({e.strerror or e}); it is unchanged. "
                    "Free space (or fix permissions) and re-run the same command.") from e
        return kept

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        try:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise MetricsWriteError(
                f"Writing the metrics of step {step} to {self.jsonl_path} failed "
                f"({e.strerror or e}). Free space (or fix permissions) and re-run the same "
                "command to resume from the latest checkpoint."
            ) from e
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k.replace("@", "_at_"), float(v), int(step))
        logging.info("step %d | %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A text record in tensorboard (e.g. sample completions), process 0 only."""
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        """Flush and close tensorboard; a failure (disk full) is logged, never raised: it
        must not hide the error that ended the run."""
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:
                logging.warning("Could not flush the tensorboard events (%s).", e)


class ProgressBar:
    """tqdm bar on stderr showing loss, lr and samples/s; a no-op when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
