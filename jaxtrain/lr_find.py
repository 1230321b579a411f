"""Learning-rate finder: an exponential learning-rate sweep over the real train step.

    python -m jaxtrain.lr_find --config=configs/clip.py [--config.KEY=VALUE ...] [--workdir=DIR]
        [--min_lr=1e-7] [--max_lr=10] [--steps=200] [--smoothing=0.98] [--diverge=4.0]

    result = lr_find(config, workdir)          # the library call; LRFindResult
    result.suggestion                          # a value for optim.lr

Step i (0-based) of the sweep trains with ``lr_i = min_lr * (max_lr / min_lr) ** (i / (steps - 1))``
and records ``loss_i``, the loss of batch i computed *before* that update (as fastai's finder
does: loss_i reflects the learning rates up to lr_{i-1}). The step is the Trainer's own jitted,
sharded step (same mesh, optimizer, weight decay, clipping, per-group lr multipliers, gradient
accumulation and data iterator), from a fresh state as a new run starts (random init or the
task's pretrained weights; never a checkpoint). Only the learning rate differs: the config's
``optim.schedule``, ``optim.lr``, warmup and ``min_lr_ratio`` are ignored, and the sweep enters the
optimizer as a schedule (a lookup table indexed by the step inside the compiled program, so one
compilation serves every step). Group multipliers scale it as they scale ``optim.lr``, so the
suggestion is a value for ``optim.lr``.

Smoothing is the bias-corrected exponential moving average (beta = ``smoothing``)::

    a_i = beta * a_{i-1} + (1 - beta) * loss_i   (a_{-1} = 0),    s_i = a_i / (1 - beta ** (i + 1))

The sweep stops at the first step d whose loss is non-finite or whose smoothed loss exceeds
``diverge`` times the best smoothed loss before it (``s_d > best + (diverge - 1) * |best|``, i.e.
``s_d > diverge * best`` for a positive loss). Losses stay on device and are fetched every
``check_every`` (10) steps, so at most ``check_every - 1`` steps run past d; their losses are
discarded. The records (CSV, plot, result) end at d; the suggestion (:func:`suggest_lr`) uses the
points before it. The EMA lags the raw loss by about beta / (1 - beta) points (49 at 0.98), which
moves the smoothed curve, and the suggestion, toward larger learning rates; a smaller
``smoothing`` or more ``steps`` shrinks the shift.

The steps run on the trainer's own loop (:meth:`jaxtrain.trainer.Trainer.loop`) with two hooks:
:class:`LRFinderHook` (the losses, the stop rule) and the progress bar.

Default workdir: the library's is the Trainer's (``runs/<task>``); the command line's is
``jaxtrain.main``'s (:func:`jaxtrain.cli.default_workdir`: ``runs/<config file name>``, with
``-<variants>`` for a variant), so the output lands beside the run that the same ``--config``
trains. The command it prints to train with the suggestion (:func:`train_command`) names that
workdir, the ``--config`` with its variants and the same overrides.

Files (process 0 only; every process runs the steps): ``<workdir>/lr_find/lr_find.csv`` (columns
``step, lr, loss, smoothed_loss``) and ``<workdir>/lr_find/lr_find.png``. Nothing else in the
workdir is created or touched: no checkpoint is read or written, no metrics or tensorboard events.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging

from jaxtrain import cli
from jaxtrain.api import build_task
from jaxtrain.errors import ConfigError
from jaxtrain.hooks import Hook, Loop, ProgressHook
from jaxtrain.task import Task
from jaxtrain.trainer import Trainer

CSV_NAME = "lr_find.csv"
PNG_NAME = "lr_find.png"
SKIP_START = 10  # EMA warm-up points left out of the suggestion


@dataclasses.dataclass
class LRFindResult:
    """One sweep. The arrays hold the recorded steps 0..n-1 (n = `stopped_at + 1` when the loss
    diverged, else `steps`); `steps_run` counts the steps that ran (up to `check_every - 1` more
    than recorded after a divergence). Paths are None on processes other than 0."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float | None
    diverged: bool
    stopped_at: int | None
    steps_run: int
    csv_path: str | None
    png_path: str | None


# ------------------------------------------------------------------ pure parts


