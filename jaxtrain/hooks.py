"""Hooks on the training loop: every periodic concern of a run is one.

The loop (:meth:`jaxtrain.trainer.Trainer.loop`) only steps; after every step it calls each
hook's :meth:`Hook.after_step` in order, with a :class:`Loop` that holds the run's state. A hook
reads it and may ask the loop to stop (``loop.request_stop(why)``) or to save a checkpoint at
this step (``loop.save = True``). The default hooks of :meth:`Trainer.train`, in order:

    MetricsHook      every train.log_every steps: fetch the step metrics (the only host sync),
                     summarise, write them, check non-finite steps
    ProgressHook     the tqdm bar
    EvalHook         each evaluator on its own cadence; metrics `eval/<name>/...`
    BestHook         best-metric and early-stopping bookkeeping (may stop the run)
    <user hooks>     `Trainer(..., hooks=[...])`: e.g. the LR finder's stop rule, a sweep's
                     trial reporting
    PreemptionHook   SIGTERM / the preemption service: stop (with a checkpoint)
    CheckpointHook   every checkpoint.every steps, at a new best, and when the loop stops

A new periodic concern is a new hook (a subclass overriding any of on_start / after_step /
on_end); `train()` does not change.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxtrain import console
from jaxtrain.checkpoint import Checkpointer, CheckpointSaveError
from jaxtrain.config import ConfigError
from jaxtrain.epochs import due
from jaxtrain.errors import brief
from jaxtrain.writers import MetricWriter, ProgressBar


class NonFiniteError(FloatingPointError):
    """The loss or gradients became NaN/Inf and `train.nonfinite='error'`."""


def _improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best`; a non-finite value (a diverged model) never does."""
    if not np.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


@dataclasses.dataclass
class Progress:
    """Best-metric and early-stopping bookkeeping, saved in every checkpoint's JSON.

    The best is tracked by `checkpoint.best_metric` (else `eval.early_stop_metric`); early
    stopping counts evaluations whose `early_stop_metric` did not beat the best by `min_delta`.
    """

    best_step: int | None = None
    best_value: float | None = None
    es_best: float | None = None
    es_bad: int = 0
    tokens_seen: int = 0

    def update(self, step: int, metrics: dict[str, float], cfg) -> bool:
        """Record one evaluation (the metrics of the evaluators that ran at `step`); True when
        early stopping says stop. A metric whose evaluator did not run is not counted."""
        track = cfg.checkpoint.best_metric or cfg.eval.early_stop_metric
        if track and track in metrics:
            mode = cfg.checkpoint.best_mode if cfg.checkpoint.best_metric else \
                cfg.eval.early_stop_mode
            if _improved(metrics[track], self.best_value, mode):
                self.best_step, self.best_value = step, metrics[track]
        es = cfg.eval.early_stop_metric
        if not es or es not in metrics:
            return False
        if _improved(metrics[es], self.es_best, cfg.eval.early_stop_mode, cfg.eval.min_delta):
            self.es_best, self.es_bad = metrics[es], 0
        else:
            self.es_bad += 1
        if self.es_bad >= cfg.eval.patience:
            logging.info("Early stopping at step %d: %s did not improve for %d evaluations.",
                         step, es, cfg.eval.patience)
            return True
        return False


