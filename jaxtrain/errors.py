"""Errors every layer may raise (a leaf module: it imports nothing of jaxtrain)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key has a wrong name, type or value. The message names the key and the fix."""
