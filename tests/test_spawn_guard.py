"""Spawn safety: a script without `if __name__ == "__main__":` that starts grain workers gets a
clear error at once (not a hang); the guarded script works."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from jaxtrain.data import spawn

ROOT = Path(__file__).resolve().parents[1]

BODY = """
import numpy as np
from jaxtrain.data import pipeline

def first_batch():
    rows = [{"x": np.full(3, i)} for i in range(16)]
    it = pipeline.train_iterator(rows, batch_size=4, seed=0, workers=1)
    print("batch", sorted(next(it)["x"][:, 0].tolist()), flush=True)
    it.close()
"""


def _run(tmp_path, script, timeout=120):
    path = tmp_path / "user_script.py"
    path.write_text(textwrap.dedent(BODY) + textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


def test_unguarded_script_errors_clearly_without_starting_workers(tmp_path):
    result = _run(tmp_path, "first_batch()\n", timeout=60)  # a hang fails by TimeoutExpired
    assert result.returncode != 0
    assert "SpawnSafetyError" in result.stderr
    assert "user_script.py', whose line 10" in result.stderr
    assert 'if __name__ == "__main__":' in result.stderr and "data.workers=0" in result.stderr
    assert "Worker process was terminated" not in result.stderr


def test_guarded_script_runs_the_workers(tmp_path):
    result = _run(tmp_path, 'if __name__ == "__main__":\n    first_batch()\n')
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("batch [")


def test_guard_detection_reads_the_main_file(tmp_path):
    source = textwrap.dedent("""
        import x
        x.train()
        if "__main__" == __name__:
            x.train()
            def f():
                pass
        if __name__ != "__main__":
            x.train()
    """)
    path = tmp_path / "s.py"
    path.write_text(source)
    assert spawn._guarded_lines(str(path), 0.0) == ((5, 7),)
    (tmp_path / "bad.py").write_text("if (:\n")
    assert spawn._guarded_lines(str(tmp_path / "bad.py"), 0.0) is None


def test_calls_not_from_the_main_scripts_top_level_are_safe():
    # Under pytest the stack holds no top-level frame of __main__ that trains.
    assert spawn.unguarded_call_site() is None
    spawn.check_spawn_safe()