@dataclasses.dataclass
class Loop:
    """What the hooks see: the run so far. Hooks read it; they change only `stop`/`save` (by
    :meth:`request_stop` and ``save = True``) and the records they own."""

    trainer: Any  # the jaxtrain.trainer.Trainer running the loop
    state: Any  # the TrainState after the latest step
    train_iter: Any
    start: int  # the step this call started (or resumed) from
    stop_at: int  # the last step this call runs
    step: int = 0  # steps done
    metrics: Any = None  # the latest step's metrics, on device
    compiled: Any = None  # the trainer's CompiledStep that ran it (cost figures)
    eval_metrics: dict[str, float] | None = None  # set by EvalHook at an evaluation step
    progress: Progress = dataclasses.field(default_factory=Progress)
    writer: MetricWriter | None = None
    records: list[dict] = dataclasses.field(default_factory=list)  # metrics.jsonl, in memory
    loss_history: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    summary: dict[str, float] = dataclasses.field(default_factory=dict)  # last train summary
    stop: bool = False
    stop_reason: str = ""  # "early_stop", "preempted", or a hook's own word
    save: bool = False

    @property
    def config(self):
        return self.trainer.config

    @property
    def total(self) -> int:
        return self.trainer.config.train.steps

    @property
    def epoch(self) -> float | None:
        """Epochs done at `step` (`step / trainer.steps_per_epoch`); None when the dataset
        size is unknown (a streaming task)."""
        per_epoch = getattr(self.trainer, "steps_per_epoch", None)
        return self.step / per_epoch if per_epoch else None

    def due(self, every: int | str) -> bool:
        """Whether a cadence falls on this step: every `every` steps (0 = never), or 'epoch'
        (the step where each epoch ends, ceil(k * steps_per_epoch); jaxtrain/epochs.py)."""
        examples = getattr(self.trainer, "train_examples", None) if every == "epoch" else None
        return due(every, self.step, examples, self.config.train.batch_size)

    @property
    def last(self) -> bool:
        """This step ends the loop (the last step, or a hook asked to stop)."""
        return self.stop or self.step == self.stop_at

    def request_stop(self, reason: str) -> None:
        self.stop = True
        self.stop_reason = self.stop_reason or reason

    def write(self, metrics: dict[str, float]) -> None:
        """Write metrics at this step (jsonl, tensorboard, log) and keep them in `records`."""
        if self.writer is not None:
            self.writer.write(self.step, metrics)
        self.records.append({"step": self.step, **metrics})


class Hook:
    """A periodic concern of the loop. Override what you need; all are no-ops here."""

    def on_start(self, loop: Loop) -> None:
        """Before the first step of this call (after a restore)."""

    def after_step(self, loop: Loop) -> None:
        """After every step (`loop.step` steps are done)."""

    def on_end(self, loop: Loop) -> None:
        """When the loop ends, normally or by an exception (release what on_start took)."""


@dataclasses.dataclass
class Window:
    """Work done since the last log step (host-side numbers: no device sync)."""

    samples: int = 0
    tokens: int = 0
    xla_flops: float = 0.0
    model_flops: float = 0.0

    def add(self, step: Any) -> None:
        self.samples += step.samples
        self.tokens += step.tokens
        self.xla_flops += step.xla_flops
        self.model_flops += step.model_flops


class MetricsHook(Hook):
    """Train metrics: kept on device between log steps, fetched together every
    `train.log_every` steps (and at the last step), averaged, written; throughput and MFU;
    non-finite steps checked per `train.nonfinite`."""

    def __init__(self, log_every: int):
        self.log_every = log_every

    def on_start(self, loop: Loop) -> None:
        self.pending: list[Any] = []
        self.window = Window()
        self.t_last = time.perf_counter()
        self.streak = 0

    def after_step(self, loop: Loop) -> None:
        compiled = loop.compiled
        if not compiled.reported:
            loop.writer.write(loop.step - 1, {"perf/compile_seconds": compiled.seconds,
                                              "perf/xla_flops_per_step": compiled.xla_flops})
            compiled.reported = True
            self.t_last = time.perf_counter()
        self.pending.append(loop.metrics)
        self.window.add(compiled)
        loop.progress.tokens_seen += compiled.tokens
        if loop.step % self.log_every and loop.step != loop.stop_at:
            return
        host = jax.device_get(self.pending)
        dt = time.perf_counter() - self.t_last
        summary = loop.trainer.summarize(host, len(host), dt, self.window)
        if self.window.tokens:
            summary["train/tokens_seen"] = float(loop.progress.tokens_seen)
        if loop.epoch is not None:
            summary["train/epoch"] = loop.epoch
        done = loop.step
        loop.loss_history += [(done - len(host) + i + 1, float(m["loss"]))
                              for i, m in enumerate(host)]
        loop.write(summary)
        loop.summary = summary
        self.streak = check_nonfinite(loop.config.train, host, done, self.streak)
        self.pending, self.window = [], Window()
        self.t_last = time.perf_counter()


