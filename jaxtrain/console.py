"""What a person sees in the terminal during a run (process 0): log lines written above the
progress bar, never glued onto it; a bar whose rate and ETA count completed steps; status lines
for the silent phases (data, compile); a few headline metrics per log line; the final summary.

Every metric still goes to the run's trackers (metrics.jsonl, tensorboard, ...): only the
console is brief.

Rate and ETA. Steps are dispatched ahead of the device, so counting dispatched steps gives a rate
that swings (a burst of dispatches, then a wait at the next metrics fetch). The bar's count
moves with dispatch, but its rate and ETA use completed work only: with `t0` the moment the
first step of this call was dispatched (after the compile) and `n0` the steps done before it,
at each metrics fetch (the host sync, every `train.log_every` steps: `n` steps done at `t`)

    rate = (n - n0) / (t - t0)        eta = (total - n) / rate

a running average over the whole call (evaluations included, as they recur), hence steady.
"""

from __future__ import annotations

import contextlib
import io
import logging as pylogging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

# --------------------------------------------------------------------------- headline metrics

MAX_EVAL_HEADLINE = 4
_TRAIN_HEADLINE = (("train/loss", "loss"), ("train/lr", "lr"),
                   ("perf/tokens_per_second", "tokens/s"), ("perf/samples_per_second", "samples/s"),
                   ("perf/mfu", "mfu"))


def fmt(value: float) -> str:
    """A number in at most 4 significant digits (`0.001457`, `3.246`, `1.2e+04`)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def tracked_metrics(config: Any) -> tuple[str, ...]:
    """The metrics a run ranks or stops by: `checkpoint.best_metric`, `eval.early_stop_metric`
    (those set, in that order)."""
    if config is None:
        return ()
    keys = []
    for section, key in (("checkpoint", "best_metric"), ("eval", "early_stop_metric")):
        value = (config.get(section) or {}).get(key, "") if hasattr(config, "get") else ""
        if value and value not in keys:
            keys.append(value)
    return tuple(keys)


def _evaluator(key: str) -> str:
    return key.split("/")[1] if key.count("/") >= 2 else ""


def headline(metrics: Mapping[str, float], tracked: Sequence[str] = ()) -> dict[str, float]:
    """The few metrics of a record worth a console line, by label.

    Train records (`train/...`): loss, lr, tokens/s (else samples/s) and MFU when known. Eval
    records (`eval/<evaluator>/<metric>`), at most :data:`MAX_EVAL_HEADLINE`: the `tracked`
    metrics (best / early-stop), each evaluator's `loss`, the first metric of each evaluator
    not shown yet, then the others in order (chance levels never); labelled without the
    `eval/` prefix. Any
    other record (e.g. the compile figures) is shown whole."""
    if any(k.startswith("eval/") for k in metrics):
        keys = [k for k in tracked if k in metrics]
        keys += [k for k in metrics if k.startswith("eval/") and k.endswith("/loss")]
        for k in metrics:
            shown = {_evaluator(s) for s in keys}
            if k.startswith("eval/") and _evaluator(k) not in shown and "chance" not in k:
                keys.append(k)
        keys += [k for k in metrics if k.startswith("eval/") and "chance" not in k]  # fill up
        keys = list(dict.fromkeys(keys))[:MAX_EVAL_HEADLINE]
        return {k.removeprefix("eval/"): float(metrics[k]) for k in keys}
    if any(k.startswith("train/") for k in metrics):
        out = {}
        for key, label in _TRAIN_HEADLINE:
            if key in metrics and not (label == "samples/s" and "tokens/s" in out):
                out[label] = float(metrics[key])
        return out
    return {k: float(v) for k, v in metrics.items()}


def metrics_line(step: int, metrics: Mapping[str, float], tracked: Sequence[str] = ()) -> str:
    """`step 50 | loss=3.246 lr=0.001457 samples/s=180` (see :func:`headline`); an eval line
    ends with how many more metrics the trackers got (`(+9 more)`: metrics.jsonl has all)."""
    shown = headline(metrics, tracked)
    kind = "eval " if any(k.startswith("eval/") for k in metrics) else ""
    text = f"step {step} | {kind}" + " ".join(f"{k}={fmt(v)}" for k, v in shown.items())
    hidden = len(metrics) - len(shown)
    if kind and hidden > 0:
        text += f" (+{hidden} more)"
    return text


def bytes_text(memory: Mapping[str, int]) -> str:
    """A compiled step's memory (:func:`jaxtrain.memory.step_memory`) in a few words: its
    non-zero entries in MiB/GiB (`argument 9.6 MiB, output 8.1 MiB, temp 155 MiB`)."""
    def size(n: int) -> str:
        return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"

    shown = {k: v for k, v in memory.items() if v and k not in ("alias", "argument_device")}
    return ", ".join(f"{k} {size(v)}" for k, v in shown.items()) or "not reported"


# --------------------------------------------------------------------------- writing above bars

_lock = threading.RLock()
_bars: list[Any] = []  # open tqdm bars (progress, status), process 0
_saved: list[tuple[Any, str, Any]] = []  # (object, attribute, original stream) while bars open


class _AboveBars(io.TextIOBase):
    """A stream for everything else written to the terminal while bars are open (log records,
    warnings, prints): each complete line is written with the bars cleared, then they are
    redrawn below it. A partial line waits for its newline (or the last bar's close)."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self._partial = ""

    def write(self, s: str) -> int:
        with _lock:
            head, newline, self._partial = (self._partial + s).rpartition("\n")
            if newline:
                _write_above(self.target, head + "\n")
        return len(s)

    def drain(self) -> None:
        if self._partial:
            self.target.write(self._partial)
            self._partial = ""

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self):
        return getattr(self.target, "encoding", "utf-8")

    def __getattr__(self, name: str):  # e.g. `.buffer`: the real stream's
        return getattr(self.target, name)


