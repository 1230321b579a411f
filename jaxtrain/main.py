"""Command line: `python -m jaxtrain.main --config=configs/clip.py[:variant] [--workdir=...]`.

Overrides: `--config.optim.lr=3e-4 --config.train.steps=500`. Running the same command in the same
workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/clip.py or configs/clip.py:runlocal.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, tensorboard). "
    "Default: runs/<config file name>."
)

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs outside "
    "TPU pods / SLURM (where JAX finds it itself)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, N).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize: 'auto' = when the flags above are given or a cluster "
    "(SLURM with several tasks, a TPU pod) is detected.",
)

EXIT_BAD_INPUT = 2  # a config or checkpoint problem; the log line says what to change
EXIT_RUN_FAILED = 3  # NaN storm / NaN in 'error' mode / a checkpoint could not be written
EXIT_PREEMPTED = 42  # a checkpoint was saved after SIGTERM; re-run the same command to resume


def _default_workdir() -> str:
    path = flags.FLAGS["config"].config_filename
    return os.path.join("runs", os.path.splitext(os.path.basename(path))[0])


def _in_cluster() -> bool:
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    tpu_pod = len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return slurm or tpu_pod


def init_distributed() -> None:
    """`jax.distributed.initialize` for multi-process runs; must precede any other JAX call."""
    import jax

    explicit = _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None
    if _DISTRIBUTED.value == "off" or (
        _DISTRIBUTED.value == "auto" and not explicit and not _in_cluster()
    ):
        return
    if explicit and None in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
        raise app.UsageError(
            "A multi-process run needs all of --coordinator_address, --num_processes and "
            "--process_id (or none of them on TPU pods / SLURM, where JAX detects them)."
        )
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process logs
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    init_distributed()
    # after flag parsing: keeps --help fast
    from jaxtrain.checkpoint import CheckpointMismatchError
    from jaxtrain.config import ConfigError
    from jaxtrain.trainer import CheckpointSaveError, NonFiniteError, Trainer

    config = _CONFIG.value
    workdir = _WORKDIR.value or _default_workdir()
    logging.info("jaxtrain: task=%s workdir=%s", config.task, workdir)
    try:
        result = Trainer(config, workdir).train()
    except (ConfigError, CheckpointMismatchError) as e:  # the message says what to fix
        logging.error("%s: %s", type(e).__name__, e)
        return EXIT_BAD_INPUT
    except (NonFiniteError, CheckpointSaveError) as e:  # the run stopped; checkpoints intact
        logging.error("%s: %s", type(e).__name__, e)
        return EXIT_RUN_FAILED
    logging.info("Finished at step %d. Eval metrics:\n%s", result.final_step, result.table())
    if result.best_step is not None:
        logging.info("Best: step %d, %.4f", result.best_step, result.best_metric)
    return EXIT_PREEMPTED if result.preempted else 0


class _QuietLibraries:
    """Keep INFO lines from jaxtrain; libraries (Orbax logs every save) only from WARNING up."""

    def filter(self, record) -> bool:
        return record.levelno >= pylogging.WARNING or "/jaxtrain/" in record.pathname


def run() -> None:
    flags.mark_flags_as_required(["config"])
    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(_QuietLibraries())
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
