"""Task registry: `config.task` names one of these. Add one with :func:`register_task`."""

from __future__ import annotations

from jaxtrain.registry import Registry
from jaxtrain.task import Task

TASKS = Registry("task", "config.task", {
    "clip": "jaxtrain.tasks.clip:ClipTask",
    "lm": "jaxtrain.tasks.lm:LMTask",
    "dpo": "jaxtrain.tasks.dpo:DPOTask",
})


def register_task(cls: type[Task]) -> type[Task]:
    """Make `config.task = cls.name` find `cls` (usable as a class decorator)."""
    return TASKS.register(cls.name, cls)


def get_task(name: str) -> type[Task]:
    return TASKS.get(name)


__all__ = ["TASKS", "Task", "get_task", "register_task"]
