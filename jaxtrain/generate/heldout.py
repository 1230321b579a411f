"""Held-out (prompt, reference) pairs for generation-based evaluation, from each kind of
language-model data (the tasks' ``heldout_prompts`` build them from their held-out split):

- chat (:func:`chat_prompts`): a conversation up to its last assistant turn, rendered with the
  chat template SFT used and the assistant header (:func:`jaxtrain.data.chat.chat_prompt`);
  the reference is that turn's content;
- preference pairs (:func:`preference_prompts`): the prompt rendered the same way, the
  reference the chosen answer;
- plain text (:func:`text_prompts`): consecutive windows of each document's tokens: the first
  ``prompt_tokens`` of a window are the prompt, the next ``continuation_tokens`` (decoded) its
  reference.

Prompt ids are the rendered text tokenized without added special tokens, as the training rows
were (:mod:`jaxtrain.data.chat`, :mod:`jaxtrain.data.preference`, :mod:`jaxtrain.data.text`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging

from jaxtrain.data.chat import chat_prompt, to_messages
from jaxtrain.data.preference import to_preference


@dataclasses.dataclass(frozen=True)
class HeldoutPrompt:
    """One evaluation example: what the model is given and the text it should produce."""

    prompt: str  # the prompt's text (rendered chat, or the text prefix), for samples
    prompt_ids: tuple[int, ...]  # the prompt's token ids: what the model is given
    reference: str  # the expected completion
    chat: bool  # the prompt ends with an assistant header: the answer ends at its turn's end


def _ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


def _log_left_out(what: str, left_out: int, limit: int) -> None:
    if left_out:
        logging.warning("Generation eval: %d %s left out: their prompt has more than %d tokens "
                        "(the model's context less room for an answer).", left_out, what, limit)


def chat_prompts(examples: Iterable[Mapping[str, Any]], tokenizer: Any, *,
                 max_prompt_tokens: int, max_examples: int = 0,
                 text_fields: Sequence[str] | None = None) -> list[HeldoutPrompt]:
    """Each conversation before its last assistant turn (the prompt) and that turn's content
    (the reference); at most `max_examples` (0 = all). A prompt of more than
    `max_prompt_tokens` tokens is left out (counted in a warning)."""
    out, left_out = [], 0
    for example in examples:
        if max_examples and len(out) >= max_examples:
            break
        messages = to_messages(example, text_fields=text_fields)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = chat_prompt(messages[:last], tokenizer)
        ids = _ids(tokenizer, text)
        if len(ids) > max_prompt_tokens:
            left_out += 1
            continue
        out.append(HeldoutPrompt(text, tuple(ids), messages[last]["content"], chat=True))
    _log_left_out("conversations", left_out, max_prompt_tokens)
    return out


def preference_prompts(examples: Iterable[Mapping[str, Any]], tokenizer: Any, *,
                       max_prompt_tokens: int, max_examples: int = 0) -> list[HeldoutPrompt]:
    """Each pair's prompt (rendered with the generation prompt) and its chosen answer (the
    reference); a prompt of more than `max_prompt_tokens` tokens keeps its last ones, as DPO
    training does (``data.max_prompt_length``)."""
    out = []
    for index, example in enumerate(examples):
        if max_examples and len(out) >= max_examples:
            break
        pair = to_preference(example, index)
        text = chat_prompt(pair["prompt"], tokenizer)
        ids = _ids(tokenizer, text)
        if len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
            text = _text(tokenizer, ids)
        out.append(HeldoutPrompt(text, tuple(ids), pair["chosen"], chat=True))
    return out


def text_prompts(documents: Iterable[str], tokenizer: Any, *, prompt_tokens: int,
                 continuation_tokens: int, max_examples: int = 0) -> list[HeldoutPrompt]:
    """Windows of ``prompt_tokens + continuation_tokens`` consecutive tokens of each document,
    in order (a document's tail shorter than a window is not used): the first `prompt_tokens`
    are the prompt, the rest decoded is the reference. At most `max_examples` (0 = all)."""
    if prompt_tokens < 1 or continuation_tokens < 1:
        raise ValueError(f"prompt_tokens ({prompt_tokens}) and continuation_tokens "
                         f"({continuation_tokens}) must be >= 1.")
    window = prompt_tokens + continuation_tokens
    out = []
    for document in documents:
        ids = _ids(tokenizer, document)
        for start in range(0, len(ids) - window + 1, window):
            if max_examples and len(out) >= max_examples:
                return out
            prompt = ids[start:start + prompt_tokens]
            reference = ids[start + prompt_tokens:start + window]
            out.append(HeldoutPrompt(_text(tokenizer, prompt), tuple(prompt),
                                     _text(tokenizer, reference), chat=False))
    return out
