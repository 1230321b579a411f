"""Hugging Face Hub ids where jaxtrain takes a model or tokenizer directory.

``init_from``, ``distill.teacher``, DPO's reference (its ``init_from``) and ``data.tokenizer``
take a local directory; :func:`resolve` lets them take a Hub id (``openai/clip-vit-base-patch32``)
too, turning it into the local snapshot directory of ``huggingface_hub``'s cache:

    resolve("runs/clip", "init_from")                      # a local path: returned as it is
    resolve("openai/clip-vit-base-patch32", "init_from")   # ~/.cache/huggingface/hub/models--
                                                           #   openai--clip-vit-base-patch32/
                                                           #   snapshots/<revision>

A name is a Hub id when nothing exists at that path, it is not written as a path (no leading
``/``, ``./``, ``~``; at most one ``/``; a ``<dir>/`` prefix that is not a local directory) and it
has the Hub's form, ``[owner/]name`` of letters, digits, ``-``, ``_`` and ``.``. Online, the files
are downloaded (or refreshed) with ``huggingface_hub.snapshot_download``; with
``HF_HUB_OFFLINE=1`` only the cache is read (``local_files_only``), and a model that is not in
it is a :class:`~jaxtrain.errors.ConfigError` that says so and how to download it.
"""

from __future__ import annotations

import os
import re

from jaxtrain.errors import ConfigError
from jaxtrain.tokenizer_files import TOKENIZER_FILES, hub_offline, looks_like_path

# What a snapshot of a model needs: configs, safetensors weights, tokenizer and chat template
# files (not the PyTorch .bin, TF .h5, Flax .msgpack or ONNX copies of the same weights).
MODEL_FILES: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
TOKENIZER_PATTERNS: tuple[str, ...] = (*TOKENIZER_FILES, "special_tokens_map.json",
                                       "added_tokens.json", "config.json", "*.jinja")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is read as a Hugging Face Hub id rather than a local path (see the
    module's docstring)."""
    return (bool(name) and not os.path.exists(os.path.expanduser(name))
            and not looks_like_path(name) and bool(_HUB_ID.match(name))
            and ".." not in name and not name.endswith((".git", ".")))


def download_hint(repo_id: str) -> str:
    """The commands that put ``repo_id`` into the cache."""
    return (f"download it first with `hf download {repo_id}` (or `huggingface-cli download "
            f"{repo_id}`) on a machine with network access and the same HF_HOME, or unset "
            "HF_HUB_OFFLINE so that jaxtrain downloads it")


def resolve(path_or_id: str, what: str, *, local: str = "a local directory",
            not_local: str = "not a local path",
            allow_patterns: tuple[str, ...] = MODEL_FILES) -> str:
    """The local directory of ``path_or_id``: the path itself when it is one (or not a Hub id:
    the caller reports a missing path), else the Hub snapshot directory of the id.

    ``what`` names the config key that gave it (``init_from``, ``distill.teacher``,
    ``data.tokenizer``), ``local`` what a local path there should be and ``not_local`` how the
    message says the name is none (``"neither the built-in 'gpt2' nor a local directory"``).
    ``allow_patterns``: the files a download fetches (the cache is read whole). Raises
    ConfigError when the id is not in the cache under ``HF_HUB_OFFLINE=1``, or cannot be
    downloaded."""
    if not is_hub_id(path_or_id):
        return path_or_id
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    offline = hub_offline()
    neither = (f"{what} {path_or_id!r} is {not_local} (nothing at "
               f"{os.path.abspath(path_or_id)}), and as a Hugging Face Hub id it is not")
    or_local = f"If it is meant as {local}, check the path."
    try:
        return huggingface_hub.snapshot_download(
            path_or_id, local_files_only=offline,
            allow_patterns=None if offline else list(allow_patterns))
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as e:
        if offline or isinstance(e, hub_errors.OfflineModeIsEnabled):
            raise ConfigError(
                f"{neither} in the Hub cache ({cache_dir()}) while HF_HUB_OFFLINE=1 forbids "
                f"downloads. If it is a Hub model, {download_hint(path_or_id)}. {or_local}"
            ) from None
        raise ConfigError(
            f"{neither} downloadable or in the Hub cache ({cache_dir()}): {e}. If it is a Hub "
            f"model, check the network, or {download_hint(path_or_id)}. {or_local}") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError,
            hub_errors.GatedRepoError, hub_errors.HfHubHTTPError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"{neither} a model the Hub lets you download ({type(e).__name__}: {first}). "
            f"{or_local} A gated Hub model needs `hf auth login` first.") from None


def cache_dir() -> str:
    """The Hub cache folder ``huggingface_hub`` reads (``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