def _write_above(target, text: str) -> None:
    from tqdm import tqdm

    with tqdm.get_lock():
        for bar in _bars:
            bar.clear(nolock=True)
        target.write(text)
        target.flush()
        for bar in _bars:
            bar.refresh(nolock=True)


def _streams_to_redirect() -> list[tuple[Any, str]]:
    """(holder, attribute) of every stream that writes to the terminal: sys.stdout/stderr and
    the logging handlers (absl's included) that hold the same objects."""
    holders: list[tuple[Any, str]] = [(sys, "stdout"), (sys, "stderr")]
    loggers = [pylogging.getLogger()] + [lg for lg in pylogging.Logger.manager.loggerDict.values()
                                         if isinstance(lg, pylogging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            inner = getattr(handler, "python_handler", None)  # absl's ABSLHandler
            for h in (handler, inner):
                if isinstance(h, pylogging.StreamHandler) and \
                        h.stream in (sys.stdout, sys.stderr):
                    holders.append((h, "stream"))
    return holders


def _open_bar(bar) -> None:
    if "notebook" in type(bar).__module__:  # a widget: nothing is written on its line
        return
    with _lock:
        if not _bars:
            proxies: dict[int, _AboveBars] = {}
            for holder, attr in _streams_to_redirect():
                stream = getattr(holder, attr)
                if isinstance(stream, _AboveBars):
                    continue
                proxy = proxies.setdefault(id(stream), _AboveBars(stream))
                _saved.append((holder, attr, stream))
                setattr(holder, attr, proxy)
        _bars.append(bar)


def _close_bar(bar) -> None:
    with _lock:
        if bar in _bars:
            _bars.remove(bar)
        bar.close()
        if not _bars:
            while _saved:
                holder, attr, stream = _saved.pop()
                proxy = getattr(holder, attr)
                setattr(holder, attr, stream)
                if isinstance(proxy, _AboveBars):
                    proxy.drain()


def _real_stderr():
    for holder, attr, stream in _saved:
        if holder is sys and attr == "stderr":
            return stream
    return sys.stderr


def _nonzero_width(shape: tuple) -> tuple:
    """(columns, rows) of the terminal; 100 columns where it reports 0 (a pseudo-terminal
    without a size, e.g. `script` in CI)."""
    cols, rows = shape
    return (cols or 100) if cols is not None else None, rows


# --------------------------------------------------------------------------- the progress bar

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """A tqdm bar on stderr (process 0; a no-op when disabled) whose count follows dispatched
    steps and whose rate, ETA and metrics follow completed ones (:meth:`completed`, at each
    metrics fetch). Log lines and other terminal output are written above it while it is open.
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train",
                 process_index: int = 0):
        self._bar = None
        self.total, self.initial = total, initial
        self._t0: float | None = None
        self._n0 = initial
        if enabled and process_index == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=_real_stderr(),
                             bar_format=BAR_FORMAT, dynamic_ncols=True, mininterval=0.5)
            screen = self._bar.dynamic_ncols
            if screen:  # a pseudo-terminal that reports width 0 would get an empty bar
                self._bar.dynamic_ncols = lambda fp: _nonzero_width(screen(fp))
            _open_bar(self._bar)

    def dispatched(self, n: int = 1, now: float | None = None) -> None:
        """`n` more steps dispatched (the count moves; the rate waits for completion)."""
        if self._t0 is None:  # the first step of this call: compiled, now running
            self._t0, self._n0 = time.perf_counter() if now is None else now, self.initial
        if self._bar is not None:
            self._bar.update(n)

    def rate_and_eta(self, done: int, now: float) -> tuple[float | None, float | None]:
        """Completed steps per second since the first dispatch of this call, and the seconds
        left at that rate (module docstring); (None, None) before any completed step."""
        if self._t0 is None or done <= self._n0 or now <= self._t0:
            return None, None
        rate = (done - self._n0) / (now - self._t0)
        return rate, max(self.total - done, 0) / rate

    def completed(self, done: int, metrics: Mapping[str, float] | None = None,
                  epoch: float | None = None, now: float | None = None) -> str:
        """`done` steps have completed (a metrics fetch): show the rate, ETA, epoch and the
        newest metrics (labels of :func:`headline`) at once. Returns the postfix shown."""
        now = time.perf_counter() if now is None else now
        rate, eta = self.rate_and_eta(done, now)
        parts = []
        if rate is not None:
            pace = f"{rate:.3g} step/s" if rate >= 1 else f"{1 / rate:.3g} s/step"
            parts.append(f"eta {_clock(eta)}, {pace}")
        if epoch is not None:
            parts.append(f"epoch {epoch:.2f}")
        if metrics:
            parts.append(" ".join(f"{k}={fmt(v)}" for k, v in metrics.items()))
        postfix = " | ".join(parts)
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()
        return postfix

    def update(self, n: int = 1, **postfix: float) -> None:
        """Older interface: `n` steps dispatched, and `postfix` metrics shown."""
        self.dispatched(n)
        if postfix and self._bar is not None:
            self._bar.set_postfix_str(" ".join(f"{k}={fmt(v)}" for k, v in postfix.items()))

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            _close_bar(bar)


# --------------------------------------------------------------------------- status lines


@contextlib.contextmanager
def status(what: str, done: str | None = "{what}: {seconds:.1f} s",
           enabled: bool = True) -> Iterator[None]:
    """Say what a silent phase is doing: logs `<what>…` when it starts and `done` (formatted
    with `what` and `seconds`; None: nothing, the caller logs its own line) when it ends. On a
    terminal, a line below the log ticks the seconds meanwhile (`compiling the train step…
    12.5 s`); it is removed when the phase ends."""
    from absl import logging

    if not enabled:
        yield
        return
    logging.info("%s…", what[:1].upper() + what[1:])
    t0 = time.perf_counter()
    ticker = _Ticker(what) if _is_terminal(sys.stderr) else None
    try:
        yield
    finally:
        if ticker is not None:
            ticker.stop()
    if done:  # not after a failure: its own error is the next line
        logging.info(done.format(what=what[:1].upper() + what[1:],
                                 seconds=time.perf_counter() - t0))


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class _Ticker:
    """A one-line tqdm "bar" (`<what>… 12.5 s`) refreshed twice a second by a thread."""

    def __init__(self, what: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, desc=what, file=_real_stderr(), leave=False,
                        bar_format="{desc}… {elapsed_s:.1f} s", mininterval=0.0)
        _open_bar(self.bar)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="jaxtrain-status")
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with _lock:
                if self.bar in _bars:
                    self.bar.refresh()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()
        _close_bar(self.bar)


# --------------------------------------------------------------------------- log lines


class ConsoleFormatter(pylogging.Formatter):
    """`I1207 10:22:06 step 50 | loss=3.246 ...`: the level's letter, date and time, the
    message; warnings and errors also name where (`W1207 10:22:06 trainer.py:412] ...`).
    absl's default prefix (microseconds, thread id, file:line on every line) takes ~50 of a
    terminal's columns."""

    def format(self, record: pylogging.LogRecord) -> str:
        text = super().format(record)  # the message, with exc_info / stack when given
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created))
        where = (f" {os.path.basename(record.pathname)}:{record.lineno}]"
                 if record.levelno >= pylogging.WARNING else "")
        return f"{record.levelname[:1]}{stamp}{where} {text}"


