"""Errors every layer may raise (a leaf module: it imports nothing of jaxtrain)."""

from __future__ import annotations

import errno
import os
import re


class ConfigError(ValueError):
    """A config key has a wrong name, type or value. The message names the key and the fix."""


def brief(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: a long one keeps its
    start and its end, where I/O errors say what failed ("... No space left on device")."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    # tensorstore (Orbax) reports an OS error by its number at the end of a long message whose
    # middle (where the reason may be) is cut below: name it after the cut ("[os_error_code=
    # '28']" -> "(No space left on device)")
    code = re.search(r"os_error_code='?(\d+)", str(error))
    reason = os.strerror(int(code.group(1))) if code and errno.errorcode.get(
        int(code.group(1))) else ""
    cut = _cut(text, limit)
    if reason in cut:  # (always true without a reason)
        return cut
    return _cut(text, limit - len(reason) - 3) + f" ({reason})"


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` characters: its start and its end around " ... "."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
