"""Where metrics go: tensorboardX events, `metrics.jsonl`, concise log lines, a tqdm bar.

Only process 0 writes. Metric names are namespaced: `train/loss`, `eval/mean_recall@1`, `perf/...`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
from absl import logging


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
        """On resume: drop records past the restored step, return the ones kept."""
        if not os.path.exists(self.jsonl_path):
            return []
        with open(self.jsonl_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if r.get("step", 0) <= step]
        if self.enabled:
            with open(self.jsonl_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        return kept

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k.replace("@", "_at_"), float(v), int(step))
        logging.info("step %d | %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