def sweep_lrs(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """``lr_i = min_lr * (max_lr / min_lr) ** (i / (steps - 1))`` for i in [0, steps), float64."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))


def sweep_schedule(lrs: np.ndarray) -> optax.Schedule:
    """``step -> lrs[step]`` (float32; clamped to the last entry), usable inside jit."""
    table = np.asarray(lrs, np.float32)

    def schedule(step):
        return jnp.asarray(table)[jnp.clip(step, 0, len(table) - 1)]

    return schedule


def smooth_losses(losses: np.ndarray, smoothing: float) -> np.ndarray:
    """Bias-corrected EMA: ``a_i = b a_{i-1} + (1 - b) loss_i``, ``s_i = a_i / (1 - b^(i+1))``."""
    losses = np.asarray(losses, np.float64)
    out = np.empty_like(losses)
    avg = 0.0
    for i, loss in enumerate(losses):
        avg = smoothing * avg + (1.0 - smoothing) * loss
        out[i] = avg / (1.0 - smoothing ** (i + 1))
    return out


def divergence_index(losses: np.ndarray, smoothed: np.ndarray, diverge: float) -> int | None:
    """The first i with a non-finite loss (or smoothed loss), or with ``smoothed[i] > best +
    (diverge - 1) * |best|``, best = min(smoothed[:i]) (= ``diverge * best`` for best > 0);
    None if there is none."""
    best = math.inf
    for i, (loss, s) in enumerate(zip(losses, smoothed, strict=True)):
        if not (math.isfinite(loss) and math.isfinite(s)):
            return i
        if i and s > best + (diverge - 1.0) * abs(best):
            return i
        best = min(best, s)
    return None


def _steepest_index(lrs: np.ndarray, smoothed: np.ndarray, skip_start: int) -> int:
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    if lrs.shape != smoothed.shape or lrs.ndim != 1:
        raise ValueError(f"lrs {lrs.shape} and smoothed {smoothed.shape} must be equal 1-D arrays.")
    bad = np.flatnonzero(~np.isfinite(smoothed))
    n = int(bad[0]) if bad.size else len(smoothed)
    if n < 3:
        raise ValueError(
            f"suggest_lr needs at least 3 finite points before the first non-finite one; got {n}. "
            "The loss diverged almost at once: lower min_lr."
        )
    if np.any(lrs[:n] <= 0) or np.any(np.diff(lrs[:n]) <= 0):
        raise ValueError("lrs must be positive and strictly increasing.")
    slope = np.gradient(smoothed[:n], np.log(lrs[:n]))
    start = max(1, min(skip_start, n // 5))
    return start + int(np.argmin(slope[start:n - 1]))


def suggest_lr(lrs: np.ndarray, smoothed: np.ndarray, *, skip_start: int = SKIP_START) -> float:
    """The learning rate at the steepest descent of the smoothed loss against log(lr).

    With x_i = log(lrs[i]) and s = smoothed cut before its first non-finite value (n points, at
    least 3), the slope is the central difference ``d_i = (s_{i+1} - s_{i-1}) / (x_{i+1} -
    x_{i-1})`` (numpy.gradient: second order on the exponential grid); the answer is
    ``lrs[argmin d_i]`` over ``i in [k, n - 2]`` with ``k = max(1, min(skip_start, n // 5))``:
    the first `skip_start` points (at most a fifth), where the EMA has averaged few losses and
    its slope is noisy, are left out; ties go to the smaller lr. Pass only the points before a
    divergence (:func:`lr_find` does).
    """
    return float(np.asarray(lrs, np.float64)[_steepest_index(lrs, smoothed, skip_start)])


# ------------------------------------------------------------------ the sweep


def _check_arguments(min_lr, max_lr, steps, smoothing, diverge, check_every) -> None:
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value):
            raise ConfigError(f"lr_find {name}={value!r} is not a finite number.")

    for name, value in (("min_lr", min_lr), ("max_lr", max_lr), ("diverge", diverge),
                        ("smoothing", smoothing)):
        number(name, value)
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if value <= 0:
            raise ConfigError(f"lr_find {name}={value!r} must be > 0: the sweep is exponential.")
    if min_lr >= max_lr:
        raise ConfigError(
            f"lr_find min_lr={min_lr!r} must be smaller than max_lr={max_lr!r}: the sweep rises "
            "from min_lr to max_lr (e.g. --min_lr=1e-7 --max_lr=10)."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 10:
        raise ConfigError(f"lr_find steps={steps!r} must be an integer >= 10 (default 200).")
    if not 0 <= smoothing < 1:
        raise ConfigError(
            f"lr_find smoothing={smoothing!r} must be in [0, 1) (0 = no smoothing; default 0.98)."
        )
    if diverge <= 1:
        raise ConfigError(
            f"lr_find diverge={diverge!r} must be > 1: the sweep stops when the smoothed loss "
            "exceeds diverge x its best (default 4)."
        )
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ConfigError(f"lr_find check_every={check_every!r} must be an integer >= 1.")


def _is_writer() -> bool:
    return jax.process_index() == 0


class LRFinderHook(Hook):
    """The LR finder's stop rule on the loop: keeps each step's loss on device, fetches them
    every `check_every` steps (and at the last step; the only host sync), smooths them and
    stops the loop at a divergence (:func:`divergence_index`).

    As the loop's only metrics source it also sets `loop.summary` (smoothed loss, lr,
    samples/s) at each check, for :class:`~jaxtrain.hooks.ProgressHook` after it."""

    def __init__(self, lrs: np.ndarray, smoothing: float, diverge: float, check_every: int):
        self.lrs, self.smoothing, self.diverge = lrs, smoothing, diverge
        self.check_every = check_every
        self.losses: list[float] = []  # of every step that ran, in order
        self.stopped_at: int | None = None  # the divergence step, if any

    def on_start(self, loop: Loop) -> None:
        self.pending: list[jax.Array] = []
        self.samples, self.t_last = 0, time.perf_counter()

    def after_step(self, loop: Loop) -> None:
        self.pending.append(loop.metrics["loss"])
        if loop.step == loop.start + 1:  # the first step compiled: time from here
            self.t_last = time.perf_counter()
        else:
            self.samples += loop.compiled.samples
        if len(self.pending) < self.check_every and loop.step != loop.stop_at:
            return
        self.losses += [float(x) for x in jax.device_get(self.pending)]  # the only host sync
        self.pending = []
        smoothed = smooth_losses(np.asarray(self.losses), self.smoothing)
        now = time.perf_counter()
        loop.summary = {"train/loss": float(smoothed[-1]),
                        "train/lr": float(self.lrs[loop.step - 1]),
                        "perf/samples_per_second": self.samples / max(now - self.t_last, 1e-9)}
        self.samples, self.t_last = 0, now
        self.stopped_at = divergence_index(self.losses, smoothed, self.diverge)
        if self.stopped_at is not None:
            loop.request_stop("diverged")


def lr_find(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 200,
    smoothing: float = 0.98,
    diverge: float = 4.0,
    task: type[Task] | None = None,
    devices: list[jax.Device] | None = None,
    check_every: int = 10,
) -> LRFindResult:
    """Sweep the learning rate exponentially from `min_lr` to `max_lr` over `steps` train steps
    from a fresh state (see the module docstring); stop when the loss diverges; write the CSV and
    plot under ``<workdir>/lr_find/`` (default workdir: the Trainer's, ``runs/<task>``) and log the
    suggestion. `task` and `devices` are as for :class:`~jaxtrain.Trainer`."""
    _check_arguments(min_lr, max_lr, steps, smoothing, diverge, check_every)
    lrs = sweep_lrs(min_lr, max_lr, steps)
    run_task, _ = build_task(config, task)  # no evaluators: the sweep never evaluates
    trainer = Trainer(config, workdir, task=run_task, devices=devices,
                      schedule=sweep_schedule(lrs))
    out_dir = os.path.join(trainer.workdir, "lr_find")
    logging.info(
        "LR finder: %d steps, lr %.3g -> %.3g (exponential), mesh %s; the config's lr schedule "
        "and warmup are ignored. Output: %s", steps, min_lr, max_lr, dict(trainer.mesh.shape),
        out_dir)

    finder = LRFinderHook(lrs, smoothing, diverge, check_every)
    loop = Loop(trainer=trainer, state=trainer.init_state(), train_iter=trainer.train_iterator(),
                start=0, stop_at=steps)
    trainer.loop(loop, [finder, ProgressHook(config.train.progress_bar, total=steps)])
    losses, stop = finder.losses, finder.stopped_at
    del loop

    steps_run = len(losses)
    n = steps_run if stop is None else stop + 1
    loss_arr = np.asarray(losses[:n])
    smoothed = smooth_losses(loss_arr, smoothing)
    before = n if stop is None else stop
    index = _steepest_index(lrs[:before], smoothed[:before], SKIP_START) if before >= 3 else None
    suggestion = float(lrs[index]) if index is not None else None

    if stop is not None:
        why = "a non-finite loss" if not math.isfinite(losses[stop]) else (
            f"smoothed loss {smoothed[stop]:.4g} > {diverge:g} x best {smoothed[:stop].min():.4g}")
        logging.info("The loss diverged at step %d (lr %.3g): %s; sweep stopped.", stop,
                     lrs[stop], why)
    else:
        logging.info("The sweep reached max_lr=%.3g without diverging; a larger --max_lr shows "
                     "where it does.", max_lr)
    if suggestion is None:
        logging.warning("No suggestion: the loss diverged after %d steps; lower --min_lr.", n)
    else:
        logging.info("Suggested learning rate: %.3g (steepest descent of the smoothed loss). "
                     "Train with --config.optim.lr=%.3g", suggestion, suggestion)

    csv_path = png_path = None
    if _is_writer():
        os.makedirs(out_dir, exist_ok=True)
        csv_path = _write_csv(os.path.join(out_dir, CSV_NAME), lrs[:n], loss_arr, smoothed)
        png_path = _write_png(os.path.join(out_dir, PNG_NAME), lrs[:n], loss_arr, smoothed,
                              index, stop, smoothing)
        logging.info("Wrote %s and %s", csv_path, png_path)
    return LRFindResult(lrs=lrs[:n], losses=loss_arr, smoothed=smoothed, suggestion=suggestion,
                        diverged=stop is not None, stopped_at=stop, steps_run=steps_run,
                        csv_path=csv_path, png_path=png_path)


def _write_csv(path: str, lrs, losses, smoothed) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(lrs, losses, smoothed, strict=True)):
            w.writerow([i, *(repr(float(x)) for x in row)])
    os.replace(tmp, path)
    return path


def _write_png(path: str, lrs, losses, smoothed, index, stop, smoothing) -> str:
    """Loss and smoothed loss against lr (log axis), the suggestion and divergence marked; the
    y range is that of the points before the divergence."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no global backend change
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = lambda a: np.where(np.isfinite(a), a, np.nan)
    ax.plot(lrs, finite(losses), color="tab:blue", alpha=0.35, lw=1, label="loss")
    ax.plot(lrs, finite(smoothed), color="tab:blue", lw=2,
            label=f"smoothed loss (EMA, beta={smoothing:g})")
    if index is not None:
        ax.axvline(lrs[index], color="tab:red", ls="--", lw=1,
                   label=f"suggestion: lr = {lrs[index]:.3g}")
        ax.plot([lrs[index]], [smoothed[index]], "o", color="tab:red")
    if stop is not None:
        ax.axvline(lrs[stop], color="gray", ls=":", lw=1, label=f"diverged (step {stop})")
    before = len(lrs) if stop is None else stop
    low = np.concatenate([smoothed[:before], losses[:before]])
    high = np.concatenate([smoothed[:before], losses[:1]])
    low, high = low[np.isfinite(low)], high[np.isfinite(high)]
    if low.size and high.size:
        lo, hi = float(low.min()), float(high.max())
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("train loss")
    ax.set_title("Learning-rate finder")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ command line


def _define_flags() -> dict[str, Any]:
    """The finder's own flags (besides :func:`jaxtrain.cli.define_run_flags`'); by :func:`run`
    only, so importing this module defines none."""
    return {
        "min_lr": flags.DEFINE_float("min_lr", 1e-7, "First learning rate of the sweep."),
        "max_lr": flags.DEFINE_float("max_lr", 10.0, "Last learning rate of the sweep."),
        "steps": flags.DEFINE_integer("steps", 200, "Steps of the sweep (>= 10)."),
        "smoothing": flags.DEFINE_float("smoothing", 0.98,
                                        "EMA coefficient of the smoothed loss, in [0, 1)."),
        "diverge": flags.DEFINE_float("diverge", 4.0,
                                      "Stop when the smoothed loss exceeds this x its best."),
    }


def _main(argv: list[str], run_flags: cli.RunFlags, own: dict[str, Any]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.init_distributed(run_flags)
    workdir = run_flags.workdir.value or cli.default_workdir(run_flags.config_file())
    try:
        result = lr_find(run_flags.config.value, workdir,
                         **{name: holder.value for name, holder in own.items()})
    except (Exception, KeyboardInterrupt) as e:  # ConfigError: exit 2, ...
        code = cli.failure_exit_code(e)
        if code is None:
            raise
        return code
    if result.suggestion is not None:
        command = train_command(run_flags.config_file(), run_flags.config_overrides(), workdir,
                                result.suggestion)
        logging.info("To train with it: %s", shlex.join(command))
    return cli.EXIT_OK


def train_command(config_arg: str, overrides: dict[str, Any], workdir: str,
                  lr: float) -> list[str]:
    """The `python -m jaxtrain.main` command that trains what the finder swept, with
    `optim.lr = lr`: the same --config (variants included) and overrides, and the finder's
    workdir (given or default), named explicitly so that the run lands where the sweep's
    files are."""
    return ["python", "-m", "jaxtrain.main", f"--config={config_arg}",
            *[f"--config.{k}={v}" for k, v in overrides.items() if k != "optim.lr"],
            f"--workdir={workdir}", f"--config.optim.lr={lr:.3g}"]


def run() -> None:
    """`python -m jaxtrain.lr_find`: the run flags of :mod:`jaxtrain.cli` and the sweep's."""
    run_flags, own = cli.define_run_flags(), _define_flags()
    flags.mark_flags_as_required([run_flags.config.name])
    cli.setup_logging()
    app.run(lambda argv: _main(argv, run_flags, own), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    sys.exit(run())