# --------------------------------------------------------------------------- library noise


class _DropMessages(pylogging.Filter):
    """Drops the records whose message starts with one of `prefixes` (below `below`)."""

    def __init__(self, prefixes: tuple[str, ...], below: int = pylogging.ERROR):
        super().__init__()
        self.prefixes, self.below = prefixes, below

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= self.below:
            return True
        return not str(record.msg).startswith(self.prefixes)


# (logger, message prefix, below this level): advisories that say nothing about the run
KNOWN_NOISE = (
    # JAX probing for accelerator plugins it does not find (`libtpu.so`), logged at INFO
    ("jax._src.xla_bridge", "Unable to initialize backend '", pylogging.WARNING),
    # transformers without torch: jaxtrain uses its tokenizers and configs only
    ("transformers", "PyTorch was not found.", pylogging.ERROR),
)


def quiet_known_noise() -> None:
    """Filter :data:`KNOWN_NOISE` on the loggers that emit it (each record exactly; every other
    record of those loggers passes). Idempotent."""
    for name, prefix, below in KNOWN_NOISE:
        logger = pylogging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and prefix in f.prefixes
                   for f in logger.filters):
            logger.addFilter(_DropMessages((prefix,), below))


# --------------------------------------------------------------------------- final summary

SUMMARY_WIDTH = 100