def check_nonfinite(train_cfg, host: list[dict], done: int, streak: int) -> int:
    """Raise per `train.nonfinite`; return the run of consecutive skipped steps so far."""
    bad = [done - len(host) + i + 1 for i, m in enumerate(host) if m["nonfinite"]]
    if bad and train_cfg.nonfinite == "error":
        raise NonFiniteError(
            f"Non-finite loss or gradients at step(s) {bad[:10]} (those updates were not "
            "applied). Lower optim.lr, set optim.clip_norm, or set "
            "train.nonfinite='skip' to skip such steps."
        )
    for m in host:
        # a step skipped by dynamic loss scaling (`overflow`) is expected: it neither counts
        # toward the streak nor ends it
        streak = streak + 1 if m["nonfinite"] else streak if m.get("overflow") else 0
        if train_cfg.max_nonfinite_streak and streak >= train_cfg.max_nonfinite_streak:
            raise NonFiniteError(
                f"{streak} consecutive steps up to step {done} had a non-finite loss or "
                "gradients and were skipped (train.max_nonfinite_streak="
                f"{train_cfg.max_nonfinite_streak}); stopping. Lower optim.lr, check the data, "
                "or raise train.max_nonfinite_streak."
            )
    return streak


class ProgressHook(Hook):
    """A tqdm bar (process 0, `train.progress_bar`), `total` steps long (default:
    `train.steps`; the LR finder's sweep has its own length). Its count follows dispatched
    steps; at each metrics fetch (a new `loop.summary`, written by MetricsHook just before this
    hook: `loop.step` steps are then complete) it shows the rate and ETA of completed steps, the
    epoch (when the dataset size is known) and that summary's headline metrics (loss, lr,
    samples/s or tokens/s, MFU): the newest values, never one window stale."""

    def __init__(self, enabled: bool, total: int | None = None):
        self.enabled = enabled
        self.total = total

    def on_start(self, loop: Loop) -> None:
        self.bar = ProgressBar(self.total or loop.total, loop.start, self.enabled)
        self.shown: dict | None = None

    def after_step(self, loop: Loop) -> None:
        self.bar.dispatched(1)
        if loop.summary is not self.shown and loop.summary:
            self.shown = loop.summary
            self.bar.completed(loop.step, console.headline(loop.summary),
                               epoch=getattr(loop, "epoch", None))

    def on_end(self, loop: Loop) -> None:
        self.bar.close()


class EvalHook(Hook):
    """Each evaluator at its cadence: `every` steps of its own (-1: `eval.every`; 0: only at
    the end; 'epoch': where each epoch ends), and always at the last step of the run
    (`train.steps`)."""

    def after_step(self, loop: Loop) -> None:
        loop.eval_metrics = None
        cfg = loop.config
        due = []
        for name, ev in loop.trainer.evaluators.items():
            every = cfg.eval.every if ev.config.every == -1 else ev.config.every
            if loop.due(every) or loop.step == loop.total:
                due.append(name)
        if due:
            loop.eval_metrics = loop.trainer.evaluate(loop.state, due, writer=loop.writer)
            loop.write(loop.eval_metrics)


class BestHook(Hook):
    """The best checkpoint by `checkpoint.best_metric` and early stopping by
    `eval.early_stop_metric` (both `eval/<evaluator>/<metric>`)."""

    def on_start(self, loop: Loop) -> None:
        cfg = loop.config
        self.new_best = False
        for key in {cfg.checkpoint.best_metric, cfg.eval.early_stop_metric} - {""}:
            name = key.split("/")[1]
            if name not in loop.trainer.evaluators:
                raise ConfigError(
                    f"Metric {key!r} (checkpoint.best_metric / eval.early_stop_metric) names the "
                    f"evaluator {name!r}, which this run does not have; evaluators: "
                    f"{sorted(loop.trainer.evaluators)}.")

    def after_step(self, loop: Loop) -> None:
        self.new_best = False
        metrics = loop.eval_metrics
        if metrics is None:
            return
        cfg = loop.config
        for key in {cfg.checkpoint.best_metric, cfg.eval.early_stop_metric} - {""}:
            ran = sorted(k for k in metrics if k.startswith(f"eval/{key.split('/')[1]}/"))
            if ran and key not in metrics:
                raise ConfigError(
                    f"Metric {key!r} (checkpoint.best_metric / eval.early_stop_metric) is not "
                    f"produced by evaluator {key.split('/')[1]!r}; it gives: {ran}.")
        before = loop.progress.best_step
        if loop.progress.update(loop.step, metrics, cfg):
            loop.request_stop("early_stop")
        self.new_best = loop.progress.best_step == loop.step and before != loop.step
        if cfg.checkpoint.best_metric and self.new_best:
            loop.save = True


