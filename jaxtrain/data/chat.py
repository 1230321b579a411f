"""Chat data for supervised fine-tuning (SFT) of causal language models.

Rows are in the format of :mod:`jaxtrain.data.text` (``inputs``, ``targets``, ``loss_mask``,
``segment_ids``, ``positions``), with the loss on the assistant's tokens only.

Pipeline: a dataset row → :func:`to_messages` (one normalised conversation, a list of
``{"role": "system"|"user"|"assistant", "content": str}``) → :func:`tokenize_chat` (token ids and
an assistant mask) → :func:`sft_rows` (rows, one conversation per row or packed).

Input formats understood by :func:`to_messages`:

- ``messages``: a list of ``{"role", "content"}`` (OpenAI / Hugging Face style);
- ``conversations``: ShareGPT, a list of ``{"from", "value"}`` with ``from`` in human/user,
  gpt/assistant/bot/model, system;
- ``prompt`` + ``response`` or ``completion``; ``instruction`` (+ optional ``input``) + ``output``
  (an optional ``system`` string column becomes a system turn);
- ``text_fields=[f1, ..., fn]``: fields f1..f(n-1) joined by a blank line are the user turn, fn
  is the assistant turn.

Chat template: the tokenizer's own ``chat_template``, else :data:`CHATML_TEMPLATE`
(``<|im_start|>role\\ncontent<|im_end|>\\n``). For the built-in GPT-2 tokenizer the ChatML markers
are not special tokens and are tokenized as ordinary text (the vocabulary stays GPT-2's).

The assistant mask is 1 exactly on the tokens of each assistant turn's content plus the turn's
terminator (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3, ``</s>`` in Zephyr, ...) so the
model learns to stop; it is 0 on system and user turns, role headers (the assistant header
included) and the whitespace after a terminator. It is found from the rendered text, for any
prefix-consistent template: for assistant message i,

- its content starts where a sentinel string put in its place shows up when
  ``messages[:i] + [sentinel message]`` is rendered (so the header is excluded);
- its turn ends where ``messages[:i + 1]`` rendered ends, trailing whitespace removed (so the
  terminator is included);

and a token is an assistant token iff its character span (the fast tokenizer's offset mapping
of the full rendered conversation) overlaps one of these spans. A conversation of more than
``max_len + 1`` tokens is truncated; one left with no assistant target is dropped.

Built-in data: :func:`builtin_chat_examples` generates small deterministic conversations
(arithmetic, word games, capitals) that a tiny model learns in a few hundred CPU steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxtrain.data.sanity import BadRows
from jaxtrain.data.sources import Builtin, read_rows
from jaxtrain.data.text import pack_pieces

ROLES: tuple[str, ...] = ("system", "user", "assistant")
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}
FORMATS_HELP = (
    "expected one of: 'messages' (a list of {role, content}), 'conversations' (ShareGPT: a list "
    "of {from, value}), 'prompt' + 'response' or 'completion', 'instruction' (+ 'input') + "
    "'output', or text_fields=[...] (all but the last field form the user turn, the last the "
    "assistant turn)"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Stands in for an assistant message's content to find where the content starts.
_SENTINEL = "\ue000jaxtrain-content\ue001"
_TOKENIZE_BATCH = 512


# ----------------------------------------------------------------------------------------------
# Normalising rows to messages


def _row_error(example: Mapping[str, Any], problem: str) -> ValueError:
    return ValueError(
        f"Cannot read a conversation from the row with keys {sorted(example)}: {problem}; "
        f"{FORMATS_HELP}."
    )


def _text(example: Mapping[str, Any], value: Any, what: str) -> str:
    """A message's text; a list of content parts keeps its text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, Mapping) for p in value):
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise _row_error(example, f"{what} is a {type(value).__name__}, not a string: {value!r:.100}")


