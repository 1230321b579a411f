"""The one Hugging Face tokenizer loader: a directory written by ``save_pretrained``, or a hub name.

A leaf module (it imports nothing of jaxtrain), so that the data layer (the LM, chat and pairs
tokenizers, :mod:`jaxtrain.data.tokenizers`) and the checkpoint converters
(:mod:`jaxtrain.hf.clip`) load tokenizers the same way without importing each other.
``transformers`` is imported on the first load.

    tok = load_pretrained_tokenizer("/ckpt/clip-vit-base-patch32")   # a local directory
    tok = load_pretrained_tokenizer("openai/clip-vit-base-patch32")  # the hub (or its cache)
"""

from __future__ import annotations

import os
from typing import Any

# Files one of which a tokenizer directory holds (fast tokenizer, config, BPE / sentencepiece /
# WordPiece vocabularies).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "vocab.txt",
)


class TokenizerNotFoundError(FileNotFoundError, ValueError):
    """No tokenizer where one was named: a missing directory, or one without tokenizer files.

    Both a FileNotFoundError (a file is missing) and a ValueError (the configured name is wrong).
    """


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads from the Hugging Face hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``owner/name``)."""
    if name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name:
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def has_tokenizer_files(path: str | os.PathLike[str]) -> bool:
    """Whether the directory ``path`` holds any of :data:`TOKENIZER_FILES`."""
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_pretrained_tokenizer(name: str | os.PathLike[str], *, builtin: str | None = None) -> Any:
    """``transformers.AutoTokenizer.from_pretrained`` of a local directory or a hub name.

    Errors say what was wrong and what to do: a directory without tokenizer files, or a path
    that does not exist (:class:`TokenizerNotFoundError`); a directory that does not load, or a
    hub name that cannot be downloaded (``ValueError``, naming ``HF_HUB_OFFLINE`` when it is
    set). ``builtin`` names the caller's built-in tokenizer, offered in the messages.
    """
    import transformers

    name = os.fspath(name)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not has_tokenizer_files(path):
            raise TokenizerNotFoundError(
                f"There are no tokenizer files in {path} (looked for "
                f"{', '.join(TOKENIZER_FILES)}): save one there with "
                "`tokenizer.save_pretrained(directory)` (or jaxtrain.hf.clip.save_hf(..., "
                "tokenizer=tokenizer)), or name another tokenizer."
            )
        try:
            return transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"The tokenizer directory {name!r} could not be loaded ({type(e).__name__}: {e}); "
                "write it with `tokenizer.save_pretrained(directory)`."
            ) from e
    alternative = f"the built-in {builtin!r}, " if builtin else ""
    if looks_like_path(name):
        raise TokenizerNotFoundError(
            f"The tokenizer {name!r} looks like a local path but there is no such directory: "
            f"use {alternative}a directory written by `save_pretrained`, or a hub name "
            "(owner/name)."
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "it could not be downloaded"
        what = f"neither the built-in {builtin!r} nor a local directory" if builtin else (
            "not a local directory")
        raise ValueError(
            f"Could not load the tokenizer {name!r}: it is {what}, and as a Hugging Face hub "
            f"name {why} ({type(e).__name__}: {e}). Use {alternative}a directory written by "
            "`save_pretrained`, or download it first (unset HF_HUB_OFFLINE and run once with "
            "network access)."
        ) from e
