"""The data source of rows passed in code (``jaxtrain.train(..., train_data=...)``), by name.

:func:`jaxtrain.data.in_memory.bind` registers an :class:`InMemorySource` under a name like
``'<in-memory>'`` and writes that name into the config's data keys; :func:`lookup` (called by
:func:`jaxtrain.data.sources.open_source`) gives it back. The registry holds sources weakly: an
entry lasts while something (the trainer, its tasks) references the source, so a finished run's
data is freed with it. A name whose source is gone (another process read the workdir's config)
is a ConfigError saying to pass the data again.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any

from jaxtrain.errors import ConfigError

PREFIX = "<in-memory"


@dataclasses.dataclass(eq=False)
class InMemorySource:
    """A :class:`jaxtrain.data.sources.Source` over examples held in memory: ``splits`` maps a
    split name to its examples (a ``datasets.Dataset`` or a list of dicts); undivided (its one
    split is ``"train"``) like a file, or divided. Relative image paths resolve against
    ``base_dir`` (the working directory when it was made). Not streamable."""

    name: str
    splits: dict[str, Any]
    divided: bool
    base_dir: str | None = None

    def read(self, split: str) -> Any:
        return self.splits.get(split)

    def describe_splits(self) -> str:
        return f"the in-memory data {self.name!r} has the splits {list(self.splits)}"


# name -> source, while something else holds the source
_REGISTRY: weakref.WeakValueDictionary[str, InMemorySource] = weakref.WeakValueDictionary()


def is_in_memory_name(name: Any) -> bool:
    """Whether a data source name is one :func:`register` gives (``'<in-memory>'``, ...)."""
    return isinstance(name, str) and name.startswith(PREFIX) and name.endswith(">")


def register(splits: dict[str, Any], divided: bool) -> InMemorySource:
    """A new source of ``splits`` under a free name (``'<in-memory>'``, ``'<in-memory 2>'``,
    ...); keep a reference to it while the run reads data."""
    name, k = f"{PREFIX}>", 1
    while name in _REGISTRY:
        k += 1
        name = f"{PREFIX} {k}>"
    source = InMemorySource(name, splits, divided, base_dir=os.getcwd())
    _REGISTRY[name] = source
    return source


def lookup(name: str) -> InMemorySource | None:
    """The registered source ``name``; None for a name that is not in-memory; a ConfigError
    for an in-memory name whose data is gone (another process, or a trainer that is gone)."""
    if not is_in_memory_name(name):
        return None
    source = _REGISTRY.get(name)
    if source is None:
        raise ConfigError(
            f"The data source {name!r} is in-memory data passed to jaxtrain.train / "
            "jaxtrain.Trainer (train_data=, eval_data=) in another process or by a trainer that "
            "is gone: it cannot be read here. Pass the data again (jaxtrain.train(config, "
            "workdir, train_data=...)), or set data.source / data.name to a file.")
    return source