def _turns(example: Mapping[str, Any], turns: Any, key: str, role_key: str, text_key: str,
           roles: Mapping[str, str]) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise _row_error(example, f"{key!r} must be a non-empty list, got {turns!r:.100}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or text_key not in turn:
            raise _row_error(
                example, f"{key}[{i}] must be a dict with {role_key!r} and {text_key!r}, got "
                f"{turn!r:.100}"
            )
        role = turn[role_key]
        if role not in roles:
            raise _row_error(
                example, f"{key}[{i}] has the unknown {role_key} {role!r}; valid: {sorted(roles)}"
            )
        messages.append({"role": roles[role], "content": _text(example, turn[text_key],
                                                                f"{key}[{i}].{text_key}")})
    return messages


def to_messages(
    example: Mapping[str, Any], *, text_fields: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Normalise one dataset row into ``[{"role", "content"}, ...]`` (formats: module docstring).

    Raises ValueError naming the row's keys and the expected formats when the row is malformed
    or has no assistant turn.
    """
    if not isinstance(example, Mapping):
        raise ValueError(f"A chat example must be a dict, got {type(example).__name__}.")
    if text_fields is not None:
        fields = list(text_fields)
        if len(fields) < 2:
            raise ValueError(f"text_fields needs at least two fields (user..., assistant), got "
                             f"{fields}.")
        missing = [f for f in fields if f not in example]
        if missing:
            raise _row_error(example, f"text_fields {missing} are missing")
        values = [_text(example, example[f], repr(f)) for f in fields]
        user = "\n\n".join(v for v in values[:-1] if v)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": values[-1]}]
    elif "messages" in example:
        messages = _turns(example, example["messages"], "messages", "role", "content",
                          {r: r for r in ROLES})
    elif "conversations" in example:
        messages = _turns(example, example["conversations"], "conversations", "from", "value",
                          SHAREGPT_ROLES)
    else:
        answer_key = next((k for k in ("response", "completion", "output") if k in example), None)
        prompt_key = next((k for k in ("prompt", "instruction") if k in example), None)
        if answer_key is None or prompt_key is None:
            raise _row_error(example, "no known chat format")
        prompt = _text(example, example[prompt_key], repr(prompt_key))
        if prompt_key == "instruction" and example.get("input"):
            prompt = prompt + "\n\n" + _text(example, example["input"], "'input'")
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(example, example[answer_key],
                                                           repr(answer_key))}]
        if example.get("system"):
            messages.insert(0, {"role": "system",
                                "content": _text(example, example["system"], "'system'")})
    if not any(m["role"] == "assistant" for m in messages):
        raise _row_error(example, "the conversation has no assistant turn to train on")
    return messages


# ----------------------------------------------------------------------------------------------
# Templates and the assistant mask


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or :data:`CHATML_TEMPLATE` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or CHATML_TEMPLATE


def _render(tokenizer: Any, messages: list[dict[str, str]], template: str,
            add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def render_chat(
    messages: list[dict[str, str]], tokenizer: Any
) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans of the assistant turns: content + terminator)."""
    template = chat_template_of(tokenizer)
    full = _render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: i + 1], template)
        probe = _render(tokenizer, [*messages[:i], {**message, "content": _SENTINEL}], template)
        start = probe.find(_SENTINEL)
        if start < 0 or not full.startswith(through) or probe[:start] != through[:start]:
            raise ValueError(
                "Cannot find the assistant turns in the rendered chat: the chat template does "
                "not render conversations prefix-consistently (rendering the first k messages "
                "must give a prefix of rendering all of them). Use a template without that "
                "behaviour (e.g. jaxtrain.data.chat.CHATML_TEMPLATE)."
            )
        spans.append((start, max(start, len(through.rstrip()))))
    return full, spans


def chat_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The rendered conversation followed by the assistant header, to sample a reply from."""
    return _render(tokenizer, messages, chat_template_of(tokenizer), add_generation_prompt=True)


def _assistant_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(offsets), dtype=bool)
    if len(offsets):
        for start, end in spans:
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask


def _tokenize_rendered(
    texts: list[str], all_spans: list[list[tuple[int, int]]], tokenizer: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int32 ids, int32 assistant mask) of each rendered conversation, untruncated."""
    out = []
    for b in range(0, len(texts), _TOKENIZE_BATCH):
        enc = tokenizer(texts[b : b + _TOKENIZE_BATCH], add_special_tokens=False,
                        return_offsets_mapping=True)
        for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"],
                                       all_spans[b : b + _TOKENIZE_BATCH], strict=True):
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            out.append((np.asarray(ids, np.int32),
                        _assistant_mask(offsets, spans).astype(np.int32)))
    return out