class PreemptionHook(Hook):
    """SIGTERM or Ctrl-C (SIGINT) on any process, or JAX's preemption service: save a
    checkpoint and stop (the run ends as preempted: exit 42, resume with the same command).

    A signal sets a flag; single-process runs stop after the current step. Multi-host, the flag
    is shared with a collective, only at log steps (no per-step sync); the preemption service's
    sync point is checked every step (cheap, collective-free). A second Ctrl-C aborts at once
    (KeyboardInterrupt), without the checkpoint."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.signalled = False

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            logging.warning("Ctrl-C: saving a checkpoint and stopping after this step "
                            "(Ctrl-C again to abort without saving).")
            signal.signal(signal.SIGINT, self.old_handlers.get(signal.SIGINT)
                          or signal.default_int_handler)
        else:
            logging.warning("SIGTERM received: saving a checkpoint and stopping after this "
                            "step.")
        self.signalled = True

    def on_start(self, loop: Loop) -> None:
        self.use_sync_point = jax.process_count() > 1
        self.old_handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old_handlers[sig] = signal.signal(sig, self._on_signal)

    def on_end(self, loop: Loop) -> None:
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)
        self.old_handlers = {}

    def after_step(self, loop: Loop) -> None:
        if self._notice(loop.step) or self._everywhere(loop.step % self.log_every == 0):
            loop.request_stop("preempted")

    def _notice(self, step: int) -> bool:
        if not self.use_sync_point:
            return False
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # no preemption service (single process, or not enabled)
            self.use_sync_point = False
            return False
        if reached:
            logging.warning("Preemption notice at step %d: saving and stopping.", step)
        return reached

    def _everywhere(self, may_sync: bool) -> bool:
        if jax.process_count() == 1:
            return self.signalled
        if not may_sync:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.signalled))
        return bool(np.any(flags))


class CheckpointHook(Hook):
    """Saves every `checkpoint.every` steps (0: only at the end; 'epoch': where each epoch
    ends), when a hook asks (`loop.save`: a new best), and at the last step of the loop (end,
    stop, preemption)."""

    def __init__(self, ckpt: Checkpointer, every: int | str):
        self.ckpt = ckpt
        self.every = every
        self.failed = False
        self.queued: int | None = None  # the latest save handed to Orbax

    def after_step(self, loop: Loop) -> None:
        if loop.due(self.every) or loop.last or loop.save:
            meta = {"step": loop.step, "progress": dataclasses.asdict(loop.progress),
                    "config": loop.config.to_dict(), "mesh": dict(loop.trainer.mesh.shape),
                    "process_count": jax.process_count()}
            self._guard(loop.step, self.ckpt.save, loop.step, loop.state, loop.train_iter,
                        meta, loop.eval_metrics)
            self.queued = loop.step
        loop.save = False

    def on_end(self, loop: Loop) -> None:
        if self.failed:  # already reported: the wait would only raise the same failure again
            self.ckpt.close(quiet=True)
        else:
            self._guard(None, self.ckpt.close)

    def _guard(self, step: int | None, fn, *args):
        """Run a save (or the final wait for queued saves, `step=None`); any failure (an
        OSError, or Orbax's own errors for a full disk) becomes one CheckpointSaveError."""
        # a save first waits for the one before it, still being written in the background,
        # whose failure then surfaces here
        in_flight = self.queued if self.ckpt.manager.is_saving_in_progress() else None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - Orbax wraps I/O errors in ValueError etc.
            self.failed = True
            steps = [s for s in (in_flight, step) if s is not None] or [self.queued]
            what = "checkpoint " + " or ".join(str(s) for s in dict.fromkeys(steps))
            raise CheckpointSaveError(
                f"Writing {what} under {self.ckpt.directory} failed ({brief(e)}). Free space "
                "(or fix permissions) and re-run the same command to resume from the latest "
                "intact checkpoint."
            ) from e


def default_hooks(trainer: Any, ckpt: Checkpointer, user: list[Hook]) -> list[Hook]:
    cfg = trainer.config
    return [MetricsHook(cfg.train.log_every), ProgressHook(cfg.train.progress_bar), EvalHook(),
            BestHook(), *user, PreemptionHook(cfg.train.log_every),
            CheckpointHook(ckpt, cfg.checkpoint.every)]
