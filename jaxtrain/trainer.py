"""The task-agnostic trainer: mesh, optimizer, sharded state, the jitted step, and the loop.

    trainer = Trainer(config, workdir)      # validates the config, builds mesh/optimizer/steps
    result = trainer.train()                # resumes from the workdir's latest checkpoint

The loop never syncs with the device between log steps: per-step metrics stay on device until
`train.log_every` steps have run, then are fetched together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from jaxtrain import mesh as mesh_lib
from jaxtrain.checkpoint import Checkpointer, CheckpointMismatchError
from jaxtrain.config import ConfigError, check_divisibility, validate
from jaxtrain.optim import build_optimizer
from jaxtrain.state import TrainState
from jaxtrain.step import make_train_step
from jaxtrain.tasks import Task, get_task
from jaxtrain.tree import path_str
from jaxtrain.writers import MetricWriter, ProgressBar

# Dense bf16 peak TFLOP/s per device, for MFU. Override with config.train.peak_tflops.
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "tpu v4": 275.0, "tpu v5 lite": 197.0,
               "tpu v5p": 459.0, "tpu v6": 918.0}


class NonFiniteError(FloatingPointError):
    """The loss or gradients became NaN/Inf and `train.nonfinite='error'`."""


@dataclasses.dataclass
class TrainResult:
    """What a run returns. `loss_history` holds (step, loss) for every step this call ran;
    `metrics` every record of `metrics.jsonl` (earlier runs in the workdir included)."""

    workdir: str
    final_step: int
    loss_history: list[tuple[int, float]]
    metrics: list[dict[str, float]]
    best_step: int | None
    best_metric: float | None
    checkpoint_paths: list[str]
    final_state: TrainState
    stopped_early: bool = False
    preempted: bool = False

    @property
    def eval_history(self) -> list[dict[str, float]]:
        return [m for m in self.metrics if any(k.startswith("eval/") for k in m)]

    def table(self) -> str:
        """The eval metrics as a plain-text table, one row per evaluation."""
        rows = self.eval_history
        if not rows:
            return "(no evaluations)"
        keys = ["step"] + sorted({k for r in rows for k in r if k.startswith("eval/")})
        width = [max(len(k), 8) for k in keys]
        lines = ["  ".join(k.rjust(w) for k, w in zip(keys, width, strict=True))]
        for r in rows:
            cells = [f"{r.get(k, float('nan')):.4g}" if k != "step" else str(r[k]) for k in keys]
            lines.append("  ".join(c.rjust(w) for c, w in zip(cells, width, strict=True)))
        return "\n".join(lines)


@dataclasses.dataclass
class _CompiledStep:
    """The train step compiled for one batch shape, with its cost figures."""

    fn: Any
    seconds: float
    xla_flops: float  # per device, from XLA's cost analysis
    model_flops: float  # whole step, from the task's formula (0 = unknown)
    tokens: int  # tokens per global batch (0 = not a token model)
    samples: int = 0
    reported: bool = False


@dataclasses.dataclass
class _Window:
    """Work done since the last log step (host-side numbers: no device sync)."""

    samples: int = 0
    tokens: int = 0
    xla_flops: float = 0.0
    model_flops: float = 0.0

    def add(self, step: _CompiledStep) -> None:
        self.samples += step.samples
        self.tokens += step.tokens
        self.xla_flops += step.xla_flops
        self.model_flops += step.model_flops


def _improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
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
        """Record one evaluation; True when early stopping says stop."""
        track = cfg.checkpoint.best_metric or cfg.eval.early_stop_metric
        for key in {cfg.checkpoint.best_metric, cfg.eval.early_stop_metric} - {""}:
            if key not in metrics:
                raise ConfigError(
                    f"Metric {key!r} (checkpoint.best_metric / eval.early_stop_metric) is not "
                    f"produced by this task; available: {sorted(metrics)}."
                )
        if track:
            mode = cfg.checkpoint.best_mode if cfg.checkpoint.best_metric else \
                cfg.eval.early_stop_mode
            if _improved(metrics[track], self.best_value, mode):
                self.best_step, self.best_value = step, metrics[track]
        es = cfg.eval.early_stop_metric
        if not es:
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


def _check_workdir(workdir: str, checkpoint_bytes: int) -> None:
    """Fail before training if the workdir cannot be written or cannot hold two checkpoints."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"The workdir {workdir!r} is not writable ({e.strerror}). Choose another --workdir."
        ) from e
    free = shutil.disk_usage(workdir).free
    if free < 2 * checkpoint_bytes:
        raise ConfigError(
            f"The workdir {workdir!r} has {free / 2**20:.1f} MiB free, less than two checkpoints "
            f"of this run ({2 * checkpoint_bytes / 2**20:.1f} MiB). Free space or choose "
            "another --workdir."
        )


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, permissions); the earlier ones are intact."""


class Trainer:
    """Builds everything a run needs from a config; `train()` runs (or resumes) it."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | None = None,
        *,
        task: type[Task] | None = None,
        devices: list[jax.Device] | None = None,
        schedule: optax.Schedule | None = None,
    ):
        """`schedule` (a function of the step) replaces the config's learning-rate schedule
        (`optim.schedule`, `lr`, warmup); None = the config's. The lr finder passes its sweep."""
        task_cls = task or get_task(config.task)
        validate(config, task_cls.default_config(), task_cls.config_rules())
        self.config = config
        self.workdir = os.path.abspath(workdir or os.path.join("runs", config.task or "run"))
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        check_divisibility(config, mesh_lib.data_parallel_size(self.mesh))
        self.task = task_cls(config)
        if config.lora.rank:
            from jaxtrain.lora import LoraTask

            self.task = LoraTask(self.task)
        self.tx, self.schedule = build_optimizer(config.optim, config.train.steps,
                                                 schedule=schedule)
        self._build_state_shardings()
        self._train_step_fn = make_train_step(
            self.task.loss_fn, self.tx, self.schedule,
            accum_steps=config.train.accum_steps, mesh=self.mesh,
            grad_fn=self.task.grad_fn(self.mesh),
        )
        self._compiled: dict[tuple, _CompiledStep] = {}
        self._eval_step = jax.jit(self.task.eval_step)
        self._preempted = False
        self._use_sync_point = jax.process_count() > 1

    # ------------------------------------------------------------------ state

    def _keys(self):
        # "params" is tasks.base.params_key(seed): tasks rely on it
        base = jax.random.PRNGKey(self.config.seed)
        return {name: jax.random.fold_in(base, i) for i, name in
                enumerate(("params", "frozen", "train"))}

    def _init_fn(self) -> TrainState:
        keys = self._keys()
        params = nn.unbox(self.task.init_params(keys["params"]))
        frozen = nn.unbox(self.task.init_frozen(keys["frozen"]))
        params = jax.lax.with_sharding_constraint(params, self.param_shardings)
        frozen = jax.lax.with_sharding_constraint(frozen, self.frozen_shardings)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=keys["train"],
            frozen=frozen,
        )

    def _build_state_shardings(self) -> None:
        keys = self._keys()
        self.param_shardings = mesh_lib.logical_shardings(
            jax.eval_shape(self.task.init_params, keys["params"]), self.mesh
        )
        self.frozen_shardings = mesh_lib.logical_shardings(
            jax.eval_shape(self.task.init_frozen, keys["frozen"]), self.mesh
        )
        self.abstract_state = jax.eval_shape(self._init_fn)
        rep = mesh_lib.replicated(self.mesh)
        self.state_shardings = TrainState(
            step=rep,
            params=self.param_shardings,
            opt_state=mesh_lib.shardings_like_params(
                self.abstract_state.opt_state, self.abstract_state.params,
                self.param_shardings, self.mesh,
            ),
            rng=rep,
            frozen=self.frozen_shardings,
        )
        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)

    def init_state(self) -> TrainState:
        """A fresh, sharded train state (the same on every mesh: derived from config.seed),
        with the task's pretrained weights (if any) in place of the random ones."""
        state = self._init()
        for field, tree in self.task.pretrained().items():
            target, shardings = getattr(state, field), getattr(self.state_shardings, field)
            given = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
            _check_fits(field, given, target)

            def put(path, t, s, given=given):
                x = given.get(path_str(path))
                if x is None:  # not given: keeps its init
                    return t
                return jax.make_array_from_callback(
                    t.shape, s, lambda idx: np.asarray(x[idx], dtype=t.dtype))

            state = state.replace(**{field: jax.tree_util.tree_map_with_path(
                put, target, shardings)})
        return state

    # ------------------------------------------------------------------ steps

    def _tracing(self) -> contextlib.ExitStack:
        """The mesh and logical-axis rules, active while a step is traced (for tasks that ask),
        so the model's activation sharding constraints take effect."""
        stack = contextlib.ExitStack()
        if self.task.activation_sharding:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(mesh_lib.DEFAULT_RULES))
        return stack

    def compiled_step(self, state: TrainState, batch: dict) -> _CompiledStep:
        """The step compiled for this batch's shapes (once per distinct shape: a sequence-length
        curriculum compiles one step per length)."""
        signature = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        if signature in self._compiled:
            return self._compiled[signature]
        batch_sh = {k: mesh_lib.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}
        jitted = jax.jit(
            self._train_step_fn,
            in_shardings=(self.state_shardings, batch_sh),
            out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh)),
            donate_argnums=0,
        )
        t0 = time.perf_counter()
        with self._tracing():
            fn = jitted.lower(state, batch).compile()
        seconds = time.perf_counter() - t0
        cost = fn.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        self._compiled[signature] = _CompiledStep(
            fn=fn, seconds=seconds, xla_flops=float((cost or {}).get("flops", 0.0)),
            model_flops=self.task.model_flops_per_step(shapes),
            tokens=self.task.step_tokens(shapes),
            samples=next(iter(batch.values())).shape[0],
        )
        logging.info("Compiled the train step for batch %s in %.1f s.",
                     {k: v.shape for k, v in batch.items()}, seconds)
        return self._compiled[signature]

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One jitted, donated step on a global (sharded) batch. Compiled on first use."""
        return self.compiled_step(state, batch).fn(state, batch)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Run the task's eval over its held-out split; metrics namespaced `eval/...`."""
        cfg = self.config
        outputs = []
        for host_batch in self.task.eval_batches(
            batch_size=cfg.eval.batch_size // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            valid = host_batch.pop("valid")
            batch = mesh_lib.shard_batch(host_batch, self.mesh)
            with self._tracing():
                out = self._eval_step(state.params, batch, state.frozen)
            out["valid"] = mesh_lib.shard_batch({"valid": valid}, self.mesh)["valid"]
            outputs.append(out)
        if jax.process_count() > 1:
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
        # Batches may differ in their keys (a task with several eval sets, e.g. retrieval pairs
        # and a zero-shot set): each key is concatenated over the batches that have it.
        merged: dict[str, list] = {}
        for out in jax.device_get(outputs):
            keep = np.asarray(out.pop("valid")).astype(bool)
            for k, v in out.items():
                merged.setdefault(k, []).append(jax.tree.map(lambda x, keep=keep: x[keep], v))
        merged = {k: jax.tree.map(lambda *xs: np.concatenate(xs), *v) for k, v in merged.items()}
        return {f"eval/{k}": float(v) for k, v in self.task.eval_metrics(merged).items()}

    # ------------------------------------------------------------------ loop

    def _peak_tflops(self) -> float:
        if self.config.train.peak_tflops:
            return self.config.train.peak_tflops
        kind = jax.devices()[0].device_kind.lower()
        return next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)

    def _train_iterator(self):
        pc = jax.process_count()
        return self.task.train_iterator(
            seed=self.config.seed, batch_size=self.config.train.batch_size // pc,
            process_index=jax.process_index(), process_count=pc,
        )

    def _restore_latest(self, ckpt: Checkpointer):
        """(state, data iterator, meta) from the newest readable checkpoint, or None.

        A checkpoint that cannot be read (a partial or corrupt directory) is skipped with a
        warning and the one before it is tried; one that does not fit the model is an error.
        """
        for step in reversed(ckpt.all_steps()):
            train_iter = self._train_iterator()
            try:
                state, meta = ckpt.restore(step, self.abstract_state, self.state_shardings,
                                           train_iter)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
                logging.warning("Skipping unreadable checkpoint %s (%s: %s); trying the one "
                                "before it.", ckpt.step_path(step), type(e).__name__, e)
                continue
            logging.info("Resuming from %s", ckpt.step_path(step))
            return state, train_iter, meta
        return None

    def _on_sigterm(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
        self._preempted = True

    def train(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to `config.train.steps` (or stop after `stop_at_step`, saving a checkpoint, as
        a preemption would), resuming from the workdir's latest checkpoint if there is one."""
        cfg = self.config
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_state))
        _check_workdir(self.workdir, state_bytes)
        ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
            best_metric=cfg.checkpoint.best_metric, best_mode=cfg.checkpoint.best_mode,
            async_save=cfg.checkpoint.async_save,
        )
        writer = MetricWriter(self.workdir)
        pc = jax.process_count()
        progress = Progress()
        restored = self._restore_latest(ckpt)
        if restored is None:
            state, train_iter = self.init_state(), self._train_iterator()
            if jax.process_index() == 0:
                with open(os.path.join(self.workdir, "config.json"), "w") as f:
                    f.write(cfg.to_json_best_effort(indent=2))
        else:
            state, train_iter, meta = restored
            progress = Progress(**meta.get("progress", {}))
            self._log_config_changes(meta.get("config", {}))
        start = int(jax.device_get(state.step))
        records = writer.truncate_after(start)

        total = cfg.train.steps
        stop = min(total, stop_at_step) if stop_at_step is not None else total
        eval_every = cfg.eval.every or total
        ckpt_every = cfg.checkpoint.every or total
        bar = ProgressBar(total, start, cfg.train.progress_bar)
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm) \
            if _main_thread() else None
        loss_history: list[tuple[int, float]] = []
        pending: list[dict] = []
        window = _Window()
        stopped_early = False
        t_last, steps_since, streak = time.perf_counter(), 0, 0

        def make_meta(step: int) -> dict:
            return {"step": step, "progress": dataclasses.asdict(progress),
                    "config": cfg.to_dict(),
                    "mesh": dict(self.mesh.shape), "process_count": pc}

        try:
            for step in range(start, stop):
                batch = mesh_lib.shard_batch(next(train_iter), self.mesh)
                compiled = self.compiled_step(state, batch)
                if not compiled.reported:
                    writer.write(step, {"perf/compile_seconds": compiled.seconds,
                                        "perf/xla_flops_per_step": compiled.xla_flops})
                    compiled.reported = True
                    t_last = time.perf_counter()
                state, metrics = compiled.fn(state, batch)
                pending.append(metrics)
                window.add(compiled)
                progress.tokens_seen += compiled.tokens
                steps_since += 1
                done = step + 1
                bar.update(1)

                if done % cfg.train.log_every == 0 or done == stop:
                    host = jax.device_get(pending)
                    dt = time.perf_counter() - t_last
                    summary = self._summarize(host, steps_since, dt, window)
                    if window.tokens:
                        summary["train/tokens_seen"] = float(progress.tokens_seen)
                    loss_history += [(done - len(host) + i + 1, float(m["loss"]))
                                     for i, m in enumerate(host)]
                    writer.write(done, summary)
                    records.append({"step": done, **summary})
                    bar.update(0, loss=summary["train/loss"], lr=summary["train/lr"],
                               samples_s=summary["perf/samples_per_second"])
                    streak = self._check_nonfinite(host, done, streak)
                    pending, steps_since, window = [], 0, _Window()
                    t_last = time.perf_counter()

                eval_metrics = None
                if done % eval_every == 0 or done == total:
                    eval_metrics = self.evaluate(state)
                    writer.write(done, eval_metrics)
                    records.append({"step": done, **eval_metrics})
                    stopped_early = progress.update(done, eval_metrics, cfg)

                log_step = done % cfg.train.log_every == 0
                last = (done == stop or stopped_early or self._preemption_notice(done)
                        or self._preempted_everywhere(log_step))
                new_best = progress.best_step == done and eval_metrics is not None
                if done % ckpt_every == 0 or last or (cfg.checkpoint.best_metric and new_best):
                    self._save(ckpt, done, state, train_iter, make_meta(done), eval_metrics)
                if last:
                    break
        finally:
            bar.close()
            self._save_guard(ckpt, None, ckpt.close)
            writer.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)

        final_step = int(jax.device_get(state.step))
        return TrainResult(
            workdir=self.workdir,
            final_step=final_step,
            loss_history=loss_history,
            metrics=records,
            best_step=progress.best_step,
            best_metric=progress.best_value,
            checkpoint_paths=[ckpt.step_path(s) for s in ckpt.all_steps()],
            final_state=state,
            stopped_early=stopped_early,
            preempted=self._preempted,
        )

    def _preemption_notice(self, step: int) -> bool:
        """JAX's preemption service (multi-host runs, e.g. a TPU maintenance event) says every
        process should save at this step. Cheap and collective-free; called on every step."""
        if not self._use_sync_point:
            return False
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # no preemption service (single process, or not enabled)
            self._use_sync_point = False
            return False
        if reached:
            logging.warning("Preemption notice at step %d: saving and stopping.", step)
            self._preempted = True
        return reached

    def _preempted_everywhere(self, may_sync: bool) -> bool:
        """SIGTERM seen by any process. Multi-host, this needs a collective: only at log steps."""
        if jax.process_count() == 1:
            return self._preempted
        if not may_sync:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self._preempted))
        return bool(np.any(flags))

    def _save_guard(self, ckpt: Checkpointer, step: int | None, fn, *args):
        """Run a save (or the final wait for queued saves, `step=None`); turn an OSError into
        CheckpointSaveError naming the checkpoints that are intact."""
        try:
            return fn(*args)
        except OSError as e:
            kept = [s for s in ckpt.all_steps() if s != step]
            what = f"checkpoint {step}" if step is not None else "the last queued checkpoint"
            raise CheckpointSaveError(
                f"Writing {what} under {ckpt.directory} failed ({e}). The earlier "
                f"checkpoints {kept} are intact; free space (or fix permissions) and re-run the "
                "same command to resume from the latest of them."
            ) from e

    def _save(self, ckpt: Checkpointer, step: int, *args) -> None:
        self._save_guard(ckpt, step, ckpt.save, step, *args)

    def _check_nonfinite(self, host: list[dict], done: int, streak: int) -> int:
        """Raise per `train.nonfinite`; return the run of consecutive skipped steps so far."""
        cfg = self.config.train
        bad = [done - len(host) + i + 1 for i, m in enumerate(host) if m["nonfinite"]]
        if bad and cfg.nonfinite == "error":
            raise NonFiniteError(
                f"Non-finite loss or gradients at step(s) {bad[:10]} (updates were not applied; "
                "the last checkpoint is intact). Lower optim.lr, set optim.clip_norm, or set "
                "train.nonfinite='skip' to skip such steps."
            )
        for m in host:
            streak = streak + 1 if m["nonfinite"] else 0
            if cfg.max_nonfinite_streak and streak >= cfg.max_nonfinite_streak:
                raise NonFiniteError(
                    f"{streak} consecutive steps up to step {done} had a non-finite loss or "
                    "gradients and were skipped (train.max_nonfinite_streak="
                    f"{cfg.max_nonfinite_streak}); stopping. The last checkpoint is intact. "
                    "Lower optim.lr, check the data, or raise train.max_nonfinite_streak."
                )
        return streak

    def _summarize(self, host: list[dict], steps: int, seconds: float,
                   window: _Window) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in host[0]:
            if k == "nonfinite":
                continue
            mean = np.mean([np.asarray(m[k]) for m in host], axis=0)
            if np.ndim(mean):  # a vector metric (e.g. per-expert load): one scalar per entry
                out.update({f"train/{k}/{i}": float(v) for i, v in enumerate(mean.ravel())})
            else:
                out[f"train/{k}"] = float(mean)
        out["train/nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in host))
        seconds = max(seconds, 1e-9)
        out["perf/steps_per_second"] = steps / seconds
        out["perf/samples_per_second"] = window.samples / seconds
        if window.tokens:
            out["perf/tokens_per_second"] = window.tokens / seconds
            out["perf/tokens_per_second_per_device"] = window.tokens / seconds / self.mesh.size
        if window.xla_flops:
            out["perf/xla_tflops_per_device"] = window.xla_flops / seconds / 1e12
        flops = window.model_flops / self.mesh.size if window.model_flops else window.xla_flops
        if flops:
            tflops = flops / seconds / 1e12
            out["perf/tflops_per_device"] = tflops
            peak = self._peak_tflops()
            if peak:
                out["perf/mfu"] = tflops / peak
        return out

    def _log_config_changes(self, saved: dict) -> None:
        now = self.config.to_dict()
        flat = lambda d, p="": {f"{p}{k}": v for kk, vv in d.items() for k, v in
                                (flat(vv, f"{kk}.").items() if isinstance(vv, dict)
                                 else [(kk, vv)])}
        a, b = flat(saved), flat(now)
        changed = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
                   if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str)}
        for k, (old, new) in sorted(changed.items()):
            logging.warning("Config differs from the checkpoint's: %s: %r -> %r", k, old, new)


def _check_fits(field: str, given: dict[str, Any], target: Any) -> None:
    """Every given pretrained leaf must exist in the state with the same shape."""
    want = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    unexpected = sorted(set(given) - set(want))[:5]
    differ = [f"{k}: {np.shape(given[k])} vs model {want[k]}"
              for k in sorted(set(given) & set(want)) if tuple(np.shape(given[k])) != want[k]][:5]
    if unexpected or differ:
        raise ConfigError(
            f"The pretrained {field} do not fit the model: unexpected {unexpected}, shapes differ "
            f"{differ}. Check the model config against the weights' source."
        )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(config: ml_collections.ConfigDict, workdir: str | None = None, **kwargs: Any):
    """Build a Trainer and run it. Returns a TrainResult."""
    return Trainer(config, workdir, **kwargs).train()
