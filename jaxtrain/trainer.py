"""The task-agnostic trainer: mesh, optimizer, sharded state, the jitted step, and the loop.

    trainer = Trainer(config, workdir, task=task, evaluators=evaluators)
    result = trainer.train()                # resumes from the workdir's latest checkpoint

It takes a built task (and its evaluators): `jaxtrain.Trainer` / `jaxtrain.train` (the face,
`jaxtrain/api.py`) resolve them from the config's names. The loop only steps; logging, progress,
evaluation, early stopping, preemption and checkpoints are hooks (:mod:`jaxtrain.hooks`). It never
syncs with the device between log steps: per-step metrics stay on device until `train.log_every`
steps have run, then are fetched together.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from jaxtrain import console, offload
from jaxtrain import loss_scale as loss_scale_lib
from jaxtrain import memory as memory_lib
from jaxtrain import mesh as mesh_lib
from jaxtrain import prefetch as prefetch_lib
from jaxtrain.checkpoint import (
    AFTER_RESUME,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointSaveError,
    read_state,
    step_dir_of,
)
from jaxtrain.config import ConfigError, check_divisibility
from jaxtrain.epochs import check_epoch_cadence, steps_for_epochs
from jaxtrain.errors import brief
from jaxtrain.evaluator import EvalContext, Evaluator, LoopEvaluator
from jaxtrain.hooks import (
    Hook,
    Loop,
    NonFiniteError,
    Progress,
    Window,
    default_hooks,
)
from jaxtrain.optim import build_optimizer
from jaxtrain.state import TrainState
from jaxtrain.step import make_train_step
from jaxtrain.task import Task
from jaxtrain.tree import path_str
from jaxtrain.workdir import WorkdirLock, check_workdir
from jaxtrain.writers import MetricsWriteError, MetricWriter

# Dense bf16 peak TFLOP/s per device, for MFU. Override with config.train.peak_tflops.
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "tpu v4": 275.0, "tpu v5 lite": 197.0,
               "tpu v5p": 459.0, "tpu v6": 918.0}


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
    final_loss: float | None = None  # mean train loss of the last log window
    best_checkpoint_path: str | None = None  # checkpoint dir of best_step, if it still exists
    best_epoch: float | None = None  # epochs done at best_step (None: dataset size unknown)
    epoch: float | None = None  # epochs done at final_step (None: dataset size unknown)
    report_path: str | None = None  # the run report PNG (jaxtrain.report), once written
    exports: dict[str, str] = dataclasses.field(default_factory=dict)  # format -> folder
    run_name: str = ""  # config.run_name, else the workdir's name

    def metrics_frame(self):
        """The history as a pandas DataFrame: one row per step that has records (train
        summaries and evaluations at the same step merged), one column per metric name,
        indexed by `step`; a metric absent at a step is NaN."""
        import pandas as pd

        rows: dict[int, dict[str, float]] = {}
        for record in self.metrics:
            rows.setdefault(int(record["step"]), {}).update(
                {k: v for k, v in record.items() if k != "step"})
        frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
        frame.index.name = "step"
        return frame

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
class CompiledStep:
    """The train step compiled for one batch shape, with its cost figures."""

    fn: Any
    seconds: float
    xla_flops: float  # per device, from XLA's cost analysis
    model_flops: float  # whole step, from the task's formula (0 = unknown)
    tokens: int  # tokens per global batch (0 = not a token model)
    samples: int = 0
    reported: bool = False
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # memory.step_memory


class NoReadableCheckpointError(ConfigError):
    """The workdir has checkpoints and none of them can be read."""


class Trainer:
    """Builds everything a run needs from a config; `train()` runs (or resumes) it."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | None = None,
        *,
        task: Task,
        evaluators: Mapping[str, Evaluator] | None = None,
        devices: list[jax.Device] | None = None,
        schedule: optax.Schedule | None = None,
        hooks: Sequence[Hook] = (),
        init_params: Any = None,
    ):
        """`task`: the built task (validated config; LoRA applied). `evaluators`: name ->
        evaluator (`eval/<name>/...`). `schedule` (a function of the step) replaces the
        config's learning-rate schedule (the LR finder passes its sweep). `hooks` run after the
        built-in ones of `train()` (before preemption and checkpointing). `init_params`: a
        params tree (nested dicts of arrays, e.g. another run's `final_state.params`) to start
        from instead of the init, placed like `task.pretrained()` (a leaf left out keeps its
        init; unknown leaves or other shapes are a ConfigError); ignored when resuming.

        With `train.epochs > 0`, `self.config` is a copy of `config` whose `train.steps` is
        derived from the task's dataset size (:mod:`jaxtrain.epochs`)."""
        self.config = config
        self.workdir = os.path.abspath(workdir or os.path.join("runs", config.task or "run"))
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        dp = mesh_lib.data_parallel_size(self.mesh)
        check_divisibility(config, dp)
        self.task = task
        self.init_params = init_params
        self.config = config = self._derive_steps(config)
        self.evaluators = dict(evaluators or {})
        for name, ev in self.evaluators.items():
            if ev.config.batch_size % dp:
                raise ConfigError(
                    f"evals.{name}.batch_size ({ev.config.batch_size}) is not divisible by the "
                    f"data-parallel size {dp}; use a multiple of {dp}.")
        for name, ev in self.evaluators.items():
            if ev.config.every == "epoch":
                check_epoch_cadence(f"evals.{name}.every", ev.config.every, self.train_examples)
        self.hooks = list(hooks)
        self.tx, self.schedule = build_optimizer(config.optim, config.train.steps,
                                                 schedule=schedule)
        self.loss_scale = loss_scale_lib.from_config(config.train, config.model)
        # TrainState fields kept in host memory between steps (jaxtrain/offload.py)
        self.offloaded = offload.offloaded_fields(config)
        offload.check_supported(self.mesh.local_devices, self.offloaded)
        self._build_state_shardings()
        self._train_step_fn = make_train_step(
            self.task.loss_fn, self.tx, self.schedule,
            accum_steps=config.train.accum_steps, mesh=self.mesh,
            grad_fn=self.task.grad_fn(self.mesh), loss_scale=self.loss_scale,
        )
        self._train_step_fn = offload.on_device(self._train_step_fn, self.offloaded)
        self._compiled: dict[tuple, CompiledStep] = {}
        self._eval_steps: dict[str, Any] = {}

    @functools.cached_property
    def train_examples(self) -> int | None:
        """Training rows per epoch, over all hosts (`Task.num_train_examples()`, asked once,
        when first needed: a task may have to build its data to count them); None = unknown."""
        return self.task.num_train_examples()

    @property
    def steps_per_epoch(self) -> float | None:
        """train_examples / train.batch_size (a float); None when the dataset size is unknown."""
        n = self.train_examples
        return n / self.config.train.batch_size if n else None

    def _derive_steps(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """With `train.epochs = E > 0`, a copy of `config` with train.steps = ceil(E *
        train_examples / train.batch_size), before the optimizer and its schedule (warmup_ratio
        included) are built from it; else `config`. 'epoch' cadences need a known size."""
        for key in ("eval.every", "checkpoint.every"):
            every = config[key.split(".")[0]].every
            if every == "epoch":
                check_epoch_cadence(key, every, self.train_examples)
        batch = config.train.batch_size
        epochs = config.train.get("epochs", 0.0)
        if not epochs:
            return config
        if self.train_examples is None:
            raise ConfigError(
                f"train.epochs={epochs} needs the number of training examples, which the "
                f"{self.task.name!r} task's data does not know (streaming data): set train.steps "
                "instead (and train.epochs=0).")
        steps = steps_for_epochs(epochs, self.train_examples, batch)
        if config.optim.warmup_steps >= steps:
            raise ConfigError(
                f"Config key 'optim.warmup_steps' ({config.optim.warmup_steps}) must be smaller "
                f"than the {steps} steps train.epochs={epochs} gives ({self.train_examples} "
                f"examples at batch {batch}); lower it or use optim.warmup_ratio.")
        logging.info("train.epochs=%g: %d training examples at a global batch of %d = %.4g "
                     "steps per epoch; training %d steps.", epochs, self.train_examples, batch,
                     self.train_examples / batch, steps)
        config = copy.deepcopy(config)
        config.train.steps = steps
        return config

    # ------------------------------------------------------------------ state

    def _keys(self):
        # "params" is jaxtrain.task.params_key(seed): tasks rely on it
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
            loss_scale=loss_scale_lib.init_state(self.loss_scale),
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
                split_axis="data" if self.config.mesh.get("shard_optimizer") else None,
            ),
            rng=rep,
            frozen=self.frozen_shardings,
            loss_scale=jax.tree.map(lambda _: rep, self.abstract_state.loss_scale),
        )
        self.state_shardings = offload.host_shardings(self.state_shardings, self.offloaded)
        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)

    def init_state(self, start_from: tuple[str, dict[str, Any]] | None = None) -> TrainState:
        """A fresh, sharded train state (the same on every mesh: derived from config.seed),
        with, in place of the random weights and in this order: the task's pretrained weights
        (if any), the trainer's `init_params`, and `start_from` = (what, {"params": ...,
        "frozen": ...}) (a fine-tune's checkpoint, `resume_from`). The optimizer state stays
        fresh."""
        state = self._init()
        sources = [("pretrained", self.task.pretrained())]
        if self.init_params is not None:
            sources.append(("init_params", {"params": jax.device_get(self.init_params)}))
        if start_from is not None:
            sources.append(start_from)
        for what, trees in sources:
            state = self._put_weights(state, what, trees)
        return state

    def _put_weights(self, state: TrainState, what: str, trees: dict[str, Any]) -> TrainState:
        for field, tree in trees.items():
            target, shardings = getattr(state, field), getattr(self.state_shardings, field)
            given = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
            _check_fits(field, given, target, what)

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

    def compiled_step(self, state: TrainState, batch: dict) -> CompiledStep:
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
        try:
            with self._tracing(), console.status("compiling the train step", done=None,
                                                 enabled=jax.process_index() == 0):
                fn = jitted.lower(state, batch).compile()
        except (ValueError, TypeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(
                f"Building the train step for batch {dict((k, v.shape) for k, v in batch.items())}"
                f" on mesh {dict(self.mesh.shape)} failed: {type(e).__name__}: {e} -- the step "
                "follows from the config (task, model, data shapes, mesh, train.*): change the "
                "setting the message names.") from e
        seconds = time.perf_counter() - t0
        cost = fn.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        self._compiled[signature] = CompiledStep(
            fn=fn, seconds=seconds, xla_flops=float((cost or {}).get("flops", 0.0)),
            model_flops=self.task.model_flops_per_step(shapes),
            tokens=self.task.step_tokens(shapes),
            samples=next(iter(batch.values())).shape[0],
            memory=memory_lib.step_memory(fn),
        )
        logging.info("Compiled the train step in %.1f s (batch %s; per device: %s).", seconds,
                     {k: v.shape for k, v in batch.items()},
                     console.bytes_text(self._compiled[signature].memory))
        return self._compiled[signature]

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One jitted, donated step on a global (sharded) batch. Compiled on first use."""
        return self.compiled_step(state, batch).fn(state, batch)

    def _eval_step(self, name: str):
        if name not in self._eval_steps:
            ev, task, offloaded = self.evaluators[name], self.task, self.offloaded

            def step(params, batch, frozen):
                params = offload.params_on_device(params, offloaded)
                params, frozen = task.eval_params(params, frozen)
                return ev.step(params, batch, frozen)

            self._eval_steps[name] = jax.jit(step)
        return self._eval_steps[name]

    def evaluate(self, state: TrainState, names: Sequence[str] | None = None,
                 writer: Any = None) -> dict[str, float]:
        """Run the evaluators (all, or those named) on `state`: metrics `eval/<name>/...`.
        `writer` (the run's MetricWriter) receives what loop evaluators write (samples)."""
        out: dict[str, float] = {}
        for name in (self.evaluators if names is None else names):
            if isinstance(self.evaluators[name], LoopEvaluator):
                metrics = self._run_loop_evaluator(name, state, writer)
            else:
                metrics = self._run_evaluator(name, state)
            out.update({f"eval/{name}/{k}": float(v) for k, v in metrics.items()})
        return out

    def _run_loop_evaluator(self, name: str, state: TrainState, writer: Any) -> dict[str, float]:
        ev = self.evaluators[name]
        if "_eval_params" not in self._eval_steps:
            self._eval_steps["_eval_params"] = jax.jit(
                lambda p, f: self.task.eval_params(offload.params_on_device(p, self.offloaded), f))
        with self._tracing():
            params, frozen = self._eval_steps["_eval_params"](state.params, state.frozen)
        context = EvalContext(mesh=self.mesh, step=int(jax.device_get(state.step)),
                              workdir=self.workdir, writer=writer,
                              batch_size=ev.config.batch_size or self.config.eval.batch_size)
        return ev.run(params, frozen, context)

    def _run_evaluator(self, name: str, state: TrainState) -> dict[str, float]:
        ev, pc = self.evaluators[name], jax.process_count()
        step = self._eval_step(name)
        batch_size = ev.config.batch_size or self.config.eval.batch_size
        outputs = []
        for host_batch in ev.batches(batch_size=batch_size // pc,
                                     process_index=jax.process_index(), process_count=pc):
            valid = host_batch.pop("valid")
            batch = mesh_lib.shard_batch(host_batch, self.mesh)
            with self._tracing():
                out = step(state.params, batch, state.frozen)
            out["valid"] = mesh_lib.shard_batch({"valid": valid}, self.mesh)["valid"]
            outputs.append(out)
        if pc > 1:
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
        # Batches may differ in their keys (an evaluator with two kinds of rows, e.g. the
        # zero-shot images and class prompts): each key is concatenated over the batches
        # that have it.
        merged: dict[str, list] = {}
        for out in jax.device_get(outputs):
            keep = np.asarray(out.pop("valid")).astype(bool)
            for k, v in out.items():
                merged.setdefault(k, []).append(jax.tree.map(lambda x, keep=keep: x[keep], v))
        merged = {k: jax.tree.map(lambda *xs: np.concatenate(xs), *v) for k, v in merged.items()}
        metrics = ev.metrics(merged)
        bad = sorted(k for k, v in merged.items() if not _all_finite(v))
        if bad:  # a diverged model: its metrics must never look good (nor be chosen as best)
            logging.warning("Evaluator %r: non-finite outputs %s (a diverged model?): its "
                            "metrics are NaN.", name, bad)
            return {k: float("nan") for k in metrics}
        return metrics

    # ------------------------------------------------------------------ loop

    def peak_tflops(self) -> float:
        """Per-device dense bf16 peak TFLOP/s, for MFU: `train.peak_tflops`, else the known
        accelerator's, else 0 (unknown: no MFU)."""
        if self.config.train.peak_tflops:
            return self.config.train.peak_tflops
        kind = jax.devices()[0].device_kind.lower()
        return next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)

    def train_iterator(self):
        """The task's training data for this host (a resumable grain iterator)."""
        pc = jax.process_count()
        return self.task.train_iterator(
            seed=self.config.seed, batch_size=self.config.train.batch_size // pc,
            process_index=jax.process_index(), process_count=pc,
        )

    def _restore_latest(self, ckpt: Checkpointer):
        """(state, data iterator, meta) from the newest readable checkpoint, or None when
        there is none to resume.

        A checkpoint that cannot be read (truncated or corrupt files, missing metadata) is
        moved aside (renamed `<step>.corrupt`, never deleted) once an older one restores, so
        the run re-writes its step and rotation never counts it. One that does not fit the
        model is an error (CheckpointMismatchError): unreadable is not incompatible. When none
        can be read the run stops (NoReadableCheckpointError), nothing changed on disk, unless
        `checkpoint.if_unreadable='start_over'` (all moved aside; train from step 0).
        """
        unreadable: list[tuple[int, str]] = []
        for step in reversed(ckpt.all_steps()):
            train_iter = self.train_iterator()
            try:
                state, meta = ckpt.restore(step, self.abstract_state, self.state_shardings,
                                           train_iter)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
                reason = brief(e, 240)
                logging.warning("Checkpoint %s cannot be read (%s); trying the one before it.",
                                ckpt.step_path(step), reason)
                unreadable.append((step, reason))
                continue
            self._move_aside(ckpt, unreadable)
            logging.info("Resuming from %s", ckpt.step_path(step))
            return state, train_iter, meta
        if unreadable:
            if self.config.checkpoint.if_unreadable != "start_over":
                listed = "\n".join(f"  {ckpt.step_path(s)}: {r}" for s, r in unreadable)
                raise NoReadableCheckpointError(
                    f"None of the {len(unreadable)} checkpoints of this workdir can be read:\n"
                    f"{listed}\nNothing was changed on disk. Restore them from a copy and re-run"
                    ", or re-run with --config.checkpoint.if_unreadable=start_over to move them "
                    "aside (renamed <step>.corrupt, not deleted) and train from step 0.")
            self._move_aside(ckpt, unreadable)
            logging.warning("No checkpoint could be read (checkpoint.if_unreadable=start_over): "
                            "training from step 0.")
        return None

    @staticmethod
    def _move_aside(ckpt: Checkpointer, unreadable: list[tuple[int, str]]) -> None:
        for step, _ in unreadable:
            logging.warning("Moved the unreadable checkpoint %s aside to %s.",
                            ckpt.step_path(step), ckpt.move_aside(step))

    def check_data(self) -> None:
        """Every evaluator's data loaded and checked (:meth:`Evaluator.prepare`) before
        anything compiles: a missing file, a bad row or an empty split is reported now, not
        at the first evaluation."""
        pc = jax.process_count()
        for ev in self.evaluators.values():
            batch_size = ev.config.batch_size or self.config.eval.batch_size
            ev.prepare(batch_size=batch_size // pc, process_index=jax.process_index(),
                       process_count=pc)

    def loop(self, loop: Loop, hooks: Sequence[Hook]) -> Loop:
        """Step from `loop.step` to `loop.stop_at`, calling every hook after each step, until
        the last step or a hook's stop request. The whole training loop.

        Batches are read and put on the devices `train.prefetch_to_device` steps ahead, in a
        thread (:mod:`jaxtrain.prefetch`); `loop.train_iter` is then the prefetcher, whose
        state is the data position of the batch last consumed (what checkpoints save). When
        the loop ends, it is the data iterator again, at that position."""
        data = loop.train_iter
        loop.train_iter = prefetch_lib.device_prefetch(
            data, lambda b: mesh_lib.shard_batch(b, self.mesh),
            self.config.train.get("prefetch_to_device", 2))
        for hook in hooks:
            hook.on_start(loop)
        try:
            for _ in range(loop.step, loop.stop_at):
                batch = next(loop.train_iter)
                loop.compiled = self.compiled_step(loop.state, batch)
                loop.state, loop.metrics = loop.compiled.fn(loop.state, batch)
                loop.step += 1
                for hook in hooks:
                    hook.after_step(loop)
                if loop.last:
                    break
        finally:
            try:
                for hook in reversed(hooks):
                    hook.on_end(loop)
            finally:
                loop.train_iter.close()  # un-reads the batches read ahead
                loop.train_iter = data
        return loop

    def train(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to `config.train.steps` (or stop after `stop_at_step`, saving a checkpoint, as
        a preemption would), resuming from the workdir's latest checkpoint if there is one.
        The workdir is locked for the run (:class:`jaxtrain.workdir.WorkdirLock`)."""
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_state))
        check_workdir(self.workdir, state_bytes)
        with WorkdirLock(self.workdir):
            return self._train(stop_at_step)

    def _train(self, stop_at_step: int | None) -> TrainResult:
        cfg = self.config
        ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
            best_metric=cfg.checkpoint.best_metric, best_mode=cfg.checkpoint.best_mode,
            async_save=cfg.checkpoint.async_save,
        )
        writer = MetricWriter(self.workdir, config=cfg)
        try:
            with console.status("preparing the eval data", enabled=bool(self.evaluators)
                                and jax.process_index() == 0):
                self.check_data()
            start_from = self._resume_from(ckpt)
            restored = self._restore_latest(ckpt)
            progress = Progress()
            if restored is None:
                with console.status("initialising the model and the training data",
                                    enabled=jax.process_index() == 0):
                    state, train_iter = self.init_state(start_from), self.train_iterator()
                if jax.process_index() == 0:
                    with open(os.path.join(self.workdir, "config.json"), "w") as f:
                        f.write(cfg.to_json_best_effort(indent=2))
            else:
                state, train_iter, meta = restored
                progress = Progress(**meta.get("progress", {}))
                self._log_config_changes(meta.get("config", {}))
            start = int(jax.device_get(state.step))
            stop = min(cfg.train.steps, stop_at_step) if stop_at_step is not None else \
                cfg.train.steps
            loop = Loop(trainer=self, state=state, train_iter=train_iter, start=start,
                        stop_at=stop, step=start, progress=progress, writer=writer,
                        records=writer.truncate_after(start))
            if start < stop:
                self.loop(loop, default_hooks(self, ckpt, self.hooks))  # closes ckpt
        except (NonFiniteError, CheckpointSaveError, MetricsWriteError) as e:
            ckpt.close(quiet=True)
            e.args = (f"{e.args[0]} {on_disk(ckpt)}", *e.args[1:])
            raise
        finally:
            ckpt.close(quiet=True)  # when the loop did not run; a no-op after it
            writer.close()
        return self._result(loop, ckpt)

    def _result(self, loop: Loop, ckpt: Checkpointer) -> TrainResult:
        from jaxtrain.trackers import run_name

        steps = ckpt.all_steps()
        best = loop.progress.best_step
        final_step = int(jax.device_get(loop.state.step))
        losses = [r["train/loss"] for r in loop.records if "train/loss" in r]
        epoch = lambda step: None if step is None or not self.steps_per_epoch else \
            step / self.steps_per_epoch
        return TrainResult(
            workdir=self.workdir,
            final_step=final_step,
            loss_history=loop.loss_history,
            metrics=loop.records,
            best_step=best,
            best_metric=loop.progress.best_value,
            checkpoint_paths=[ckpt.step_path(s) for s in steps],
            final_state=loop.state,
            stopped_early=loop.stop_reason == "early_stop",
            preempted=loop.stop_reason == "preempted",
            final_loss=float(losses[-1]) if losses else None,
            best_checkpoint_path=ckpt.step_path(best) if best in steps else None,
            best_epoch=epoch(best),
            epoch=epoch(final_step),
            run_name=run_name(self.config, self.workdir),
        )

    def _resume_from(self, ckpt: Checkpointer) -> tuple[str, dict[str, Any]] | None:
        """Apply `config.resume_from` before the workdir's latest checkpoint is restored.

        A step of this workdir ('40'): the later checkpoints are moved aside (renamed
        `<step>.after-resume-<time>`, never deleted; rotation ignores them), so the latest is
        that step; metrics.jsonl is then truncated to it as on any resume. Applied once: when
        the newest checkpoint was written by a run with this same resume_from, it is resumed.
        A path (another run's workdir, checkpoints/ dir or step dir): on a fresh workdir,
        returns ("the checkpoint <dir>", {"params", "frozen"}) for :meth:`init_state` (a
        fine-tune: fresh optimizer, step 0, data from the start); once this workdir has
        checkpoints of its own, they are resumed and the path is ignored."""
        value = str(self.config.get("resume_from", "") or "").strip()
        if not value:
            return None
        steps = ckpt.all_steps()
        if value.isdigit():
            step = int(value)
            if step not in steps:
                raise ConfigError(
                    f"resume_from={value}: this workdir has no checkpoint at step {step}; its "
                    f"checkpoints under {ckpt.directory}: {steps or 'none'}. Pass one of those "
                    "steps, or a path to another run's workdir / checkpoint to fine-tune from.")
            later = [s for s in steps if s > step]
            if later and self._resume_applied(ckpt, later[-1], value):
                logging.info("resume_from=%s was applied by the run that wrote checkpoint %d "
                             "(its config has the same resume_from): resuming from %d. To go "
                             "back to step %s once more, rename the later checkpoint "
                             "directories (e.g. %d -> %d.old) and re-run.", value, later[-1],
                             later[-1], value, later[-1], later[-1])
                return None
            tag = AFTER_RESUME + time.strftime("%Y%m%dT%H%M%S")
            for s in later:
                logging.warning("resume_from=%s: moved the later checkpoint %s aside to %s (not "
                                "deleted).", value, ckpt.step_path(s), ckpt.move_aside(s, tag))
            logging.info("resume_from=%s: resuming from %s.", value, ckpt.step_path(step))
            return None
        if steps:
            logging.info("resume_from=%r only starts a run: this workdir has checkpoints of its "
                         "own (latest: step %d), resuming from them.", value, steps[-1])
            return None
        try:
            step_dir = step_dir_of(value)
        except FileNotFoundError as e:
            raise ConfigError(
                f"resume_from={value!r}: {e} An integer resumes a step of this workdir, which "
                "has no checkpoints yet.") from e
        try:
            _, saved = read_state(step_dir, fields=("params", "frozen"))
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for damaged files
            raise ConfigError(
                f"resume_from={value!r}: the checkpoint {step_dir} cannot be read ({brief(e)}). "
                "Pass another step directory of that run, or restore its files.") from e
        logging.info("resume_from: fine-tuning from the params of %s (a fresh optimizer, from "
                     "step 0 and the start of the data).", step_dir)
        return (f"resume_from checkpoint {step_dir}",
                {k: saved[k] for k in ("params", "frozen") if saved.get(k)})

    @staticmethod
    def _resume_applied(ckpt: Checkpointer, step: int, value: str) -> bool:
        """Whether checkpoint `step` was written by a run with `resume_from=value`."""
        try:
            saved = ckpt.restore_meta(step).get("config", {})
        except Exception:  # noqa: BLE001 - unreadable: it cannot tell; treat as not applied
            return False
        return str(saved.get("resume_from", "")) == value

    def summarize(self, host: list[dict], steps: int, seconds: float,
                  window: Window) -> dict[str, float]:
        """Train metrics of `steps` steps fetched to the host: means (`train/...`), skipped
        steps, throughput / FLOP rates / MFU over `seconds`, and memory (`perf/...`)."""
        out: dict[str, float] = {}
        for k in host[0]:
            if k in ("nonfinite", "overflow", "loss_scale"):
                continue
            mean = np.mean([np.asarray(m[k]) for m in host], axis=0)
            if np.ndim(mean):  # a vector metric (e.g. per-expert load): one scalar per entry
                out.update({f"train/{k}/{i}": float(v) for i, v in enumerate(mean.ravel())})
            else:
                out[f"train/{k}"] = float(mean)
        out["train/nonfinite_steps"] = float(sum(int(m["nonfinite"]) for m in host))
        if "loss_scale" in host[0]:  # loss scaling: the latest step's S, steps it skipped
            out["train/loss_scale"] = float(host[-1]["loss_scale"])
            out["train/overflow_steps"] = float(sum(int(m["overflow"]) for m in host))
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
            peak = self.peak_tflops()
            if peak:
                out["perf/mfu"] = tflops / peak
        # device peak / in-use bytes where the backend reports them, and host RSS
        out.update(memory_lib.memory_metrics(self.mesh.local_devices))
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


def _all_finite(tree: Any) -> bool:
    """No NaN/Inf in any floating leaf (bf16 included)."""
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree)
               if jnp.issubdtype(np.asarray(x).dtype, jnp.floating))


def on_disk(ckpt: Checkpointer) -> str:
    """What a stopped run leaves to resume from, for its error message."""
    steps = ckpt.all_steps()
    if not steps:
        return ("No checkpoint is on disk yet: re-running the same command starts from step 0.")
    return (f"Checkpoints on disk: {steps} under {ckpt.directory}; re-running the same command "
            f"resumes from step {steps[-1]}.")


def _check_fits(field: str, given: dict[str, Any], target: Any, what: str = "pretrained") -> None:
    """Every given leaf (of `what`: pretrained weights, init_params, a checkpoint) must exist
    in the state with the same shape."""
    want = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    unexpected = sorted(set(given) - set(want))[:5]
    differ = [f"{k}: {np.shape(given[k])} vs model {want[k]}"
              for k in sorted(set(given) & set(want)) if tuple(np.shape(given[k])) != want[k]][:5]
    if unexpected or differ:
        raise ConfigError(
            f"The {what} {field} do not fit the model: unexpected {unexpected}, shapes differ "
            f"{differ}. Check the model config against the weights' source."
        )
