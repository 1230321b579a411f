"""Files written with the usual permissions: safetensors' writer creates its files mode 0600
(owner only), unlike every other file of a run or export (0666 less the umask, 0644 with the
usual umask 022). A leaf module: it imports nothing of jaxtrain."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: str | os.PathLike[str]) -> None:
    """Give the file `path` the mode `open()` would have: 0o666 & ~umask."""
    os.chmod(path, 0o666 & ~umask())


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file(tensors, path, metadata)``, the file then given the
    usual mode (:func:`usual_mode`) instead of safetensors' 0600."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), os.fspath(path), metadata=dict(metadata) if metadata else None)
    usual_mode(path)
