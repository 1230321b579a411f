"""Name -> implementation tables (tasks, models, evaluators), filled by registration.

A leaf module: it imports nothing of jaxtrain but the errors. Built-in entries may be given as
``"package.module:attr"`` strings, imported on first use, so that looking up one task does not
import every other one (and so the engine never imports a task, model or data module).

    TASKS = Registry("task", "config.task", {"clip": "jaxtrain.tasks.clip:ClipTask"})
    TASKS.register("mine", MyTask)
    TASKS.get("clip")          # -> ClipTask;  TASKS.get("clp") -> ConfigError, "did you mean"
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any

from jaxtrain.errors import ConfigError


class Registry:
    """A named table of implementations of one kind."""

    def __init__(self, kind: str, key: str, builtins: dict[str, Any] | None = None):
        self.kind = kind  # "task", "model", "evaluator": for messages
        self.key = key  # the config key that names an entry, e.g. "config.task"
        self._entries: dict[str, Any] = dict(builtins or {})

    def register(self, name: str, entry: Any) -> Any:
        """Make `name` find `entry` (an object, or a "module:attr" string). Returns `entry`."""
        if not name:
            raise ValueError(f"A {self.kind} needs a non-empty name to be registered.")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Any:
        """The entry registered as `name`; a ConfigError naming the close ones if none is."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"Unknown {self.key} {name!r}.{hint} Registered {self.kind}s: "
                f"{sorted(self._entries)} (add one with jaxtrain's register_{self.kind}).")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
