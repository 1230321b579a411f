"""data.streaming for chat SFT and preference data: streamed rows equal the in-memory rows of the
same local jsonl, in order; resume equals uninterrupted; bad rows, packing and precomputed
references are handled as documented."""

import json

import ml_collections
import numpy as np
import pytest

from jaxtrain.data import chat, preference, sources, streaming, streaming_chat
from jaxtrain.data.tokenizers import load_tokenizer
from jaxtrain.errors import ConfigError

SEQ = 64


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chats(tmp_path):
    rng = np.random.default_rng(0)
    words = ["sea", "light", "stone", "river", "night", "king", "a", "of"]
    rows = []
    for i in range(60):
        say = lambda n: " ".join(rng.choice(words, size=n))  # noqa: E731
        messages = [{"role": "user", "content": say(int(rng.integers(1, 8)))},
                    {"role": "assistant", "content": say(int(rng.integers(1, 12)))}]
        if i % 7 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        if i % 11 == 0:  # assistant beyond seq_len + 1 tokens: truncated away, dropped
            messages[-2]["content"] = say(80)
        if i % 13 == 5:  # the assistant turn truncated: kept
            messages[-1]["content"] = say(80)
        rows.append({"messages": messages})
    return _write(tmp_path / "chat.jsonl", rows), rows


def _chat_config(**kw):
    return ml_collections.ConfigDict(dict(
        kind="chat", source="", eval_source="", split="train", eval_split="", subset="",
        text_fields="", seq_len=SEQ, packing=False, max_documents=0, train_examples=40,
        eval_examples=8, eval_rows=0, on_bad_row="error", streaming=True) | kw)


def _open(path, split="all"):
    return lambda: streaming.open_stream(sources.open_source(str(path)), split)


