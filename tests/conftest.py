"""Test setup: 8 simulated CPU devices, XLA flags and a compilation cache for speed, offline
Hugging Face with a temp HF cache.

Everything is set through environment variables before JAX is imported, so the processes that
tests start (the CLI, launch/local_multiprocess.sh, fault runs) and pytest-xdist's workers
inherit it.
"""

import atexit
import os
import shutil
import tempfile

import pytest

# Compiling dominates the suite's time on 2 cores, and tests need correct numerics, not fast
# kernels: XLA:CPU optimisation level 0, and the classic elemental emitters instead of the fusion
# emitters (a CLIP train step compiles ~3x faster; results agree to float32 rounding).
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_XLA_FLAGS}")
# launch/local_multiprocess.sh adds these to each process's own device count
os.environ.setdefault("JAXTRAIN_XLA_FLAGS", FAST_XLA_FLAGS)


def session_dir(variable: str) -> None:
    """Point `variable` at a new temp dir unless it is set. The process that makes it (pytest, or
    xdist's controller, which imports this file before it starts the workers) removes it at exit;
    the workers and every process a test starts inherit the variable and share the dir."""
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=f"jaxtrain-{variable.lower()}-")
        atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)


os.environ["HF_HUB_OFFLINE"] = "1"
session_dir("HF_HOME")
session_dir("JAXTRAIN_CACHE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No run report (report.png) after each of the suite's many tiny runs (~0.25-0.9 CPU-s each);
# tests/test_report.py and tests/test_run_end.py turn it back on.
os.environ.setdefault("JAXTRAIN_REPORT", "0")

# JAX's persistent compilation cache for the whole session: a step that another test, another
# xdist worker or a CLI run already compiled (same program, same devices, same flags) is read
# back instead of compiled again. Also within one process: every new Trainer jits a new function,
# which misses JAX's in-memory cache but hits this one. Every executable is kept, however small.
session_dir("JAX_COMPILATION_CACHE_DIR")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 CPU devices: import jax only after conftest"


# Modules whose module-scoped fixture is a training run that several of their tests read. xdist's
# default `--dist load` hands a module's tests to both workers, and each would make the run.
SHARED_RUN_MODULES = ("tests/test_clip_task.py", "tests/test_dpo_task.py", "tests/test_export.py",
                      "tests/test_lora.py", "tests/test_generation_eval.py",
                      "tests/test_generate_cli.py", "tests/test_faults.py")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """(pytest-xdist, `pytest -n 2`) Tests go to the workers one by one as with `--dist load`,
    except that each of SHARED_RUN_MODULES goes whole to one worker (first: xdist starts the
    scopes with the most tests first). (`--dist loadgroup` would do this with a mark, but it
    cannot tag test ids under pytest 9.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_RUN_MODULES else nodeid

    return SharedRunScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with `slow` tests (end-to-end runs in their own processes) first, each module's
    tests kept together: started early, they do not keep one worker busy at the end."""

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: module(item) not in slow)
