"""Orbax checkpoints of one workdir: train state, data-iterator position, and a JSON of metadata.

Keeps the `keep` most recent steps plus the best one by an eval metric. Restores always onto
explicit target shardings, so a checkpoint written on 8 devices restores on 1 and back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxtrain.state import TrainState
from jaxtrain.tree import path_str


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir was written for another model or optimizer."""


class CheckpointUnreadableError(ValueError):
    """A checkpoint's files cannot be read (truncated, corrupt, or metadata missing)."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, permissions); the earlier ones are intact."""


ASIDE = ".corrupt"  # an unreadable checkpoint `<step>` is renamed `<step>.corrupt`
# resume_from=<step>: the later checkpoints are renamed `<step>.after-resume-<time>`
AFTER_RESUME = ".after-resume-"


def _state_dict(state: TrainState) -> dict[str, Any]:
    out = {f: getattr(state, f) for f in ("step", "params", "opt_state", "rng", "frozen")}
    if state.loss_scale is not None:  # dynamic loss scaling only: else the tree is unchanged
        out["loss_scale"] = state.loss_scale
    return out


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): tuple(x.shape) for p, x in leaves}


class Checkpointer:
    """One `ocp.CheckpointManager` under `<workdir>/checkpoints`."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        best_metric: str = "",
        best_mode: str = "max",
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointSaveError(
                f"{self.directory} is a file, not a directory: checkpoints cannot be written "
                "there. Move the file away (or choose another --workdir) and re-run.")
        self.best_metric = best_metric
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep)]
        if best_metric:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        import grain  # lazily: a benchmark without grain installed never checkpoints

        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(
        self,
        step: int,
        state: TrainState,
        data_iterator: Any,
        meta: dict,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Queue an (async) save. `metrics` ranks the checkpoint for best-keeping."""
        import grain
        if step in self.manager.all_steps():
            return False
        if self.best_metric and metrics is not None and not np.isfinite(
                metrics.get(self.best_metric, np.nan)):
            metrics = None  # unranked: never kept as the best (a NaN metric is no best)
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_dict(state)),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics={k: float(v) for k, v in metrics.items()} if metrics else None,
            force=force,
        )

    def check_compatible(self, step: int, target: TrainState) -> None:
        """Raise CheckpointMismatchError naming the first differences, before Orbax does;
        CheckpointUnreadableError if the checkpoint's metadata cannot be read (that says
        nothing about whether it fits)."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for damaged files
            raise CheckpointUnreadableError(f"its metadata cannot be read: {e}") from e
        if not saved:
            raise CheckpointUnreadableError("its array metadata (state/_METADATA) is missing")
        want, got = _shapes(_state_dict(target)), _shapes(saved)
        params_first = lambda k: (not k.startswith("params/"), k)
        missing = sorted(set(want) - set(got), key=params_first)
        extra = sorted(set(got) - set(want), key=params_first)
        differ = sorted((k for k in set(want) & set(got) if want[k] != got[k]), key=params_first)
        if missing or extra or differ:
            lines = [f"  shape {k}: checkpoint {got[k]} vs model {want[k]}" for k in differ[:5]]
            lines += [f"  only in the model: {k}" for k in missing[:5]]
            lines += [f"  only in the checkpoint: {k}" for k in extra[:5]]
            raise CheckpointMismatchError(
                f"The checkpoint at {self.step_path(step)} does not fit this model/optimizer "
                f"({len(differ)} shape differences, {len(missing)} missing and {len(extra)} extra "
                "arrays):\n" + "\n".join(lines) + "\nUse a new --workdir for a different model, "
                "or restore the config that wrote this checkpoint."
            )

    def restore(
        self, step: int, target: TrainState, target_shardings: TrainState, data_iterator: Any
    ) -> tuple[TrainState, dict]:
        """Restore `step` onto `target_shardings`; `data_iterator` is set in place.

        Every process saved its own iterator state. Restored with another number of processes,
        each takes process 0's: jaxtrain's iterators count global batches, so the position is
        the same whatever the host count.
        """
        self.check_compatible(step, target)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            _state_dict(target),
            _state_dict(target_shardings),
        )
        saved_processes = self.restore_meta(step).get("process_count", 1)
        same_processes = saved_processes == jax.process_count()
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if same_processes:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if not same_processes:
            name = f"process_0-of-{saved_processes}.json"
            path = os.path.join(self.step_path(step), "data", name)
            with open(path) as f:
                data_iterator.set_state(json.load(f))
            logging.warning("Checkpoint written by %d processes, restored by %d: every process "
                            "resumes from process 0's data position.", saved_processes,
                            jax.process_count())
        return TrainState(**restored["state"]), restored["meta"]

    def move_aside(self, step: int, suffix: str = ASIDE) -> str:
        """Rename checkpoint `step` to `<step><suffix>` (default `<step>.corrupt`; `.2`, ... added
        if taken): kept for inspection, ignored by the manager and by rotation (its name is no
        step number). Process 0 renames; every process waits for it. Returns the new path."""
        src = self.step_path(step)
        dst = src + suffix
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}{suffix}.{n}"
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxtrain-move-aside-{step}")
        self.manager.reload()
        return dst

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]

    def close(self, quiet: bool = False) -> None:
        """Wait for queued saves and close (once; later calls do nothing). `quiet`: a
        failure of a queued save is not raised (it was, or is being, reported)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception:
            if not quiet:
                raise


def saved_steps(root: str) -> list[int]:
    """The steps saved under a `checkpoints/` directory (those with a `state`; moved-aside
    `<step>.corrupt` ones excluded), ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root)
                  if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))


def read_meta(step_dir: str) -> dict:
    """The JSON metadata of one checkpoint step (step, progress, config); {} when absent."""
    for name in ("metadata", "meta.json"):
        path = os.path.join(step_dir, "meta", name)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return {}


def step_dir_of(path: str) -> str:
    """The checkpoint step directory `path` names: a step directory itself, else the newest
    step of a workdir (`<path>/checkpoints/<step>`) or of a `checkpoints/` directory. Absolute
    (Orbax's metadata reader misses files under a relative path). FileNotFoundError if none."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    steps = saved_steps(root)
    if not steps:
        what = "it does not exist" if not os.path.exists(path) else "no saved step in it"
        raise FileNotFoundError(
            f"No jaxtrain checkpoint under {path!r} ({what}): expected a workdir with "
            "checkpoints/<step>/state, a checkpoints/ directory, or a step directory.")
    return os.path.join(root, str(steps[-1]))


def read_state(path: str, fields: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """(config dict, saved state as host numpy arrays) of a jaxtrain run's newest checkpoint.

    `path` is a workdir, its `checkpoints/` directory, or one step directory
    (:func:`step_dir_of`). `fields` (e.g. ``("params", "frozen")``) reads only those parts of
    the state (the optimizer state, often twice the params, is then never read).

    The tree structure comes from the state item's own metadata (`state/_METADATA`):
    `PyTreeCheckpointer.metadata()` would also look for a step-level `_CHECKPOINT_METADATA`
    inside the item directory, which never has one (it sits one level up), and log Orbax's
    "Metadata file does not exist" warning on every read.
    """
    from etils import epath  # Orbax's path type (an Orbax dependency)

    step_dir = step_dir_of(path)
    state_dir = os.path.join(step_dir, "state")
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
    if fields is not None:
        tree = {k: tree[k] for k in fields if k in tree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=tree, restore_args=restore_args, partial_restore=fields is not None))
    return read_meta(step_dir).get("config", {}), dict(state)