def _assert_rows(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _resume_equals_uninterrupted(make, n):
    full = [next(it) for it in [make()] for _ in range(n)]
    for cut in (1, n // 2, n - 1):
        first = make()
        head = [next(first) for _ in range(cut)]
        resumed = make()
        resumed.set_state(first.get_state())
        for x, y in zip(head + [next(resumed) for _ in range(n - cut)], full, strict=True):
            _assert_rows(x, y)
    return full


def test_streamed_chat_rows_equal_in_memory_rows(chats, gpt2):
    path, rows = chats
    want = chat.sft_rows(chat.load_chat_examples(str(path), split="all"), gpt2, seq_len=SEQ,
                         packing=False)
    data = _chat_config(source=str(path))
    got = streaming.take(_open(path)(), streaming.example_rows(
        streaming_chat.chat_row_of(data, gpt2, "test")))
    assert len(got["inputs"]) == 60 - len(range(0, 60, 11))  # the long prompts were dropped
    _assert_rows(got, want)
    # The held-out split of an undivided source (every 50th) and data.eval_rows, as in memory.
    heldout = chat.sft_rows(chat.load_chat_examples(str(path), split="validation"), gpt2,
                            seq_len=SEQ, packing=False)
    _assert_rows(streaming_chat.chat_heldout_rows(data, gpt2), heldout)
    first = streaming_chat.chat_heldout_rows(data, gpt2, source=str(path))
    few = streaming_chat.chat_heldout_rows(_chat_config(source=str(path), eval_rows=5), gpt2,
                                           source=str(path))
    _assert_rows(few, {k: v[:5] for k, v in first.items()})


def test_streamed_chat_resume_and_builtin(chats, gpt2):
    path, _ = chats
    data = _chat_config(source=str(path), split="train[:12]")
    make = lambda: streaming_chat.chat_train_iterator(  # noqa: E731
        data, gpt2, batch_size=4, process_index=0, process_count=1)
    full = _resume_equals_uninterrupted(make, 7)  # 10 rows a pass: past its end twice
    inputs = np.concatenate([b["inputs"] for b in full])
    np.testing.assert_array_equal(inputs[10:20], inputs[:10])
    # The built-in conversations: those load_chat_examples generates (seed, sizes).
    builtin = _chat_config(source="builtin")
    it = streaming_chat.chat_train_iterator(builtin, gpt2, batch_size=40, process_index=0,
                                            process_count=1, seed=3)
    want = chat.sft_rows(chat.load_chat_examples("builtin", n=40, seed=3), gpt2, seq_len=SEQ,
                         packing=False)
    got = next(it)
    n = len(want["inputs"])
    _assert_rows({k: v[:n] for k, v in got.items()}, want)
    assert it.state["epoch"] == (n < 40)


def test_streamed_chat_errors_and_bad_rows(chats, gpt2, tmp_path):
    path, rows = chats
    with pytest.raises(ConfigError, match="data.packing=True: packing places conversations"):
        streaming_chat.chat_train_iterator(_chat_config(source=str(path), packing=True), gpt2,
                                           batch_size=2, process_index=0, process_count=1)
    bad = _write(tmp_path / "bad.jsonl", [rows[1], {"messages": [{"role": "user",
                                                                  "content": "hi"}]}, rows[2]])
    with pytest.raises(ConfigError, match="Streamed example 1 of .*no assistant turn"):
        next(streaming_chat.chat_train_iterator(_chat_config(source=str(bad)), gpt2,
                                                batch_size=2, process_index=0, process_count=1))
    it = streaming_chat.chat_train_iterator(_chat_config(source=str(bad), on_bad_row="skip"),
                                            gpt2, batch_size=2, process_index=0, process_count=1)
    want = chat.sft_rows([rows[1], rows[2]], gpt2, seq_len=SEQ, packing=False)
    _assert_rows(next(it), want)


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(1)
    words = ["one", "two", "three", "four", "five", "yes", "no", "maybe"]
    rows = []
    for i in range(60):
        say = lambda n: " ".join(rng.choice(words, size=n))  # noqa: E731
        prompt = say(int(rng.integers(1, 30)))  # some longer than max_prompt_length
        row = {"prompt": [{"role": "user", "content": prompt}] if i % 3 else prompt,
               "chosen": say(int(rng.integers(1, 20))), "rejected": say(int(rng.integers(1, 9))),
               "ref_chosen_logps": float(-i), "ref_rejected_logps": float(-2 * i)}
        rows.append(row)
    return _write(tmp_path / "pairs.jsonl", rows), rows


def _pref_config(**kw):
    return ml_collections.ConfigDict(dict(
        source="", eval_source="", split="train", eval_split="", subset="", max_length=32,
        max_prompt_length=12, max_documents=0, train_examples=40, eval_examples=8, eval_rows=0,
        on_bad_row="error", streaming=True) | kw)


def test_streamed_preference_rows_equal_in_memory_rows_and_resume(pairs, gpt2):
    path, rows = pairs
    data = _pref_config(source=str(path), split="all")
    want = preference.preference_rows(preference.load_preference_examples(str(path), split="all"),
                                      gpt2, max_length=32, max_prompt_length=12)
    for reference in (True, False):
        got = streaming.take(_open(path)(), streaming.example_rows(
            streaming_chat.preference_row_of(data, gpt2, "test", reference_logps=reference)))
        _assert_rows(got, want if reference else
                     {k: v for k, v in want.items() if k not in preference.REF_KEYS})
    assert len(want["chosen_inputs"]) == 60
    make = lambda: streaming_chat.preference_train_iterator(  # noqa: E731
        _pref_config(source=str(path), split="all[:9]"), gpt2, batch_size=4, process_index=0,
        process_count=1, reference_logps=True)
    full = _resume_equals_uninterrupted(make, 6)
    got = np.concatenate([b["chosen_inputs"] for b in full])[:9]
    np.testing.assert_array_equal(got, want["chosen_inputs"][:9])
    held = streaming_chat.preference_heldout_rows(_pref_config(source=str(path), eval_rows=4),
                                                  gpt2, source=str(path))
    _assert_rows(held, {k: v[:4] for k, v in want.items() if k not in preference.REF_KEYS})


def test_streamed_preference_builtin_and_precomputed_without_columns(gpt2):
    data = _pref_config(source="builtin")
    it = streaming_chat.preference_train_iterator(data, gpt2, batch_size=40, process_index=0,
                                                  process_count=1, seed=2)
    want = preference.preference_rows(preference.load_preference_examples("builtin", n=40,
                                                                          seed=2),
                                      gpt2, max_length=32, max_prompt_length=12)
    _assert_rows(next(it), want)
    it = streaming_chat.preference_train_iterator(data, gpt2, batch_size=2, process_index=0,
                                                  process_count=1, reference_logps=True)
    with pytest.raises(ConfigError, match="Streamed example 0 .*dpo.reference='precomputed'"):
        next(it)


def test_tasks_stream_chat_and_preference_data(chats, pairs):
    from jaxtrain.tasks.dpo import DPOTask
    from jaxtrain.tasks.lm import LMTask

    from .test_lm_task import load_config

    model = dict(data__max_documents=0, model__hidden_size=16, model__num_layers=1,
                 model__num_heads=2, model__num_kv_heads=2, model__intermediate_size=32)
    kw = dict(data__kind="chat", data__source=str(chats[0]), data__seq_len=SEQ, **model)
    lm_tasks = [LMTask(load_config("lm", **kw, data__streaming=s)) for s in (False, True)]
    kw = dict(data__source=str(pairs[0]), data__max_length=32, data__max_prompt_length=12,
              data__eval_rows=1, init_from="", dpo__reference="none", **model)
    dpo_tasks = [DPOTask(load_config("dpo", **kw, data__streaming=s)) for s in (False, True)]
    for memory, streamed in (lm_tasks, dpo_tasks):
        rows = memory._rows("train")
        batch = next(iter(streamed.train_iterator(seed=0, batch_size=5, process_index=0,
                                                  process_count=1)))
        _assert_rows(batch, {k: v[:5] for k, v in rows.items() if k in batch})
        held = [list(t.heldout_batches(batch_size=2, process_index=0, process_count=1))
                for t in (memory, streamed)]
        assert len(held[0]) == len(held[1]) == 1
        _assert_rows(held[1][0], {k: v for k, v in held[0][0].items() if k in held[1][0]})
