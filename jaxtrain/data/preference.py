"""Preference pairs (prompt, chosen response, rejected response) for DPO-style training.

Pipeline: a dataset row → :func:`to_preference` (prompt messages and the two assistant
replies) → :func:`render_preference` (prompt text and the two response texts, through the chat
template) → :func:`preference_rows` (token arrays for both sides, the loss mask on the response
tokens).

Row formats
-----------
- ``prompt`` + ``chosen`` + ``rejected``: the prompt is a string (one user turn) or a chat
  ``messages`` list ``[{"role", "content"}, ...]``; each response is a string (the assistant's
  reply), a one-message list ``[{"role": "assistant", "content": ...}]`` (TRL's conversational
  format), or a full conversation whose turns before its last, assistant, message are the
  prompt's (as in ``HuggingFaceH4/ultrafeedback_binarized``);
- no ``prompt``: ``chosen`` and ``rejected`` are full conversations that differ only in their
  last, assistant, message; the shared turns before it are the prompt (like TRL's
  ``extract_prompt``).

Optional ``ref_chosen_logps`` / ``ref_rejected_logps`` (numbers: the reference model's summed
log-probs of the responses, precomputed) pass through when every row has both. A missing
field, a value of the wrong type or an empty response raises ValueError naming the row index,
the field, the row's keys and these formats.

Rendering and tokens
--------------------
The prompt text is the chat template (the tokenizer's own, else ChatML:
:func:`jaxtrain.data.chat.chat_template_of`) applied to the prompt messages with the generation
prompt (the assistant header). A response's text is the rendering of ``prompt + [assistant
reply]``, trailing whitespace removed, minus the prompt text, which must be its prefix: the
reply's content and the turn terminator (``<|im_end|>`` in ChatML), as in the SFT loss mask of
:mod:`jaxtrain.data.chat`. Nothing else is added (no bos/eos beyond what the template writes).

A response's tokens are those of ``prompt text + response text`` after the prompt's tokens, so
the response is tokenized in context as in SFT and generation (when the joint tokenization does
not start with the prompt's tokens, e.g. a BPE merge across the boundary, the response text is
tokenized on its own instead).

Truncation (TRL's defaults): a prompt longer than ``max_prompt_length`` tokens keeps its last
``max_prompt_length`` tokens; then a response keeps its first ``max_length + 1 − len(prompt)``
tokens. A pair where a response is left empty is dropped (only possible when
``max_prompt_length > max_length``); truncations and drops are counted in the log.

Arrays
------
For each side s in (chosen, rejected) and sequence ``ids = prompt ids + response ids`` (at most
``max_length + 1`` tokens): ``s_inputs = ids[:-1]``, ``s_targets = ids[1:]``, ``s_loss_mask``
1.0 exactly where the target is a response token, ``s_positions`` 0, 1, ... and
``s_segment_ids`` 1 on real tokens; each ``[num_pairs, max_length]``, right-padded with
inputs/targets :data:`jaxtrain.data.text.PAD_ID`, mask 0, position 0, segment 0 (the convention
of :mod:`jaxtrain.data.text`). The summed log-prob of a response is then
``jaxtrain.losses.preference.sequence_logps(logits(s_inputs), s_targets, s_loss_mask)``.

Built-in data: :func:`builtin_preference_examples`, arithmetic questions phrased as in the
built-in chat data with the right answer (chosen) against a wrong one (rejected).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from absl import logging

from jaxtrain.data.chat import (
    ROLES,
    SYSTEM_PROMPTS,
    TASK_TEMPLATES,
    chat_prompt,
    chat_template_of,
)
from jaxtrain.data.sanity import BadRows
from jaxtrain.data.sources import Builtin, read_rows
from jaxtrain.data.text import PAD_ID

SIDES: tuple[str, ...] = ("chosen", "rejected")
REF_KEYS: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps")
ARRAY_SUFFIXES: dict[str, type] = {
    "inputs": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "positions": np.int32,
    "segment_ids": np.int32,
}
PREFERENCE_FORMATS_HELP = (
    "expected 'prompt' (a string or a list of {role, content} messages) with 'chosen' and "
    "'rejected' each a string, a [{'role': 'assistant', 'content': ...}] list, or a full "
    "conversation whose turns before its last (assistant) message are the prompt; or, without "
    "'prompt', 'chosen' and 'rejected' as full conversations that differ only in their last, "
    "assistant, message (optional numeric 'ref_chosen_logps' and 'ref_rejected_logps')"
)
_TOKENIZE_BATCH = 512


# ----------------------------------------------------------------------------------------------
# Normalising rows


def _row_error(index: int, example: Any, field: str, problem: str) -> ValueError:
    keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
    return ValueError(
        f"Preference row {index} (keys {keys}): {field!r} {problem}; {PREFERENCE_FORMATS_HELP}."
    )


def _messages(index: int, example: Mapping[str, Any], field: str, value: list
              ) -> list[dict[str, str]]:
    if not value:
        raise _row_error(index, example, field, "is an empty list")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise _row_error(index, example, field,
                             f"item {i} must be a dict with 'role' and 'content', got {m!r:.100}")
        if m["role"] not in ROLES:
            raise _row_error(index, example, field,
                             f"item {i} has the unknown role {m['role']!r}; valid: {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise _row_error(index, example, field, f"item {i} has a "
                             f"{type(m['content']).__name__} content, not a string")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _same_turns(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    return len(a) == len(b) and all(
        x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
        for x, y in zip(a, b, strict=True)
    )


def to_preference(example: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """``{"prompt": messages, "chosen": str, "rejected": str}`` of one row (formats: module
    docstring): the prompt turns and the two assistant replies' contents.

    ``index`` (the row's position) is only used in error messages.
    """
    if not isinstance(example, Mapping):
        raise _row_error(index, example, "row", f"must be a dict, got {type(example).__name__}")
    replies: dict[str, str] = {}
    conversations: dict[str, list[dict[str, str]]] = {}
    for side in SIDES:
        value = example.get(side)
        if value is None:
            raise _row_error(index, example, side, "is missing")
        if isinstance(value, str):
            replies[side] = value
        elif isinstance(value, list):
            messages = _messages(index, example, side, value)
            if messages[-1]["role"] != "assistant":
                raise _row_error(index, example, side, f"must end with an assistant message, "
                                 f"not a {messages[-1]['role']!r} one")
            conversations[side] = messages
            replies[side] = messages[-1]["content"]
        else:
            raise _row_error(index, example, side,
                             f"is a {type(value).__name__}, not a string or a list of messages")
    prompt_value = example.get("prompt")
    if prompt_value is None:
        if len(conversations) < 2 or min(len(c) for c in conversations.values()) < 2:
            raise _row_error(index, example, "prompt", "is missing, and 'chosen' and 'rejected' "
                             "are not both full conversations to take it from")
        prompt = conversations["chosen"][:-1]
        if conversations["rejected"][:-1] != prompt:
            raise _row_error(index, example, "rejected", "does not share the turns before its "
                             "last message with 'chosen', so there is no common prompt")
    else:
        if isinstance(prompt_value, str):
            prompt = [{"role": "user", "content": prompt_value}]
        elif isinstance(prompt_value, list):
            prompt = _messages(index, example, "prompt", prompt_value)
        else:
            raise _row_error(index, example, "prompt", f"is a {type(prompt_value).__name__}, "
                             "not a string or a list of messages")
        for side, conversation in conversations.items():
            if len(conversation) > 1 and not _same_turns(conversation[:-1], prompt):
                raise _row_error(index, example, side, "is a conversation whose turns before "
                                 "its last message are not the 'prompt'")
    for side in SIDES:
        if not replies[side].strip():
            raise _row_error(index, example, side, "is an empty response")
    return {"prompt": prompt, "chosen": replies["chosen"], "rejected": replies["rejected"]}


# ----------------------------------------------------------------------------------------------
# Rendering and tokenizing


def render_preference(
    prompt: list[dict[str, str]], replies: Iterable[str], tokenizer: Any, index: int = 0
) -> tuple[str, list[str]]:
    """(prompt text with the generation prompt, each reply's response text: content and the
    turn terminator), through the tokenizer's chat template (module docstring)."""
    template = chat_template_of(tokenizer)
    prompt_text = chat_prompt(prompt, tokenizer)
    texts = []
    for reply in replies:
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": reply}], chat_template=template,
            tokenize=False,
        ).rstrip()
        if not full.startswith(prompt_text) or len(full) == len(prompt_text):
            raise ValueError(
                f"Preference row {index}: the chat template does not render the prompt with the "
                "generation prompt as a prefix of the prompt followed by the assistant reply "
                f"(prompt text ends {prompt_text[-60:]!r}, full text ends {full[-60:]!r}), so the "
                "response cannot be cut from it. Use a prefix-consistent template (e.g. "
                "jaxtrain.data.chat.CHATML_TEMPLATE)."
            )
        texts.append(full[len(prompt_text):])
    return prompt_text, texts


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for b in range(0, len(texts), _TOKENIZE_BATCH):
        out += tokenizer(texts[b : b + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
    return out


def _ref_logps(rows: list[Mapping[str, Any]]) -> dict[str, np.ndarray] | None:
    """The reference log-prob columns when every row has both, else None."""
    have = [all(row.get(k) is not None for k in REF_KEYS) for row in rows]
    if not any(have):
        return None
    if not all(have):
        logging.warning("Preference rows: only %d of %d rows have both %s; not using them.",
                        sum(have), len(rows), list(REF_KEYS))
        return None
    out = {}
    for key in REF_KEYS:
        values = []
        for i, row in enumerate(rows):
            v = row[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise _row_error(i, row, key, f"is a {type(v).__name__}, not a number")
            values.append(float(v))
        out[key] = np.asarray(values, np.float32)
    return out


def preference_rows(
    examples: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, np.ndarray]:
    """Token arrays of preference pairs: ``{s}_inputs``, ``{s}_targets`` (int32),
    ``{s}_loss_mask`` (float32), ``{s}_positions``, ``{s}_segment_ids`` (int32), each
    ``[num_pairs, max_length]``, for s in (chosen, rejected), plus float32 [num_pairs]
    ``ref_chosen_logps`` / ``ref_rejected_logps`` when every row has them.

    ``max_length`` is the row length: a prompt + response sequence has at most
    ``max_length + 1`` tokens (inputs = ids[:-1], targets = ids[1:]). Prompts keep their last
    ``max_prompt_length`` tokens, responses their first ones (module docstring). Pairs are kept
    in order; those left with an empty response are dropped and counted in the log.
    """
    rows = list(examples)
    out, kept, (prompts_truncated, responses_truncated, dropped, retokenized) = _pair_arrays(
        rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    logging.info(
        "Preference rows: %d pairs, %d prompts truncated to %d tokens, %d responses truncated "
        "to max_length + 1 = %d tokens with the prompt, %d pairs dropped (a response left "
        "empty), %d responses tokenized apart from their prompt", len(rows), prompts_truncated,
        max_prompt_length, responses_truncated, max_length + 1, dropped, retokenized,
    )
    if not kept:
        raise ValueError(
            f"No preference pair is left ({len(rows)} rows, {dropped} dropped because a response "
            f"had no token within max_length + 1 = {max_length + 1} tokens after the prompt): "
            "use a larger max_length or a smaller max_prompt_length."
        )
    ref = _ref_logps(rows)
    if ref is not None:
        out.update({k: v[kept] for k, v in ref.items()})
    return out


def preference_row(example: Mapping[str, Any], tokenizer: Any, *, max_length: int,
                   max_prompt_length: int, index: int = 0) -> dict[str, np.ndarray] | None:
    """The arrays of one pair exactly as :func:`preference_rows` makes its row (each
    ``[max_length]``, plus scalar ``ref_chosen_logps`` / ``ref_rejected_logps`` when the row has
    both), or None when the pair is dropped (a response left empty); for streamed data.
    ``index`` (the row's position) is only used in error messages."""
    out, kept, _ = _pair_arrays([example], tokenizer, max_length=max_length,
                                max_prompt_length=max_prompt_length, first_index=index)
    if not kept:
        return None
    row = {k: v[0] for k, v in out.items()}
    ref = _ref_logps([example])
    if ref is not None:
        row.update({k: v[0] for k, v in ref.items()})
    return row


def _pair_arrays(rows: list[Mapping[str, Any]], tokenizer: Any, *, max_length: int,
                 max_prompt_length: int, first_index: int = 0
                 ) -> tuple[dict[str, np.ndarray], list[int], tuple[int, int, int, int]]:
    """(the side arrays of the kept pairs, the kept rows' indices in ``rows``, (prompts
    truncated, responses truncated, pairs dropped, responses retokenized)) of
    :func:`preference_rows`."""
    if max_length < 1 or max_prompt_length < 1:
        raise ValueError(f"max_length and max_prompt_length must be positive, got {max_length} "
                         f"and {max_prompt_length}.")
    prompt_texts, full_texts, response_texts = [], [], []
    for i, example in enumerate(rows, start=first_index):
        pair = to_preference(example, i)
        prompt_text, texts = render_preference(
            pair["prompt"], [pair[s] for s in SIDES], tokenizer, i)
        prompt_texts.append(prompt_text)
        response_texts += texts
        full_texts += [prompt_text + t for t in texts]
    prompt_ids = _token_ids(tokenizer, prompt_texts)
    full_ids = _token_ids(tokenizer, full_texts)

    pairs, kept = [], []
    prompts_truncated = responses_truncated = dropped = retokenized = 0
    for i, prompt in enumerate(prompt_ids):
        if not prompt:
            raise ValueError(f"Preference row {i + first_index}: the prompt renders to no "
                             "tokens, so the first response token has no input to be predicted "
                             "from.")
        prompts_truncated += len(prompt) > max_prompt_length
        prompt = prompt[-max_prompt_length:]
        budget = max_length + 1 - len(prompt)
        responses = []
        for j in range(len(SIDES)):
            full, n = full_ids[2 * i + j], len(prompt_ids[i])
            if full[:n] == prompt_ids[i]:
                response = full[n:]
            else:  # a token across the prompt/response boundary: tokenize the response alone
                retokenized += 1
                [response] = _token_ids(tokenizer, [response_texts[2 * i + j]])
            responses_truncated += len(response) > budget
            responses.append(response[: max(budget, 0)])
        if not all(responses):
            dropped += 1
            continue
        pairs.append((prompt, responses))
        kept.append(i)

    out = {f"{s}_{k}": np.zeros((len(pairs), max_length), dtype)
           for s in SIDES for k, dtype in ARRAY_SUFFIXES.items()}
    for s in SIDES:
        out[f"{s}_inputs"][:] = PAD_ID
        out[f"{s}_targets"][:] = PAD_ID
    for r, (prompt, responses) in enumerate(pairs):
        for s, response in zip(SIDES, responses, strict=True):
            ids = np.asarray(prompt + response, np.int32)
            n = len(ids) - 1
            out[f"{s}_inputs"][r, :n] = ids[:-1]
            out[f"{s}_targets"][r, :n] = ids[1:]
            out[f"{s}_loss_mask"][r, len(prompt) - 1 : n] = 1.0
            out[f"{s}_positions"][r, :n] = np.arange(n)
            out[f"{s}_segment_ids"][r, :n] = 1
    return out, kept, (prompts_truncated, responses_truncated, dropped, retokenized)


# ----------------------------------------------------------------------------------------------
# The built-in preference dataset

BUILTIN_PREFERENCE = "builtin"
BUILTIN_PREFERENCE_SIZES: dict[str, int] = {"train": 2000, "validation": 200}
_WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)
# The rejected reply: the chosen format with the wrong number, or a sloppier format.
_REJECTED_FORMATS = (None, "The answer is {w}.", "{w}", "{a} {op} {b} is {w}.")
_REJECTED_FORMAT_P = (0.7, 0.1, 0.1, 0.1)


def builtin_preference_example(seed: int, index: int) -> dict[str, list[dict[str, str]]]:
    """Pair ``index`` of the built-in preference data, a pure function of ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    prompt = []
    if rng.random() < 0.3:
        prompt.append({"role": "system",
                       "content": SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]})
    task = "add" if rng.random() < 0.5 else "subtract"
    user_templates, answer = TASK_TEMPLATES[task]
    x, y = (int(v) for v in rng.integers(0, 50, size=2))
    a, b = (x, y) if task == "add" else (max(x, y), min(x, y))  # no negative differences
    c = a + b if task == "add" else a - b
    d = int(rng.choice(_WRONG_OFFSETS))
    w = c + d if c + d >= 0 else c - d  # wrong by 1 to 3, never negative
    user = user_templates[int(rng.integers(len(user_templates)))].format(a=a, b=b)
    prompt.append({"role": "user", "content": user})
    fmt = _REJECTED_FORMATS[int(rng.choice(len(_REJECTED_FORMATS), p=_REJECTED_FORMAT_P))]
    op = "+" if task == "add" else "-"
    rejected = answer.format(a=a, b=b, c=w) if fmt is None else fmt.format(a=a, b=b, op=op, w=w)
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": answer.format(a=a, b=b, c=c)}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def builtin_preference_examples(n: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` generated preference pairs in TRL's conversational format, deterministic.

    Additions and subtractions of numbers below 50, asked with the user phrasings of the
    built-in chat data (:func:`jaxtrain.data.chat.builtin_chat_examples`), 30% with one of its
    system prompts. Chosen: its answer format with the right result ("17 + 25 = 42.");
    rejected: a result off by 1 to 3 (never negative), in the same format 70% of the time, else
    "The answer is 43.", "43" or "17 + 25 is 43.". Pair i depends only on ``(seed, i)``;
    :func:`load_preference_examples` uses ``2 * seed`` for train and ``2 * seed + 1`` for
    validation.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return [builtin_preference_example(seed, i) for i in range(n)]


def load_preference_examples(
    source: str, *, split: str = "train", n: int | None = None, seed: int = 0,
    on_bad_row: str = "error", subset: str = "",
) -> list[dict[str, Any]]:
    """Preference rows of ``source`` (:mod:`jaxtrain.data.sources`): ``"builtin"``, a local file
    or directory (an undivided one split as :func:`jaxtrain.data.sources.split_examples` says),
    or a hub dataset; ``split`` is a split spec (``train_prefs``, ``train[:1%]``), ``subset`` the
    dataset config (:mod:`jaxtrain.data.sources`).

    ``n`` caps the number of rows (for ``"builtin"`` it is the number generated, by default
    2000 for train and 200 for validation). Rows are returned as dicts for
    :func:`preference_rows`; a row :func:`to_preference` cannot read, or an unparseable line of
    a local file, is bad: an error naming the row, or dropped with ``on_bad_row="skip"``
    (:mod:`jaxtrain.data.sanity`).
    """
    def generate(name: str) -> list[dict[str, Any]]:
        count = BUILTIN_PREFERENCE_SIZES[name] if n is None else n
        return builtin_preference_examples(count, 2 * seed + (name != "train"))

    builtin = Builtin(BUILTIN_PREFERENCE, generate, tuple(BUILTIN_PREFERENCE_SIZES))
    examples, rows = read_rows(source, split, builtins={BUILTIN_PREFERENCE: builtin}, n=n,
                               on_bad_row=on_bad_row, subset=subset)
    return BadRows(on_bad_row, f"{source!r} (split {split!r})").keep(
        examples, rows, to_preference)
