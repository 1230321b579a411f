"""Spawn safety: refuse to start worker processes from a script that would start them again.

grain's worker processes (``data.workers > 0``) are *spawned*: each starts a fresh Python that
imports the user's main module (as ``__mp_main__``) to find the functions it runs. A script
that calls ``jaxtrain.train()`` at its top level, outside ``if __name__ == "__main__":``, runs
that call again in every worker: the workers fail at import ("An attempt has been made to start a
new process before the current process has finished its bootstrapping phase") and the parent
waits on them, or stops with an error that does not say why.

:func:`check_spawn_safe` finds this before any worker starts: it walks the call stack to the
main module's top-level frame (``<module>`` code whose globals are ``sys.modules["__main__"]``)
and parses the main file (``ast``) to see whether the calling line lies inside an
``if __name__ == "__main__":`` block. Calls from a guarded block, from an interactive session,
``python -c``, a notebook, or any main module without a file are safe (spawned children do not
re-run them).
"""

from __future__ import annotations

import ast
import functools
import os
import sys
from types import FrameType


class SpawnSafetyError(RuntimeError):
    """Worker processes would re-run the caller's unguarded main script."""


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either order)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(mains) == 1


@functools.lru_cache(maxsize=8)
def _guarded_lines(path: str, mtime: float) -> tuple[tuple[int, int], ...] | None:
    """(first, last) line ranges of the ``if __name__ == "__main__":`` bodies of ``path``; None
    when the file cannot be parsed (then nothing is claimed)."""
    del mtime  # part of the cache key only
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    return tuple((node.body[0].lineno, node.end_lineno or node.lineno)
                 for node in ast.walk(tree)
                 if isinstance(node, ast.If) and _is_main_guard(node.test))


def _main_top_level_frame(frame: FrameType | None) -> FrameType | None:
    """The frame of the main module's top-level code on the stack above ``frame``, if any."""
    main = sys.modules.get("__main__")
    main_globals = getattr(main, "__dict__", None)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is main_globals:
            return frame
        frame = frame.f_back
    return None


def unguarded_call_site(frame: FrameType | None = None) -> tuple[str, int] | None:
    """(file, line) of the main script's top-level line that (indirectly) made this call when it
    is outside ``if __name__ == "__main__":``; None when spawned workers will not re-run it."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return None  # interactive, python -c, a notebook: children do not re-run it
    top = _main_top_level_frame(frame if frame is not None else sys._getframe(1))
    if top is None:
        return None
    guarded = _guarded_lines(os.path.abspath(path), os.path.getmtime(path))
    if guarded is None:
        return None
    line = top.f_lineno
    if any(first <= line <= last for first, last in guarded):
        return None
    return path, line


def check_spawn_safe(what: str = "data.workers > 0") -> None:
    """Raise :class:`SpawnSafetyError` when worker processes spawned now would re-run the main
    script's unguarded top-level code (module docstring); ``what`` names the setting that
    starts them, for the message."""
    site = unguarded_call_site(sys._getframe(1))
    if site is None:
        return
    path, line = site
    raise SpawnSafetyError(
        f"{what} starts worker processes, and each re-imports your script {path!r}, whose "
        f"line {line} starts training at import time (it is not under "
        "`if __name__ == \"__main__\":`): the workers would run it again and fail. Put the "
        "top-level code that trains under `if __name__ == \"__main__\":` (e.g. `def main(): "
        "...` then `if __name__ == \"__main__\": main()`), or set data.workers=0."
    )
