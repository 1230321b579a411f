"""What the command lines share: the run flags, the exit codes, logging, the multi-process start.

    run_flags = define_run_flags()      # --config, --workdir and the multi-process flags
    setup_logging()                     # INFO from jaxtrain, WARNING up from libraries
    ...                                 # in absl's main: init_distributed(run_flags), ...
    return EXIT_BAD_INPUT               # on a ConfigError

`python -m jaxtrain.main` (train), `python -m jaxtrain.lr_find` and `python -m jaxtrain.sweep` use
it, so the three take the same `--config`, `--config.KEY=VALUE`, `--workdir` and multi-process
flags and end with the same exit codes. Importing this module defines no flag and imports no JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import logging as pylogging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# The flags defined here belong to the module that asks for them (its `--help` lists them).
flags.disclaim_key_flags()

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a config or checkpoint problem; the log line says what to change
EXIT_RUN_FAILED = 3  # NaN storm / NaN in 'error' mode / a checkpoint could not be written
EXIT_PREEMPTED = 42  # a checkpoint was saved after SIGTERM / Ctrl-C; re-run the same command
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, without a checkpoint


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """The flags every jaxtrain command line takes (absl flag holders: read `.value` after
    parsing)."""

    config: flags.FlagHolder
    workdir: flags.FlagHolder
    coordinator_address: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder
    distributed: flags.FlagHolder
    show_config: flags.FlagHolder | None = None

    def config_file(self) -> str | None:
        """The --config argument as given, its `:variant` included (`configs/clip.py:runlocal`),
        or None."""
        return config_flags.get_config_filename(flags.FLAGS[self.config.name])

    def config_overrides(self) -> dict:
        """The --config.KEY=VALUE overrides given on the command line, as {KEY: VALUE}."""
        return dict(config_flags.get_override_values(flags.FLAGS[self.config.name]))


@functools.cache
def define_run_flags() -> RunFlags:
    """Define --config, --workdir and the multi-process flags (once per process; later calls
    return the same holders)."""
    return RunFlags(
        config=config_flags.DEFINE_config_file(
            "config", None, "Config file, e.g. configs/clip.py or configs/clip.py:runlocal "
            "(':' then comma-separated variants). Change any key with --config.KEY=VALUE; "
            "--show_config lists the file's variants and every key with its value.",
            lock_config=True),
        workdir=flags.DEFINE_string(
            "workdir", None, "Run directory (checkpoints, metrics, tensorboard). Default: "
            "runs/<config file name>, runs/<config file name>-<variants> with a variant "
            "(steps=N left out), e.g. runs/clip-runlocal."),
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0, for multi-process runs "
            "outside TPU pods / SLURM (where JAX finds it itself)."),
        num_processes=flags.DEFINE_integer(
            "num_processes", None, "Processes in a multi-process run."),
        process_id=flags.DEFINE_integer("process_id", None, "This process's index in [0, N)."),
        distributed=flags.DEFINE_enum(
            "distributed", "auto", ["auto", "on", "off"],
            "Call jax.distributed.initialize: 'auto' = when the flags above are given or a "
            "cluster (SLURM with several tasks, a TPU pod) is detected."),
        show_config=flags.DEFINE_boolean(
            "show_config", False, "Print the --config file's variants and every config key "
            "with its value (after the variant and --config.KEY=VALUE overrides) and the "
            "default workdir, then exit without building anything."),
    )


# Variants that leave the default workdir as it is: they set how long a run trains, not what it
# trains, so `:steps=N` continues (or extends) the run of the same config in the same workdir.
WORKDIR_IGNORED_VARIANTS = ("steps",)


def default_workdir(config_arg: str) -> str:
    """Where a command line's run goes without --workdir: `runs/<config file name>` for a
    --config without a variant, else `runs/<name>-<variant>-<variant>...`: each of the
    comma-separated variants but `steps=N` (:data:`WORKDIR_IGNORED_VARIANTS`), sorted, as `key`
    or `key_value` (a path value by its last component), other characters than letters,
    digits, `.`, `_` and `-` as `_`. `configs/clip.py` -> runs/clip; `configs/clip.py:runlocal`
    -> runs/clip-runlocal; `configs/clip.py:siglip,mode=t2t,steps=50` ->
    runs/clip-mode_t2t-siglip; `configs/clip.py:hf=/ckpt/clip-vit-base-patch32` ->
    runs/clip-hf_clip-vit-base-patch32."""
    path, _, variant = config_arg.partition(":")
    parts = sorted({_workdir_part(item) for item in variant.split(",")
                    if item and item.partition("=")[0] not in WORKDIR_IGNORED_VARIANTS})
    return os.path.join("runs", "-".join([os.path.splitext(os.path.basename(path))[0], *parts]))


def _workdir_part(item: str) -> str:
    key, eq, value = item.partition("=")
    if eq:  # a path (hf=/ckpt/model/, teacher=runs/lm) by its last component
        value = os.path.basename(value.rstrip("/\\")) or value
    text = f"{key}_{value}" if eq else key
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


def in_cluster() -> bool:
    """A SLURM job with several tasks, or a TPU pod with several hosts."""
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    tpu_pod = len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return slurm or tpu_pod


def init_distributed(run_flags: RunFlags) -> None:
    """`jax.distributed.initialize` for multi-process runs, per the flags; must precede any
    other JAX call."""
    import jax  # here: --help stays fast

    coordinator, processes = run_flags.coordinator_address.value, run_flags.num_processes.value
    process_id, mode = run_flags.process_id.value, run_flags.distributed.value
    explicit = coordinator is not None or processes is not None
    if mode == "off" or (mode == "auto" and not explicit and not in_cluster()):
        return
    if explicit and None in (coordinator, processes, process_id):
        raise app.UsageError(
            "A multi-process run needs all of --coordinator_address, --num_processes and "
            "--process_id (or none of them on TPU pods / SLURM, where JAX detects them)."
        )
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=processes,
                               process_id=process_id)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process logs
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def failure_exit_code(e: BaseException) -> int | None:
    """The exit code of an exception that ends a run with a message, after logging that
    message alone (no traceback): bad input 2, a failed run 3, a second Ctrl-C 130. None for
    anything else (a bug: let it raise, with its traceback)."""
    from jaxtrain.checkpoint import CheckpointMismatchError, CheckpointSaveError
    from jaxtrain.errors import ConfigError
    from jaxtrain.hooks import NonFiniteError
    from jaxtrain.writers import MetricsWriteError

    if isinstance(e, KeyboardInterrupt):
        logging.error("Interrupted (a second Ctrl-C): stopped without saving a checkpoint; "
                      "re-running the same command resumes from the latest one on disk.")
        return EXIT_INTERRUPTED
    if isinstance(e, ConfigError | CheckpointMismatchError):
        code = EXIT_BAD_INPUT  # the message says what to fix
    elif isinstance(e, NonFiniteError | CheckpointSaveError | MetricsWriteError):
        code = EXIT_RUN_FAILED  # the message says what is on disk
    else:
        return None
    logging.error("%s: %s", type(e).__name__, e)
    return code


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config override (`--config.train.stepz=3`)
    reported as one line and exit 2, instead of a chain of tracebacks."""
    try:
        argv = flags.FLAGS(argv)
    except flags.Error as e:  # absl's own usage errors: its message and --help hint
        sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to "
                         "see help on flags.\n")
        sys.exit(EXIT_BAD_INPUT)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # config_flags overrides
        while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests them
            e = e.args[0]
        message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        unknown = isinstance(e, KeyError)
        message = " ".join(message.split("\n"))
        sys.stderr.write(("Unknown config key " if unknown else "Bad --config value: ")
                         + message + "\n")
        sys.exit(EXIT_BAD_INPUT)
    if "show_config" in flags.FLAGS and flags.FLAGS["show_config"].value:
        if flags.FLAGS["config"].value is None:
            sys.stderr.write("--show_config needs --config=FILE[:VARIANTS].\n")
            sys.exit(EXIT_BAD_INPUT)
        config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
        sys.stdout.write(describe_config(config_arg, flags.FLAGS["config"].value))
        sys.exit(EXIT_OK)
    return argv