def _truncate(ids: np.ndarray, mask: np.ndarray, max_len: int
              ) -> tuple[np.ndarray, np.ndarray] | None:
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    if len(ids) < 2 or not mask[1:].any():
        return None
    return ids, mask


def tokenize_chat(
    messages: list[dict[str, str]], tokenizer: Any, *, max_len: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(token ids, assistant mask) of a conversation, at most ``max_len + 1`` tokens.

    Both are int32 arrays of the same length; the mask is 1 on the assistant turns' content and
    terminator tokens (module docstring). Returns None when truncation leaves no assistant
    token after the first position (nothing to train on).
    """
    text, spans = render_chat(messages, tokenizer)
    [(ids, mask)] = _tokenize_rendered([text], [spans], tokenizer)
    return _truncate(ids, mask, max_len)


def sft_rows(
    examples: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    seq_len: int,
    packing: bool,
    text_fields: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """SFT rows ``[num_rows, seq_len]`` with the loss on assistant tokens only.

    For a conversation's ids: inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:].
    ``packing=False``: one conversation per row, padded; ``packing=True``: conversations
    first-fit packed into rows as separate segments (``jaxtrain.data.text.pack_pieces``).
    Conversations longer than ``seq_len + 1`` tokens are truncated, and dropped if no assistant
    target is left; both are counted in the log.
    """
    texts, spans = [], []
    for example in examples:
        text, sp = render_chat(to_messages(example, text_fields=text_fields), tokenizer)
        texts.append(text)
        spans.append(sp)
    pieces, masks, truncated, dropped = [], [], 0, 0
    for ids, mask in _tokenize_rendered(texts, spans, tokenizer):
        truncated += len(ids) > seq_len + 1
        kept = _truncate(ids, mask, seq_len)
        if kept is None:
            dropped += 1
            continue
        pieces.append(kept[0])
        masks.append(kept[1])
    logging.info(
        "SFT rows: %d conversations, %d truncated to %d tokens, %d dropped (no assistant token "
        "left), packing=%s", len(texts), truncated, seq_len + 1, dropped, packing,
    )
    if not pieces:
        raise ValueError(
            f"No conversation has an assistant token within seq_len + 1 = {seq_len + 1} tokens "
            f"({len(texts)} conversations, {dropped} dropped): use a larger seq_len."
        )
    return pack_pieces(pieces, masks, seq_len, packing=packing)


def sft_row(example: Mapping[str, Any], tokenizer: Any, *, seq_len: int,
            text_fields: Sequence[str] | None = None) -> dict[str, np.ndarray] | None:
    """One conversation's row ``[seq_len]`` exactly as :func:`sft_rows` without packing makes
    it, or None when truncation leaves no assistant target (streamed data)."""
    kept = tokenize_chat(to_messages(example, text_fields=text_fields), tokenizer,
                         max_len=seq_len)
    if kept is None:
        return None
    rows = pack_pieces([kept[0]], [kept[1]], seq_len, packing=False)
    return {k: v[0] for k, v in rows.items()}


# ----------------------------------------------------------------------------------------------
# The built-in chat dataset

BUILTIN_CHAT = "builtin"
BUILTIN_CHAT_SIZES: dict[str, int] = {"train": 4000, "validation": 200}

# The built-in conversations' system prompts, facts and tasks (the built-in preference data
# shares the prompts and the arithmetic tasks).
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a friendly tutor for numbers, words and geography.",
)
_WORDS = (
    "cat", "dog", "sun", "tree", "book", "milk", "fish", "bird", "rain", "star", "moon", "lamp",
    "door", "cake", "frog", "king", "ship", "rose", "salt", "wolf", "apple", "river", "stone",
    "chair", "bread", "cloud", "horse", "music", "paper", "tiger", "green", "plant", "smile",
    "water", "house", "light", "train", "queen", "snake", "glass",
)
CAPITALS: tuple[tuple[str, str], ...] = (  # (country, capital)
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Greece", "Athens"), ("Russia", "Moscow"), ("India", "New Delhi"), ("Ireland", "Dublin"),
    ("Australia", "Canberra"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Cuba", "Havana"), ("Chile", "Santiago"),
)
TASK_TEMPLATES: dict[str, tuple[tuple[str, ...], str]] = {
    # name: (user templates, assistant template)
    "add": (("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
             "What do you get if you add {a} and {b}?"), "{a} + {b} = {c}."),
    "subtract": (("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."),
                 "{a} - {b} = {c}."),
    "reverse": (('Reverse the word "{w}".', 'Spell "{w}" backwards.',
                 'What is "{w}" written backwards?'), '"{w}" reversed is "{r}".'),
    "upper": (('Write "{w}" in capital letters.', 'Uppercase the word "{w}".',
               'How do you write "{w}" in upper case?'), '"{w}" in capital letters is "{u}".'),
    "count": (('How many letters are in the word "{w}"?', 'Count the letters in "{w}".',
               'How long is the word "{w}"?'), 'The word "{w}" has {n} letters.'),
    "capital": (("What is the capital of {country}?", "Which city is the capital of {country}?",
                 "Name the capital of {country}."), "The capital of {country} is {city}."),
}
_TASK_NAMES = tuple(TASK_TEMPLATES)


def _builtin_turn(rng: np.random.Generator) -> tuple[str, str]:
    task = _TASK_NAMES[int(rng.integers(len(_TASK_NAMES)))]
    user_templates, answer = TASK_TEMPLATES[task]
    x, y = (int(v) for v in rng.integers(0, 50, size=2))
    a, b = (x, y) if task == "add" else (max(x, y), min(x, y))  # no negative differences
    w = _WORDS[int(rng.integers(len(_WORDS)))]
    country, city = CAPITALS[int(rng.integers(len(CAPITALS)))]
    c = a + b if task == "add" else a - b
    fields = dict(a=a, b=b, c=c, w=w, r=w[::-1], u=w.upper(), n=len(w), country=country,
                  city=city)
    user = user_templates[int(rng.integers(len(user_templates)))].format(**fields)
    return user, answer.format(**fields)


def builtin_chat_example(seed: int, index: int) -> dict[str, list[dict[str, str]]]:
    """Conversation ``index`` of the built-in dataset, a pure function of ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system",
                         "content": SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]})
    num_turns = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    for _ in range(num_turns):
        user, answer = _builtin_turn(rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def builtin_chat_examples(n: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` generated conversations in ``messages`` format, no download, deterministic.

    Tasks: adding and subtracting numbers below 50, reversing, upper-casing and counting the
    letters of a short word, and the capital of one of 22 countries, each asked with a few
    paraphrased templates; 30% have a system prompt, 30% have two or three exchanges. Example i
    depends only on ``(seed, i)``. For held-out data use another seed:
    :func:`load_chat_examples` uses ``2 * seed`` for train and ``2 * seed + 1`` for validation,
    so the conversations differ (the facts, e.g. capitals, are shared by design).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return [builtin_chat_example(seed, i) for i in range(n)]


def load_chat_examples(
    source: str, *, split: str = "train", n: int | None = None, seed: int = 0,
    text_fields: Sequence[str] | None = None, on_bad_row: str = "error", subset: str = "",
) -> list[dict[str, Any]]:
    """Chat rows of ``source`` (:mod:`jaxtrain.data.sources`): ``"builtin"``, a local file or
    directory (an undivided one split as :func:`jaxtrain.data.sources.split_examples` says), or a
    hub dataset; ``split`` is a split spec (``train_sft``, ``train[:1%]``), ``subset`` the
    dataset config (:mod:`jaxtrain.data.sources`).

    ``n`` caps the number of rows (for ``"builtin"`` it is the number generated, by default
    4000 for train and 200 for validation). Rows are returned as dicts for :func:`to_messages`;
    a row it cannot read (with ``text_fields``), or an unparseable line of a local file, is
    bad: an error naming the row, or dropped with ``on_bad_row="skip"``
    (:mod:`jaxtrain.data.sanity`).
    """
    def generate(name: str) -> list[dict[str, Any]]:
        count = BUILTIN_CHAT_SIZES[name] if n is None else n
        return builtin_chat_examples(count, 2 * seed + (name != "train"))

    builtin = Builtin(BUILTIN_CHAT, generate, tuple(BUILTIN_CHAT_SIZES))
    examples, rows = read_rows(source, split, builtins={BUILTIN_CHAT: builtin}, n=n,
                               on_bad_row=on_bad_row, subset=subset)
    return BadRows(on_bad_row, f"{source!r} (split {split!r})").keep(
        examples, rows, lambda example, _: to_messages(example, text_fields=text_fields))
