"""Text in and out of the decoder: prompts to token ids, generated ids to completion text.

A prompt is a string or a conversation (``[{"role", "content"}, ...]``). A conversation, or a
string with ``chat=True`` (one user turn), goes through the tokenizer's chat template with the
generation prompt added, exactly as SFT rendered its rows
(:func:`jaxtrain.data.chat.chat_prompt`: the tokenizer's own template, ChatML when it has
none), and is tokenized without added special tokens (the template writes them). A plain
string is tokenized as the model was trained: a jaxtrain run's text without special tokens
(as :mod:`jaxtrain.data.text`), a Hugging Face model's with the tokenizer's defaults (its bos).

Generation stops at the tokenizer's eos and, for chat, at the end of the assistant's turn: the
template's terminator (:func:`end_of_turn`: ``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama
3), a stop token id when it is one token. When it is several ordinary tokens (ChatML written
as text with the GPT-2 tokenizer, where ``.<`` may even merge with the answer's last
character), no stop id can catch it: the completion text is cut where the terminator first
appears (:func:`completion_text`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtrain.data.chat import chat_prompt, chat_template_of

Prompt = str | Sequence[Mapping[str, str]]

# Stands in for an assistant message's content to find the turn's terminator.
_CONTENT = "\ue000jaxtrain-generate\ue001"


def end_of_turn(tokenizer: Any) -> str:
    """What the chat template writes after an assistant message's content (trailing whitespace
    not included): ``<|im_end|>`` for ChatML; "" when it writes nothing."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _CONTENT}]
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer),
                                         tokenize=False)
    start = text.find(_CONTENT)
    if start < 0:
        return ""
    return text[start + len(_CONTENT):].rstrip()


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer encodes it as exactly one token, else None."""
    if not text:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How prompts become ids and generated ids become text, for one tokenizer.

    ``chat``: plain string prompts are one user turn of a chat; ``add_special_tokens``: plain
    (non-chat) prompts get the tokenizer's special tokens (a Hugging Face model's bos)."""

    tokenizer: Any
    chat: bool = False
    add_special_tokens: bool = False

    @functools.cached_property
    def turn_end(self) -> str:
        """The chat template's end of an assistant turn (:func:`end_of_turn`)."""
        return end_of_turn(self.tokenizer)

    @functools.cached_property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return () if eos is None else (int(eos),)

    @functools.cached_property
    def turn_end_ids(self) -> tuple[int, ...]:
        """The end-of-turn token, when the chat template writes it as one token (a stop id of
        chat prompts)."""
        eot = single_token_id(self.tokenizer, self.turn_end)
        return () if eot is None or eot in self.eos_ids else (eot,)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad or 0)

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        """Token ids that end a completion: eos, and for chat the end-of-turn token."""
        return self.eos_ids + (self.turn_end_ids if chat else ())

    def is_chat(self, prompt: Prompt) -> bool:
        return not isinstance(prompt, str) or self.chat

    def render(self, prompt: Prompt) -> str:
        """The text the model is given: a conversation (or, with ``chat``, a string as one user
        turn) rendered with the chat template and the assistant header; else the string."""
        if isinstance(prompt, str) and not self.chat:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            [dict(m) for m in prompt]
        if not messages:
            raise ValueError("The conversation has no messages.")
        if messages[-1].get("role") == "assistant":
            raise ValueError("The conversation ends with an assistant message: a prompt ends "
                             "with the turn to answer (a user message).")
        return chat_prompt(messages, self.tokenizer)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of :meth:`render` (module docstring: which special tokens)."""
        special = self.add_special_tokens and not self.is_chat(prompt)
        return [int(i) for i in
                self.tokenizer(self.render(prompt), add_special_tokens=special)["input_ids"]]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def completion_text(self, tokens: Sequence[int], *, chat: bool | None = None
                        ) -> tuple[str, int, bool]:
        """(text, output tokens, stopped) of generated `tokens`: decoded up to a stop token
        (eos / end of turn, not part of the text) or, for chat, up to the first end-of-turn
        marker; a chat answer is stripped of surrounding whitespace. ``output tokens`` counts
        the tokens generated up to and including the stop token or the token that completes
        the marker, nothing after; ``stopped``: a stop token or the marker was found.
        `chat` (default: the format's) says whether the tokens answer a chat prompt."""
        chat = self.chat if chat is None else chat
        stops = set(self.stop_ids(chat))
        tokens = [int(t) for t in tokens]
        end = next((i for i, t in enumerate(tokens) if t in stops), None)
        if end is not None:
            text, count, stopped = self.decode(tokens[:end]), end + 1, True
        else:
            text, count, stopped = self.decode(tokens), len(tokens), False
        marker = self.turn_end if chat else ""
        cut = text.find(marker) if marker else -1
        if cut >= 0:
            text, stopped = text[:cut], True
            count = next(k for k in range(1, count + 1)
                         if marker in self.decode(tokens[:k]))
        return (text.strip() if chat else text), count, stopped