def _short(path: str) -> str:
    """A path relative to the current directory when it is inside it, else as given."""
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return rel if not rel.startswith("..") and len(rel) < len(path) else path


def final_summary(result: Any, tracked: Sequence[str] = (), eval_table: str | None = None,
                  tensorboard: bool = True) -> list[str]:
    """The lines that end a run (each within :data:`SUMMARY_WIDTH` columns where the workdir's
    path allows): steps (epochs), final train loss, the best metric at its step (epoch), and
    where the workdir, best checkpoint, report, exports, eval table and (when `tensorboard`
    is one of the trackers) the tensorboard logs are."""
    get = lambda name: getattr(result, name, None)  # noqa: E731 - fields other parts add
    done = f"Done: {result.final_step} steps"
    if get("epoch") is not None:
        done += f" ({result.epoch:.2f} epochs)"
    if get("final_loss") is not None:
        done += f", final train loss {fmt(float(result.final_loss))}"
    if get("run_name"):
        done += f" (run {result.run_name})"
    if get("stopped_early"):
        done += "; stopped early"
    if get("preempted"):
        done += "; preempted (re-run the same command to resume)"
    lines = [done]
    if result.best_step is not None and result.best_metric is not None:
        name = tracked[0].removeprefix("eval/") if tracked else "metric"
        at = f"step {result.best_step}"
        if get("best_epoch") is not None:
            at += f" (epoch {result.best_epoch:.2f})"
        lines.append(f"Best {name} = {fmt(float(result.best_metric))} at {at}")
    workdir = _short(result.workdir)
    lines.append(f"Workdir:     {workdir}")
    best = get("best_checkpoint_path")
    if best:
        lines.append(f"Checkpoint:  {_inside(best, result.workdir)} (best)")
    elif get("checkpoint_paths"):
        lines.append(f"Checkpoint:  {_inside(result.checkpoint_paths[-1], result.workdir)}"
                     " (last)")
    if get("report_path"):
        lines.append(f"Report:      {_inside(result.report_path, result.workdir)}")
    for fmt_name, folder in (get("exports") or {}).items():
        lines.append(f"Export {fmt_name}:".ljust(13) + _inside(folder, result.workdir))
    if eval_table:
        lines.append(f"Eval table:  {_inside(eval_table, result.workdir)}")
    if tensorboard:
        lines.append(f"Curves:      tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
    return lines


def _inside(path: str, workdir: str) -> str:
    """`path` relative to the workdir (`checkpoints/600`) when inside it, else shortened."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
    return f"<workdir>/{rel}" if not rel.startswith("..") else _short(path)


def write_eval_table(result: Any, workdir: str) -> str | None:
    """`<workdir>/eval_table.txt`: every evaluation's metrics (`TrainResult.table()`), wide;
    its path, or None when the run had no evaluation."""
    if not result.eval_history:
        return None
    path = os.path.join(workdir, "eval_table.txt")
    with open(path, "w") as f:
        f.write(result.table() + "\n")
    return path


def epoch_text(epoch: float | None) -> str:
    return "" if epoch is None or not math.isfinite(epoch) else f"{epoch:.2f}"
