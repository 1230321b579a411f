"""Trackers: where a run's metrics go, named by `config.logging.report_to`.

    logging.report_to = ("tensorboard", "jsonl")            # the default
    logging.report_to = ("tensorboard", "jsonl", "wandb")   # pip install 'jaxtrain[wandb]'

Each tracker receives every record the run writes, ``log(step, {name: value})`` (names are
namespaced: ``train/loss``, ``eval/val/loss``, ``perf/...``), text records
(``log_text(step, tag, text)``: sample completions) and ``close()`` at the end. Only process 0
builds them (:class:`jaxtrain.writers.MetricWriter`).

* ``tensorboard``: tensorboardX event files in ``<workdir>/tensorboard`` ('@' in names becomes
  '_at_', which tensorboard does not accept).
* ``jsonl``: ``<workdir>/metrics.jsonl``, one JSON object per write, ``{"step": N, name: value}``
  (:class:`jaxtrain.writers.JsonlTracker`, the writer's own: it also reads the file back). On
  resume the records past the restored step are dropped (``truncate_after``),
  so the file is the history of the run that the checkpoint continues; the run's result, the
  run report and a sweep's scores read it back. Without it, a resumed run knows only the records
  written since the restart.
* ``wandb``: a Weights & Biases run (project ``logging.wandb_project``, entity
  ``logging.wandb_entity``, tags ``logging.wandb_tags``, group ``logging.wandb_group``; name = the
  run name; config = the run's whole config), its files in ``<workdir>/wandb/``. Its id is kept in
  ``<workdir>/wandb_run_id``: a restart of the same workdir resumes the same W&B run
  (``resume='allow'``), appending to its history. W&B drops records at steps it already has, so
  after a restart from a checkpoint older than the last record the history keeps the values of
  the first attempt for those steps. Offline (``WANDB_MODE=offline``) the run is written to
  ``<workdir>/wandb/offline-run-*/`` (each start its own folder, same run id) for a later
  ``wandb sync``.

The run name (:func:`run_name`) is ``config.run_name`` or, when that is empty, the workdir's
folder name; sweeps name each trial ``<sweep>/trial_<NNNN>`` and group them by the sweep.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import secrets
import string
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from absl import logging

from jaxtrain.errors import ConfigError

TRACKERS = ("tensorboard", "jsonl", "wandb")
DEFAULT_REPORT_TO = ("tensorboard", "jsonl")
WANDB_INSTALL = "pip install 'jaxtrain[wandb]'"
WANDB_ID_FILE = "wandb_run_id"


class Tracker(Protocol):
    """A destination of the run's records (process 0 only)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_text(self, step: int, tag: str, text: str) -> None: ...

    def close(self) -> None: ...


def run_name(config: Any, workdir: str | os.PathLike) -> str:
    """`config.run_name`, or the workdir's folder name when that is empty (or absent)."""
    name = config.get("run_name", "") if config is not None else ""
    return name or os.path.basename(os.path.normpath(os.path.abspath(os.fspath(workdir))))


def report_to_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """`logging.report_to` as a tuple of names: a tuple, or comma-separated text (the command
    line's `--config.logging.report_to=tensorboard,jsonl,wandb` arrives as one string)."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


def check_report_to(value: str | Iterable[str]) -> None:
    """ConfigError for a tracker name that does not exist, a repeated one, or 'wandb' without
    the wandb package (checked without importing it)."""
    names = list(report_to_names(value))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"Config key 'logging.report_to' names unknown tracker(s) {unknown}; valid: "
            f"{', '.join(TRACKERS)} (e.g. --config.logging.report_to=tensorboard,jsonl,wandb).")
    if len(set(names)) != len(names):
        raise ConfigError(f"Config key 'logging.report_to' repeats a tracker: {names}.")
    if "wandb" in names and not wandb_installed():
        raise ConfigError(
            "Config key 'logging.report_to' includes 'wandb', but the wandb package is not "
            f"installed. Install it ({WANDB_INSTALL}) or remove 'wandb' from "
            "logging.report_to.")


def wandb_installed() -> bool:
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # a broken or None entry in sys.modules
        return False


class TensorboardTracker:
    """tensorboardX event files in `logdir`."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._tb.add_scalar(k.replace("@", "_at_"), float(v), int(step))

    def log_text(self, step: int, tag: str, text: str) -> None:
        self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        """Flush and close; a failure (disk full) is logged, never raised: it must not hide
        the error that ended the run."""
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:
                logging.warning("Could not flush the tensorboard events (%s).", e)


class WandbTracker:
    """A Weights & Biases run, resumed by the id saved in `<workdir>/wandb_run_id`."""

    def __init__(self, config: Any, workdir: str):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(
                f"logging.report_to includes 'wandb', but importing wandb failed ({e}). "
                f"Install it ({WANDB_INSTALL}) or remove 'wandb' from logging.report_to."
            ) from e
        self._wandb = wandb
        log_cfg = config.get("logging", {})
        id_path = os.path.join(workdir, WANDB_ID_FILE)
        run_id = _read_id(id_path) or _new_id()
        name = run_name(config, workdir)
        try:
            self.run = wandb.init(
                project=log_cfg.get("wandb_project") or "jaxtrain",
                entity=log_cfg.get("wandb_entity") or None,
                group=log_cfg.get("wandb_group") or None,
                tags=list(log_cfg.get("wandb_tags", ())) or None,
                name=name, id=run_id, resume="allow", dir=workdir,
                config=json.loads(config.to_json_best_effort()),
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # noqa: BLE001 - wandb raises its own UsageError, CommError
            raise ConfigError(
                f"Starting the W&B run {name!r} (id {run_id}) failed: {type(e).__name__}: {e}. "
                "Log in (`wandb login` or WANDB_API_KEY), set logging.wandb_project / "
                "logging.wandb_entity to ones you can write to, or run offline with "
                "WANDB_MODE=offline (then `wandb sync` the folder under "
                f"{os.path.join(workdir, 'wandb')})."
            ) from e
        with open(id_path, "w") as f:
            f.write(self.run.id + "\n")
        offline = getattr(self.run, "offline", False)  # (its .url warns when offline)
        where = os.path.dirname(self.run.dir) if offline else (self.run.url or self.run.dir)
        logging.info("W&B run %r (id %s, project %s): %s", name, self.run.id,
                     self.run.project, where)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=int(step))

    def close(self) -> None:
        """Finish the run (uploads, or closes the offline folder); never raises."""
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001 - must not hide the error that ended the run
                logging.warning("Could not finish the W&B run (%s).", e)


def _new_id() -> str:
    """A W&B run id: 8 random lowercase letters and digits (as wandb's own)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_id(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def make_trackers(config: Any, workdir: str, names: str | Iterable[str]) -> list[Tracker]:
    """The trackers `names` asks for, in its order, for a run in `workdir` (closed again if
    one fails to start); `jsonl` is the writer's own (it is also read back): not built here."""
    names = report_to_names(names)
    check_report_to(names)
    out: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                out.append(TensorboardTracker(os.path.join(workdir, "tensorboard")))
            elif name == "wandb":
                out.append(WandbTracker(config, workdir))
    except BaseException:
        for tracker in out:
            tracker.close()
        raise
    return out
