"""Preference rows: formats, the response-only loss mask, truncation, errors, built-in pairs."""

import copy
import json
import re

import numpy as np
import pytest

from jaxtrain.data import chat
from jaxtrain.data.preference import (
    ARRAY_SUFFIXES,
    SIDES,
    builtin_preference_examples,
    load_preference_examples,
    preference_rows,
    to_preference,
)
from jaxtrain.data.tokenizers import load_tokenizer

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

STRING_ROW = {"prompt": "What is 2 + 2? Answer briefly.", "chosen": "2 + 2 = 4.",
              "rejected": " 2 + 2 = 5, I think\nor maybe 6."}
MESSAGES_ROW = {
    "prompt": [{"role": "system", "content": "SYSTEMTEXT be brief."},
               {"role": "user", "content": "Reverse \"cat\"."},
               {"role": "assistant", "content": "\"tac\"."},
               {"role": "user", "content": "And \"dog\"?"}],
    "chosen": [{"role": "assistant", "content": "\"god\"."}],
    "rejected": [{"role": "assistant", "content": "\"dgo\" - I am not sure."}],
}


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A tokenizer directory with its own chat template (Llama 3 style), via load_tokenizer."""
    tok = copy.deepcopy(load_tokenizer("gpt2"))
    tok.add_tokens(SPECIALS, special_tokens=True)
    tok.chat_template = LLAMA3_TEMPLATE
    path = tmp_path_factory.mktemp("llama3")
    tok.save_pretrained(path)
    return load_tokenizer(str(path))


def _chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _prompt_messages(row):
    p = row["prompt"]
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def _reply(value):
    return value if isinstance(value, str) else value[-1]["content"]


def _check_layout(out, n, max_length):
    for s in SIDES:
        for suffix, dtype in ARRAY_SUFFIXES.items():
            a = out[f"{s}_{suffix}"]
            assert a.shape == (n, max_length) and a.dtype == dtype, (s, suffix)
        real = out[f"{s}_segment_ids"] == 1
        assert np.all(out[f"{s}_segment_ids"][~real] == 0)
        assert np.all(out[f"{s}_inputs"][~real] == 0) and np.all(out[f"{s}_targets"][~real] == 0)
        assert np.all(out[f"{s}_loss_mask"][~real] == 0)
        lengths = real.sum(1)
        assert np.all(real == (np.arange(max_length)[None] < lengths[:, None]))  # right-padded
        np.testing.assert_array_equal(out[f"{s}_positions"],
                                      np.where(real, np.arange(max_length)[None], 0))
        # targets are the inputs shifted by one
        np.testing.assert_array_equal(out[f"{s}_targets"][:, :-1][real[:, 1:]],
                                      out[f"{s}_inputs"][:, 1:][real[:, 1:]])


@pytest.mark.parametrize("row", [STRING_ROW, MESSAGES_ROW], ids=["strings", "messages"])
def test_chatml_mask_is_exactly_the_response(gpt2, row):
    out = preference_rows([row], gpt2, max_length=160, max_prompt_length=128)
    _check_layout(out, 1, 160)
    prompt = _chatml(_prompt_messages(row)) + "<|im_start|>assistant\n"
    for s in SIDES:
        real = out[f"{s}_segment_ids"][0] == 1
        mask = out[f"{s}_loss_mask"][0] == 1
        reply = _reply(row[s])
        # the whole sequence is prompt + reply + terminator, nothing else
        ids = [*out[f"{s}_inputs"][0][real], out[f"{s}_targets"][0][real][-1]]
        assert gpt2.decode(ids) == prompt + reply + "<|im_end|>"
        assert gpt2.decode(out[f"{s}_targets"][0][mask]) == reply + "<|im_end|>"
        # the mask is one contiguous run up to the last real target
        first = int(np.argmax(mask))
        assert mask[first:real.sum()].all() and not mask[:first].any()
        assert gpt2.decode(out[f"{s}_inputs"][0][: first + 1]) == prompt


@pytest.mark.parametrize("row", [STRING_ROW, MESSAGES_ROW], ids=["strings", "messages"])
def test_own_template_mask_is_exactly_the_response(llama3, row):
    assert chat.chat_template_of(llama3) == LLAMA3_TEMPLATE
    out = preference_rows([row], llama3, max_length=160, max_prompt_length=128)
    _check_layout(out, 1, 160)
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    for s in SIDES:
        mask = out[f"{s}_loss_mask"][0] == 1
        targets = out[f"{s}_targets"][0][mask]
        assert llama3.decode(targets) == _reply(row[s]).strip() + "<|eot_id|>"
        assert targets[-1] == eot  # the end-of-turn token is trained, as one special token
        first = int(np.argmax(mask))
        prompt = llama3.decode(out[f"{s}_inputs"][0][: first + 1])
        assert prompt == chat.chat_prompt(_prompt_messages(row), llama3)
        assert prompt.startswith("<|endoftext|><|start_header_id|>")  # the template's bos


def test_truncation_keeps_prompt_end_and_response_start(gpt2):
    row = {"prompt": "one two three four five six seven eight nine ten",
           "chosen": "alpha beta gamma delta", "rejected": "epsilon zeta eta theta"}
    prompt_text = chat.chat_prompt([{"role": "user", "content": row["prompt"]}], gpt2)
    prompt_ids = gpt2(prompt_text, add_special_tokens=False)["input_ids"]
    replies = {s: gpt2(row[s] + "<|im_end|>", add_special_tokens=False)["input_ids"]
               for s in SIDES}
    n_prompt = len(prompt_ids) - 5  # drop the first 5 prompt tokens
    max_length = n_prompt + 2 - 1  # room for the first 2 response tokens
    out = preference_rows([row], gpt2, max_length=max_length, max_prompt_length=n_prompt)
    for s in SIDES:
        ids = [*out[f"{s}_inputs"][0], out[f"{s}_targets"][0][-1]]  # a full row: no padding
        assert out[f"{s}_segment_ids"][0].all()
        assert ids == prompt_ids[5:] + replies[s][:2]
        assert out[f"{s}_loss_mask"][0].tolist() == [0.0] * (n_prompt - 1) + [1.0, 1.0]
    # without truncation nothing is lost
    out = preference_rows([row], gpt2, max_length=100, max_prompt_length=100)
    for s in SIDES:
        mask = out[f"{s}_loss_mask"][0] == 1
        assert out[f"{s}_targets"][0][mask].tolist() == replies[s]
        assert int(np.argmax(mask)) == len(prompt_ids) - 1


def test_response_merging_with_the_prompt_is_tokenized_alone(gpt2):
    # the generation prompt ends in a space that GPT-2 merges into the reply's first word
    tok = copy.deepcopy(gpt2)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    out = preference_rows([{"prompt": "q", "chosen": "yes", "rejected": "no way"}], tok,
                          max_length=16, max_prompt_length=16)
    for s, reply in (("chosen", "yes"), ("rejected", "no way")):
        real, mask = out[f"{s}_segment_ids"][0] == 1, out[f"{s}_loss_mask"][0] == 1
        assert tok.decode(out[f"{s}_targets"][0][mask]) == reply
        assert tok.decode(out[f"{s}_inputs"][0][real]) + tok.decode(
            out[f"{s}_targets"][0][real][-1:]) == "user: q\nassistant: " + reply


def test_pairs_left_without_response_are_dropped(gpt2):
    long = {"prompt": "word " * 40, "chosen": "yes", "rejected": "no",
            "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
    short = {"prompt": "hi", "chosen": "yes", "rejected": "no",
             "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0}
    # prompts of 67 and 28 tokens: the first, cut to its last 64, leaves no room for a
    # response in max_length + 1 = 41 tokens; the second does
    out = preference_rows([long, short], gpt2, max_length=40, max_prompt_length=64)
    assert out["chosen_inputs"].shape == (1, 40)
    assert out["ref_chosen_logps"].tolist() == [-3.0] and out["ref_rejected_logps"].tolist() == [
        -4.0]
    with pytest.raises(ValueError, match="No preference pair is left.*larger max_length"):
        preference_rows([long], gpt2, max_length=40, max_prompt_length=64)


def test_implicit_prompt_from_full_conversations(gpt2):
    prompt = MESSAGES_ROW["prompt"]
    chosen, rejected = MESSAGES_ROW["chosen"], MESSAGES_ROW["rejected"]
    implicit = {"chosen": prompt + chosen, "rejected": prompt + rejected, "id": 7}
    assert to_preference(implicit) == {"prompt": prompt, "chosen": chosen[0]["content"],
                                       "rejected": rejected[0]["content"]}
    # the ultrafeedback_binarized layout: a string prompt and full conversations
    user = [{"role": "user", "content": STRING_ROW["prompt"]}]
    ultra = {"prompt": STRING_ROW["prompt"],
             "chosen": user + [{"role": "assistant", "content": STRING_ROW["chosen"]}],
             "rejected": user + [{"role": "assistant", "content": STRING_ROW["rejected"]}]}
    assert to_preference(ultra) == {"prompt": user, "chosen": STRING_ROW["chosen"],
                                    "rejected": STRING_ROW["rejected"]}
    a = preference_rows([implicit, ultra], gpt2, max_length=160, max_prompt_length=128)
    b = preference_rows([MESSAGES_ROW, STRING_ROW], gpt2, max_length=160, max_prompt_length=128)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


USER = [{"role": "user", "content": "q"}]
ASSISTANT = [{"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "q", "rejected": "b"}, "chosen", "is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "rejected", "is a int, not a string"),
    ({"prompt": "q", "chosen": " \n", "rejected": "b"}, "chosen", "is an empty response"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"},
     "chosen", "is an empty response"),
    ({"prompt": {"text": "q"}, "chosen": "a", "rejected": "b"}, "prompt", "is a dict"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "is missing, and 'chosen' and 'rejected'"),
    ({"chosen": USER + ASSISTANT, "rejected": [{"role": "user", "content": "other"}]
      + ASSISTANT}, "rejected", "does not share the turns"),
    ({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "chosen",
     "unknown role 'bot'"),
    ({"prompt": "q", "chosen": USER, "rejected": "b"}, "chosen", "must end with an assistant"),
    ({"prompt": "x", "chosen": USER + ASSISTANT, "rejected": "b"}, "chosen",
     "are not the 'prompt'"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt",
     "item 0 must be a dict with 'role' and 'content'"),
])
def test_malformed_rows_name_row_field_keys_and_formats(gpt2, row, field, problem):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    keys = re.escape(str(sorted(row)))
    with pytest.raises(ValueError, match=rf"Preference row 1 \(keys {keys}\): '{field}' "
                                         rf".*{re.escape(problem)}.*; expected 'prompt'"):
        preference_rows([good, row], gpt2, max_length=32, max_prompt_length=16)


def test_reference_columns_pass_through(gpt2):
    rows = [dict(STRING_ROW, ref_chosen_logps=-1.5, ref_rejected_logps=-2),
            dict(MESSAGES_ROW, ref_chosen_logps=-3.25, ref_rejected_logps=np.float64(-4.0))]
    out = preference_rows(rows, gpt2, max_length=160, max_prompt_length=128)
    assert out["ref_chosen_logps"].dtype == out["ref_rejected_logps"].dtype == np.float32
    assert out["ref_chosen_logps"].tolist() == [-1.5, -3.25]
    assert out["ref_rejected_logps"].tolist() == [-2.0, -4.0]
    partial = [rows[0], STRING_ROW]  # not every row has them: not used
    assert "ref_chosen_logps" not in preference_rows(partial, gpt2, max_length=160,
                                                     max_prompt_length=128)
    bad = [dict(STRING_ROW, ref_chosen_logps="x", ref_rejected_logps=1.0)]
    with pytest.raises(ValueError, match=r"row 0 .*'ref_chosen_logps' is a str, not a number"):
        preference_rows(bad, gpt2, max_length=160, max_prompt_length=128)


ARITHMETIC = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\.$")


def test_builtin_pairs_are_deterministic_right_and_wrong(gpt2):
    examples = builtin_preference_examples(300, 0)
    assert examples == builtin_preference_examples(300, 0)
    assert examples[:50] == builtin_preference_examples(50, 0)
    assert examples != builtin_preference_examples(300, 1)
    user_templates = {t for task in ("add", "subtract") for t in chat.TASK_TEMPLATES[task][0]}
    patterns = [re.compile("^" + re.escape(t).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}",
                                                                                 r"(\d+)") + "$")
                for t in user_templates]
    ops, systems, formats = set(), 0, set()
    for ex in examples:
        *system, user = ex["prompt"]
        systems += bool(system)
        assert not system or system[0]["content"] in chat.SYSTEM_PROMPTS
        assert user["role"] == "user" and any(p.match(user["content"]) for p in patterns)
        [chosen], [rejected] = ex["chosen"], ex["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant"
        a, op, b, c = ARITHMETIC.match(chosen["content"]).groups()
        a, b, c = int(a), int(b), int(c)
        right = a + b if op == "+" else a - b
        assert c == right >= 0 and 0 <= a < 50 and 0 <= b < 50
        assert str(a) in user["content"] and str(b) in user["content"]
        wrong = int(re.findall(r"\d+", rejected["content"])[-1])
        assert wrong != right and 1 <= abs(wrong - right) <= 3
        ops.add(op)
        formats.add(bool(ARITHMETIC.match(rejected["content"])))
    assert ops == {"+", "-"} and formats == {True, False} and 50 < systems < 150
    out = preference_rows(examples, gpt2, max_length=64, max_prompt_length=48)
    assert out["chosen_inputs"].shape == (300, 64)
    assert gpt2.decode(out["chosen_targets"][0][out["chosen_loss_mask"][0] == 1]) == (
        examples[0]["chosen"][0]["content"] + "<|im_end|>")


def test_load_preference_examples(tmp_path):
    train = load_preference_examples("builtin", split="train", seed=3)
    validation = load_preference_examples("builtin", split="validation", seed=3)
    assert len(train) == 2000 and len(validation) == 200
    assert validation == builtin_preference_examples(200, 7)
    assert train[:200] != validation
    assert len(load_preference_examples("builtin", split="train", n=5)) == 5
    with pytest.raises(ValueError, match="splits"):
        load_preference_examples("builtin", split="test")
    path = tmp_path / "pairs.jsonl"
    rows = [dict(MESSAGES_ROW, ref_chosen_logps=-1.0 * i, ref_rejected_logps=-2.0 * i)
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_preference_examples(str(path), split="all")
    assert loaded == rows
    assert len(load_preference_examples(str(path), split="all", n=2)) == 2
