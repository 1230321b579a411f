"""data.streaming: local datasets in streaming mode (load_dataset('json', ..., streaming=True)):
rows equal the in-memory concat rows, resume equals uninterrupted, per-host shards."""

import json

import numpy as np
import pytest

from jaxtrain.data import sources, streaming, text
from jaxtrain.data.tokenizers import load_tokenizer
from jaxtrain.errors import ConfigError

SEQ = 16


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "king", "sea", "of", "light", "and", "night", "stone", "river", "a"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(120)]
    docs[7] = ""  # empty documents are skipped
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path, docs


def _open(path, split="all"):
    return lambda: streaming.open_stream(sources.open_source(str(path)), split)


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_streamed_rows_equal_in_memory_concat_rows(corpus, gpt2):
    path, docs = corpus
    want = text.pretrain_rows([d for d in docs if d], gpt2, seq_len=SEQ, mode="concat")
    got = streaming.take_rows(_open(path)(), gpt2, seq_len=SEQ)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The held-out rule of an undivided source, and slices, streamed as in memory.
    heldout = text.load_documents(str(path), split="validation")
    got = streaming.take_rows(_open(path, "validation")(), gpt2, seq_len=4)
    np.testing.assert_array_equal(
        got["inputs"], text.pretrain_rows(heldout, gpt2, seq_len=4)["inputs"])
    sliced = streaming.take_rows(_open(path, "all[10:40]")(), gpt2, seq_len=SEQ)
    np.testing.assert_array_equal(
        sliced["inputs"], text.pretrain_rows(docs[10:40], gpt2, seq_len=SEQ)["inputs"])


def test_streams_folder_splits_and_subsets_without_loading_them(tmp_path, gpt2):
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(30)]
    root = tmp_path / "corpus"
    for subset in ("en", "de"):
        (root / subset).mkdir(parents=True)
        for name, part in (("train-00000", docs[:15]), ("train-00001", docs[15:]),
                           ("validation", docs[:4]), ("ultrachat", docs[5:9])):
            (root / subset / f"{name}.jsonl").write_text(
                "".join(json.dumps({"text": f"{subset} {d}"}) + "\n" for d in part))
    for split, want in (("train", docs), ("validation", docs[:4]), ("ultrachat[1:3]", docs[6:8])):
        source = sources.open_source(str(root), subset="de")
        got = streaming.take_rows(streaming.open_stream(source, split), gpt2, seq_len=8)
        assert "_splits" not in source.__dict__, split  # streamed: the folder was not loaded
        ref = text.pretrain_rows([f"de {d}" for d in want], gpt2, seq_len=8)
        np.testing.assert_array_equal(got["inputs"], ref["inputs"], err_msg=split)


def test_resume_equals_uninterrupted_across_epochs(corpus, gpt2):
    path, _ = corpus
    make = lambda: streaming.StreamingIterator(_open(path, "all[:40]"), gpt2,  # noqa: E731
                                               seq_len=SEQ, batch_size=4)
    one_epoch = len(streaming.take_rows(_open(path, "all[:40]")(), gpt2, seq_len=SEQ)["inputs"])
    n = 2 * one_epoch // 4 + 3  # past the end of the stream twice
    it = make()
    full = [next(it) for _ in range(n)]
    assert it.state["epoch"] == 2  # in the third pass
    for cut in (1, n // 2, n - 2):
        first = make()
        head = [next(first) for _ in range(cut)]
        state = first.get_state()  # bytes, as the checkpoint stores them
        resumed = make()
        resumed.set_state(state)
        _same_batches(head + [next(resumed) for _ in range(n - cut)], full)
    rows = np.concatenate([b["inputs"] for b in full])  # the second pass repeats the first
    np.testing.assert_array_equal(rows[one_epoch:], rows[: len(rows) - one_epoch])


def test_hosts_read_disjoint_parts_and_resume(corpus, gpt2):
    path, docs = corpus
    hosts = [streaming.StreamingIterator(_open(path), gpt2, seq_len=SEQ, batch_size=2,
                                         process_index=h, process_count=2) for h in range(2)]
    # Host h reads examples h, h+2, ... (one shard, two hosts): its rows are those documents'.
    for h, it in enumerate(hosts):
        want = text.pretrain_rows([d for d in docs[h::2] if d], gpt2, seq_len=SEQ, mode="concat")
        got = [next(it) for _ in range(3)]
        np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in got]),
                                      want["inputs"][:6])
    state = json.loads(hosts[1].get_state())
    assert state["process_count"] == 2 and state["example"] > 0
    again = streaming.StreamingIterator(_open(path), gpt2, seq_len=SEQ, batch_size=2,
                                        process_index=1, process_count=2)
    again.set_state(hosts[1].get_state())
    _same_batches([next(again)], [next(hosts[1])])
    single = streaming.StreamingIterator(_open(path), gpt2, seq_len=SEQ, batch_size=2)
    with pytest.raises(ConfigError, match="saved by 2 hosts and resumes on 1"):
        single.set_state(json.dumps(state).encode())


def test_streaming_errors(corpus, gpt2, tmp_path):
    path, _ = corpus
    with pytest.raises(ConfigError, match="only absolute, non-negative slices"):
        streaming.open_stream(sources.open_source(str(path)), "train[:10%]")
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "a b"}) + "\n")
    it = streaming.StreamingIterator(_open(tiny), gpt2, seq_len=SEQ, batch_size=1)
    with pytest.raises(ConfigError, match="no row of 16 \\+ 1 tokens in a whole pass"):
        next(it)
    with pytest.raises(ConfigError, match="'body' is not a column.*'id', 'text'"):
        next(streaming.StreamingIterator(_open(path), gpt2, seq_len=SEQ, batch_size=1,
                                         text_field="body"))


@pytest.mark.slow
def test_lm_trainer_streaming_resume_equals_uninterrupted(corpus, tmp_path):
    import jax

    from jaxtrain import Trainer

    from .test_lm_task import assert_resumed_equals_straight, load_config

    path, _ = corpus
    kw = dict(data__source=str(path), data__streaming=True, data__seq_len=16,
              data__eval_rows=8, train__steps=6, checkpoint__every=0, eval__every=0,
              model__hidden_size=32, model__num_layers=1, model__num_heads=2,
              model__num_kv_heads=2, model__intermediate_size=64)
    one = jax.devices()[:1]  # the data position is tested, not the sharding: 1 device
    straight = Trainer(load_config("lm", **kw), str(tmp_path / "a"), devices=one).train()
    cut = load_config("lm", **kw)
    Trainer(cut, str(tmp_path / "b"), devices=one).train(stop_at_step=2)
    resumed = Trainer(cut, str(tmp_path / "b"), devices=one).train()
    assert_resumed_equals_straight(resumed, straight, cut=2)
    with pytest.raises(ConfigError, match="streams text and chat data"):
        Trainer(load_config("lm", **kw, data__kind="synthetic"), str(tmp_path / "c"),
                devices=one).train()
