"""The run's tokenizer in a Hugging Face export: what makes the folder load with
``AutoTokenizer.from_pretrained(dir)`` beside ``AutoModelForCausalLM.from_pretrained(dir)`` and
chat as it was trained.

A model family whose ``save_hf`` writes the tokenizer itself (it takes ``tokenizer``: CLIP) is
left alone. For the others (the causal language models) :func:`save_tokenizer` writes the run's
``data.tokenizer`` (the built-in GPT-2 BPE or a ``save_pretrained`` directory) with
``save_pretrained``, and

* for a run trained on conversations (``data.kind='chat'``, or preference pairs: a ``dpo``
  section), the chat template it was trained with: the tokenizer's own, else ChatML
  (:func:`jaxtrain.data.chat.chat_template_of`), so ``apply_chat_template`` renders exactly
  the training text;
* in config.json, the tokenizer's ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` where
  the converter wrote none, so ``generate()`` stops at eos and pads with the pad id.

The written tokenizer is checked by reloading it and encoding a probe text (and, with a chat
template, a conversation) with both: the ids must be equal."""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from jaxtrain.export.checks import ExportVerificationError
from jaxtrain.models.registry import ModelFamily
from jaxtrain.tasks import Task

PROBE_TEXT = "The quick brown fox: 12 + 30 = 42. Ünïcödé, tabs\tand\nnew lines."
PROBE_CHAT = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "What is 2 + 3?"},
              {"role": "assistant", "content": "5"},
              {"role": "user", "content": "And 4 + 4?"}]
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def trained_on_chat(config: Mapping[str, Any]) -> bool:
    """Whether the run's text was rendered with a chat template: chat SFT (``data.kind ==
    'chat'``) or preference optimisation (a ``dpo`` section)."""
    data = config.get("data") or {}
    return data.get("kind") == "chat" or "dpo" in config


def run_tokenizer(task: Task) -> Any | None:
    """The Hugging Face tokenizer the task's text was encoded with, or None: a task without
    one, a run on synthetic tokens (``data.kind == 'synthetic'``: no text), one whose
    tokenizer is not a Hugging Face one (CLIP's built-in caption vocabulary), or one that does
    not load or fit the model (logged)."""
    if (task.config.get("data") or {}).get("kind") == "synthetic":
        return None
    try:
        tok = getattr(task, "tokenizer", None)
    except (ValueError, OSError) as e:  # e.g. a vocabulary larger than model.vocab_size
        logging.warning("No tokenizer in the Hugging Face export: the run's tokenizer does not "
                        "load or fit its model (%s).", e)
        return None
    tok = getattr(tok, "hf", tok)  # TextTokenizer -> its Hugging Face tokenizer
    return tok if hasattr(tok, "save_pretrained") else None


def _check(path: str, tok: Any, chat: bool) -> dict[str, Any]:
    """Reload the written tokenizer; its ids for the probes must equal the run's."""
    import transformers

    loaded = transformers.AutoTokenizer.from_pretrained(path)
    got, want = loaded(PROBE_TEXT)["input_ids"], tok(PROBE_TEXT)["input_ids"]
    if list(got) != list(want) or len(loaded) != len(tok):
        raise ExportVerificationError(
            f"format 'hf': the tokenizer written to {path} does not reload as the run's "
            f"({len(loaded)} vs {len(tok)} ids; probe ids {list(got)[:8]}... vs "
            f"{list(want)[:8]}...).")
    out: dict[str, Any] = {"tokenizer": type(loaded).__name__, "vocab": len(loaded)}
    if chat:
        rendered = loaded.apply_chat_template(PROBE_CHAT, tokenize=False,
                                              add_generation_prompt=True)
        ours = tok.apply_chat_template(PROBE_CHAT, chat_template=tok.chat_template,
                                       tokenize=False, add_generation_prompt=True)
        if rendered != ours:
            raise ExportVerificationError(
                f"format 'hf': the chat template written to {path} renders {rendered!r:.80}, "
                f"the run's {ours!r:.80}.")
        out["chat_template"] = True
    return out


def _token_ids_into_config(path: str, tok: Any) -> None:
    """config.json gets the tokenizer's special ids it lacks (generate() reads them there)."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    added = {k: getattr(tok, k) for k in TOKEN_IDS
             if config.get(k) is None and getattr(tok, k, None) is not None}
    if added:
        config.update(added)
        with open(file, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def save_tokenizer(path: str, family: ModelFamily, task: Task) -> dict[str, Any] | None:
    """Write the run's tokenizer (and chat template) into the Hugging Face directory `path`
    (module docstring), checked; returns what was written for export.json, or None when the
    family writes its own (its ``save_hf`` takes ``tokenizer``) or the run has none."""
    if "tokenizer" in inspect.signature(family.hf().save_hf).parameters:
        return None
    tok = run_tokenizer(task)
    if tok is None:
        return None
    from jaxtrain.data.chat import chat_template_of

    tok = copy.deepcopy(tok)  # the built-in GPT-2 tokenizer is shared: never mutate it
    chat = trained_on_chat(task.config)
    if chat:
        tok.chat_template = chat_template_of(tok)
    tok.save_pretrained(path)
    _token_ids_into_config(path, tok)
    return _check(path, tok, chat)
