"""Task registry: `config.task` names one of these (or pass a Task subclass to Trainer)."""

from __future__ import annotations

import difflib
import importlib

from jaxtrain.config import ConfigError
from jaxtrain.tasks.base import Task

_TASKS: dict[str, str | type[Task]] = {
    "clip": "jaxtrain.tasks.clip:ClipTask",
    "lm": "jaxtrain.tasks.lm:LMTask",
    "dpo": "jaxtrain.tasks.dpo:DPOTask",
}


def register_task(cls: type[Task]) -> type[Task]:
    """Make `config.task = cls.name` find `cls` (usable as a class decorator)."""
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"Unknown config.task {name!r}.{hint} Registered tasks: {sorted(_TASKS)}."
        )
    entry = _TASKS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


__all__ = ["Task", "get_task", "register_task"]