def describe_config(config_arg: str, config) -> str:
    """`--show_config`'s text: the config file's docstring (its usage and variants), its
    `VARIANTS`, the default workdir, and every key of `config` with its value, one per line."""
    import importlib.util

    path = config_arg.partition(":")[0]
    spec = importlib.util.spec_from_file_location("_jaxtrain_show_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = [f"--config={config_arg}", f"Default --workdir: {default_workdir(config_arg)}", ""]
    if module.__doc__:
        out += [module.__doc__.strip(), ""]
    if getattr(module, "VARIANTS", None) and "Variants" not in (module.__doc__ or ""):
        out += [f"Variants (after ':', comma-separated): {', '.join(module.VARIANTS)}", ""]
    out.append("Config keys (change one with --config.KEY=VALUE):")
    out += [f"  {key} = {value!r}" for key, value in _flat_items(config)]
    return "\n".join(out) + "\n"


def _flat_items(config, prefix: str = ""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class QuietLibraries(pylogging.Filter):
    """Keep INFO lines from jaxtrain; libraries (Orbax logs every save) only from WARNING up."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "/jaxtrain/" in record.pathname:
            return True
        if record.levelno < pylogging.WARNING:
            return False
        record.exc_info = record.exc_text = None  # a library's line, not its traceback:
        return True  # jaxtrain reports the failure itself, once


class UnretrievedTasks(pylogging.Filter):
    """Drops asyncio's "Task exception was never retrieved": Orbax's background writes left
    behind by a failed save (a full disk), whose error jaxtrain reports itself, once."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


def _quiet_unraisable(hook):
    def quiet(args) -> None:
        # asyncio's "Event loop is closed" from a callback of a read that already failed
        # (Orbax, on a damaged checkpoint): harmless, and not the message to read.
        if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == \
                "Event loop is closed":
            return
        hook(args)

    return quiet


def setup_logging() -> None:
    """absl logging at INFO, with :class:`QuietLibraries` on its logger, the console's short
    line prefix (:class:`jaxtrain.console.ConsoleFormatter`), and known library advisories
    that say nothing about the run dropped (:func:`jaxtrain.console.quiet_known_noise`: JAX's
    "Unable to initialize backend 'tpu'" without a TPU, transformers' "PyTorch was not
    found")."""
    from jaxtrain import console  # no JAX: --help stays fast

    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(QuietLibraries())
    logging.get_absl_handler().setFormatter(console.ConsoleFormatter())
    console.quiet_known_noise()
    pylogging.getLogger("asyncio").addFilter(UnretrievedTasks())
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
