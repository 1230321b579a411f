"""Errors every layer may raise (a leaf module: it imports nothing of jaxtrain)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key has a wrong name, type or value. The message names the key and the fix."""


def brief(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: a long one keeps its
    start and its end, where I/O errors say what failed ("... No space left on device")."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
