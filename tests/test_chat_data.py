"""Chat formats, templates, the assistant-only loss mask, SFT rows and the built-in chat data."""

import copy
import itertools
import json
import re

import numpy as np
import pytest

from jaxtrain.data import chat
from jaxtrain.data.chat import (
    CHATML_TEMPLATE,
    builtin_chat_examples,
    load_chat_examples,
    sft_rows,
    to_messages,
    tokenize_chat,
)
from jaxtrain.data.text import ROW_DTYPES, ROW_KEYS
from jaxtrain.data.tokenizers import load_tokenizer

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
    "+ eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)
# (template, special tokens to add, end-of-turn text, content as rendered)
TEMPLATES = {
    "llama3": (LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|eot_id|>", str.strip),
    "zephyr": (ZEPHYR_TEMPLATE, [], "<|endoftext|>", lambda s: s),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    [{"role": "system", "content": "SYSTEMTEXT be brief."},
     {"role": "user", "content": "USERTEXT hello there!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "USERTEXT Reverse \"cat\"."},
     {"role": "assistant", "content": "\"tac\" - done; anything else?"}],
    [{"role": "user", "content": "USERTEXT count to three"},
     {"role": "assistant", "content": "one, two, three\n1 2 3"},
     {"role": "user", "content": "USERTEXT thanks"}],
]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def templated(request, tmp_path_factory):
    """A tokenizer directory with its own chat template, loaded through load_tokenizer."""
    template, specials, end, render = TEMPLATES[request.param]
    tok = copy.deepcopy(load_tokenizer("gpt2"))
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    tok.chat_template = template
    path = tmp_path_factory.mktemp(request.param)
    tok.save_pretrained(path)
    return load_tokenizer(str(path)), end, render


# ------------------------------------------------------------------------------------------
# Formats


def test_all_formats_normalise_to_messages():
    user_assistant = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages({"messages": user_assistant, "id": 3}) == user_assistant
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}, {"from": "user", "value": "Q2"},
                               {"from": "model", "value": "A2"}]}
    assert to_messages(share) == [
        {"role": "system", "content": "S"}, *user_assistant,
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert to_messages({"prompt": "Q", "response": "A"}) == user_assistant
    assert to_messages({"prompt": "Q", "completion": "A"}) == user_assistant
    assert to_messages({"instruction": "Q", "input": "", "output": "A"}) == user_assistant
    assert to_messages({"instruction": "Do", "input": "this", "output": "A"}) == [
        {"role": "user", "content": "Do\n\nthis"}, {"role": "assistant", "content": "A"}]
    assert to_messages({"prompt": "Q", "response": "A", "system": "S"})[0] == {
        "role": "system", "content": "S"}
    row = {"title": "T", "body": "B", "summary": "A"}
    assert to_messages(row, text_fields=["title", "body", "summary"]) == [
        {"role": "user", "content": "T\n\nB"}, {"role": "assistant", "content": "A"}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                          {"role": "assistant", "content": "A"}]}
    assert to_messages(parts) == user_assistant


@pytest.mark.parametrize("row, text_fields, match", [
    ({"messages": [{"role": "foo", "content": "x"}]}, None,
     r"keys \['messages'\].*unknown role 'foo'.*'assistant', 'system', 'user'"),
    ({"messages": [{"role": "user", "content": "x"}]}, None, "no assistant turn"),
    ({"messages": []}, None, "non-empty list"),
    ({"messages": [{"role": "user"}]}, None, r"messages\[0\] must be a dict with 'role'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     None, r"messages\[0\].content is a int"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, None, "unknown from 'alien'.*'gpt'"),
    ({"question": "q", "answer": "a"}, None,
     r"keys \['answer', 'question'\]: no known chat format.*'messages'.*'conversations'"),
    ({"a": "q"}, ["a", "b"], r"text_fields \['b'\] are missing"),
])
def test_malformed_rows_get_helpful_errors(row, text_fields, match):
    with pytest.raises(ValueError, match=match):
        to_messages(row, text_fields=text_fields)


# ------------------------------------------------------------------------------------------
# Assistant mask


def chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chatml_assistant_mask_is_exactly_the_assistant_turns(gpt2, conversation):
    ids, mask = tokenize_chat(conversation, gpt2, max_len=1000)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape
    assert gpt2.decode(ids) == chatml(conversation)  # the built-in ChatML template
    assert max(ids) < 50257  # ChatML markers are plain text for GPT-2
    trained = "".join(m["content"] + "<|im_end|>" for m in conversation
                      if m["role"] == "assistant")
    assert gpt2.decode(ids[mask == 1]) == trained
    # everything else, headers included, is not trained
    untrained = "".join(
        f"<|im_start|>{m['role']}\n" + ("" if m["role"] == "assistant" else m["content"]
                                        + "<|im_end|>") + "\n"
        for m in conversation)
    assert gpt2.decode(ids[mask == 0]) == untrained
    assert "USERTEXT" not in trained and "SYSTEMTEXT" not in trained


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_own_template_assistant_mask(templated, conversation):
    tok, end, render = templated
    assert tok.chat_template is not None and chat.chat_template_of(tok) != CHATML_TEMPLATE
    ids, mask = tokenize_chat(conversation, tok, max_len=1000)
    trained = "".join(render(m["content"]) + end for m in conversation
                      if m["role"] == "assistant")
    assert tok.decode(ids[mask == 1]) == trained
    untrained = tok.decode(ids[mask == 0])
    assert "assistant" in untrained  # the assistant header is not trained
    for m in conversation:
        if m["role"] != "assistant":
            assert m["content"].strip() in untrained
    if end == "<|eot_id|>":
        assert tok.convert_tokens_to_ids("<|eot_id|>") in ids[mask == 1].tolist()


def test_generation_prompt_ends_with_the_assistant_header(gpt2, templated):
    user = CONVERSATIONS[0][:1]
    assert chat.chat_prompt(user, gpt2) == chatml(user) + "<|im_start|>assistant\n"
    tok, _, _ = templated
    prompt = chat.chat_prompt(user, tok)
    assert prompt.startswith(tok.apply_chat_template(user, tokenize=False))
    assert prompt.rstrip().endswith(("<|end_header_id|>", "<|assistant|>"))


def test_builtin_conversations_masks(gpt2):
    for example in builtin_chat_examples(50, 3):
        messages = to_messages(example)
        ids, mask = tokenize_chat(messages, gpt2, max_len=1000)
        assert gpt2.decode(ids[mask == 1]) == "".join(
            m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_truncation_and_dropping(gpt2):
    conv = CONVERSATIONS[0]
    full_ids, full_mask = tokenize_chat(conv, gpt2, max_len=1000)
    n_user = int(np.argmax(full_mask))  # tokens before the first assistant token
    ids, mask = tokenize_chat(conv, gpt2, max_len=n_user + 1)
    assert len(ids) == n_user + 2 and mask[1:].sum() == 2
    np.testing.assert_array_equal(ids, full_ids[: n_user + 2])
    assert tokenize_chat(conv, gpt2, max_len=n_user - 1) is None  # no assistant target left


def test_template_that_is_not_prefix_consistent_is_rejected(gpt2):
    tok = copy.deepcopy(gpt2)
    # numbers turns from the end: rendering a prefix is not a prefix of the full rendering
    tok.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string + ':' "
                         "+ m['content'] + '\n' }}{% endfor %}")
    with pytest.raises(ValueError, match="prefix-consistent"):
        tokenize_chat(CONVERSATIONS[2], tok, max_len=100)


# ------------------------------------------------------------------------------------------
# SFT rows


def check_rows(rows):
    assert set(rows) == set(ROW_KEYS)
    for k in ROW_KEYS:
        assert rows[k].dtype == ROW_DTYPES[k]


def test_sft_rows_unpacked_one_conversation_per_row(gpt2):
    examples = [{"messages": c} for c in CONVERSATIONS]
    rows = sft_rows(examples, gpt2, seq_len=128, packing=False)
    check_rows(rows)
    assert rows["inputs"].shape == (3, 128)
    for r, conv in enumerate(CONVERSATIONS):
        ids, mask = tokenize_chat(conv, gpt2, max_len=128)
        assert len(ids) < 128
        n = len(ids) - 1
        np.testing.assert_array_equal(rows["inputs"][r, :n], ids[:-1])
        np.testing.assert_array_equal(rows["targets"][r, :n], ids[1:])
        np.testing.assert_array_equal(rows["loss_mask"][r, :n], mask[1:])
        assert rows["loss_mask"][r].sum() == mask[1:].sum()
        assert gpt2.decode(rows["targets"][r][rows["loss_mask"][r] == 1]) == "".join(
            m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        assert (rows["segment_ids"][r, :n] == 1).all() and (rows["segment_ids"][r, n:] == 0).all()
        np.testing.assert_array_equal(rows["positions"][r, :n], np.arange(n))


def test_sft_rows_packed_keep_conversations_in_separate_segments(gpt2):
    examples = builtin_chat_examples(60, 0)
    packed = sft_rows(examples, gpt2, seq_len=128, packing=True)
    unpacked = sft_rows(examples, gpt2, seq_len=128, packing=False)
    check_rows(packed)
    assert len(packed["inputs"]) < len(unpacked["inputs"]) == 60
    assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
    expected = sorted(tuple(r[s > 0]) for r, s in zip(unpacked["inputs"],
                                                       unpacked["segment_ids"], strict=True))
    got = []
    for r in range(len(packed["inputs"])):
        seg = packed["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(packed["positions"][r, idx], np.arange(len(idx)))
            got.append(tuple(packed["inputs"][r, idx]))
        assert (packed["loss_mask"][r][seg == 0] == 0).all()
    assert sorted(got) == expected


def test_sft_rows_counts_truncated_and_dropped(gpt2, caplog):
    long_user = {"messages": [{"role": "user", "content": "word " * 200},
                              {"role": "assistant", "content": "ok"}]}
    examples = [long_user, {"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[1]}]
    with caplog.at_level("INFO"):
        rows = sft_rows(examples, gpt2, seq_len=80, packing=False)
    # 46 and 122 tokens: the long one is dropped, the 5-turn one truncated after its first answer
    assert rows["inputs"].shape == (2, 80)
    assert "3 conversations, 2 truncated to 81 tokens, 1 dropped" in caplog.text
    assert gpt2.decode(rows["targets"][1][rows["loss_mask"][1] == 1]).startswith(
        "Hello! How can I help?<|im_end|>")
    with pytest.raises(ValueError, match="No conversation"):
        sft_rows([long_user], gpt2, seq_len=80, packing=True)


def test_sft_rows_with_text_fields(gpt2):
    rows = sft_rows([{"q": "Name a colour.", "a": "Blue."}], gpt2, seq_len=64, packing=False,
                    text_fields=["q", "a"])
    assert gpt2.decode(rows["targets"][0][rows["loss_mask"][0] == 1]) == "Blue.<|im_end|>"


# ------------------------------------------------------------------------------------------
# Built-in and local chat data


def test_builtin_chat_examples_are_deterministic_and_correct():
    a = builtin_chat_examples(300, 0)
    assert a == builtin_chat_examples(300, 0) and a[:10] == builtin_chat_examples(10, 0)
    assert a != builtin_chat_examples(300, 1)
    messages = [to_messages(e) for e in a]
    assert any(m[0]["role"] == "system" for m in messages)
    assert any(sum(t["role"] == "assistant" for t in m) > 1 for m in messages)
    tasks = set()
    for m in messages:
        for user, answer in itertools.pairwise(m):
            if user["role"] != "user":
                continue
            if match := re.fullmatch(r"(\d+) ([+-]) (\d+) = (-?\d+)\.", answer["content"]):
                x, op, y, z = match.groups()
                assert int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
                assert x in user["content"] and y in user["content"]
                tasks.add(op)
            elif match := re.fullmatch(r'"(\w+)" reversed is "(\w+)"\.', answer["content"]):
                assert match[2] == match[1][::-1]
                tasks.add("reverse")
            elif match := re.fullmatch(r'"(\w+)" in capital letters is "(\w+)"\.',
                                       answer["content"]):
                assert match[2] == match[1].upper()
                tasks.add("upper")
            elif match := re.fullmatch(r'The word "(\w+)" has (\d+) letters\.',
                                       answer["content"]):
                assert int(match[2]) == len(match[1])
                tasks.add("count")
            elif match := re.fullmatch(r"The capital of (.+) is (.+)\.", answer["content"]):
                assert dict(chat.CAPITALS)[match[1]] == match[2]
                tasks.add("capital")
    assert tasks == {"+", "-", "reverse", "upper", "count", "capital"}


def test_load_chat_examples_builtin_splits():
    train = load_chat_examples("builtin", split="train", n=20)
    validation = load_chat_examples("builtin", split="validation", n=20)
    assert train == builtin_chat_examples(20, 0) and validation == builtin_chat_examples(20, 1)
    assert len(load_chat_examples("builtin", split="validation")) == 200
    assert load_chat_examples("builtin", split="train", n=5, seed=1) == builtin_chat_examples(5, 2)
    with pytest.raises(ValueError, match="splits"):
        load_chat_examples("builtin", split="test")
    with pytest.raises(ValueError, match="not found locally"):
        load_chat_examples("some-org/some-chats", split="train")


def test_load_chat_examples_from_a_local_sharegpt_file(tmp_path, gpt2):
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            conv = [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}."}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    train = load_chat_examples(str(path), split="train")
    validation = load_chat_examples(str(path), split="validation")
    assert len(train) == 59 and len(validation) == 1
    assert to_messages(validation[0])[1] == {"role": "assistant", "content": "49."}
    # each conversation is 38 tokens (ChatML markers are ~6 GPT-2 tokens each): two per row
    rows = sft_rows(load_chat_examples(str(path), split="train", n=10), gpt2, seq_len=96,
                    packing=True)
    assert rows["inputs"].shape == (5, 96)
    assert (rows["segment_ids"].max(axis=1) >= 2).all()
