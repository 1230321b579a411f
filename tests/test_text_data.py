"""Tokenizers, text sources, pretraining rows (concat / pack) and the rows cache."""

import itertools
import json
import logging
import os

import grain
import numpy as np
import pytest

from jaxtrain.data import text
from jaxtrain.data.pipeline import eval_batches, train_iterator
from jaxtrain.data.text import (
    ROW_DTYPES,
    ROW_KEYS,
    TokenRows,
    cached_rows,
    load_documents,
    pack_pieces,
    pretrain_rows,
    rows_cache_key,
)
from jaxtrain.data.tokenizers import load_tokenizer, tokenizer_vocab_size


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


class CharTokenizer:
    """Independent reference tokenizer: one id per character (ord + 2), eos = 1."""

    eos_token_id = 1

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [[ord(c) + 2 for c in d] for d in docs]}

    def __len__(self):
        return 130

    def decode(self, ids):
        return "".join("|" if i == 1 else chr(i - 2) for i in ids)


def random_docs(rng, n, max_len):
    letters = np.array(list("abcdefghij"))
    return ["".join(rng.choice(letters, size=int(rng.integers(1, max_len + 1))))
            for _ in range(n)]


def check_row_format(rows):
    assert set(rows) == set(ROW_KEYS)
    shape = rows["inputs"].shape
    for k in ROW_KEYS:
        assert rows[k].shape == shape and rows[k].dtype == ROW_DTYPES[k], k


# ------------------------------------------------------------------------------------------
# Tokenizers


def test_builtin_gpt2_tokenizer_has_gpt2_ids(gpt2):
    assert tokenizer_vocab_size(gpt2) == len(gpt2) == 50257
    assert gpt2.eos_token_id == gpt2.pad_token_id == gpt2.bos_token_id == 50256
    assert gpt2.eos_token == "<|endoftext|>"
    assert gpt2("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert gpt2(" the", add_special_tokens=False)["input_ids"] == [262]
    assert gpt2(" Hello world")["input_ids"] == [18435, 995]
    s = "To be, or not to be: that is the question.\n  Whether 'tis nobler"
    assert gpt2.decode(gpt2(s)["input_ids"]) == s
    assert load_tokenizer("gpt2") is gpt2  # cached per process
    assert gpt2.chat_template is None


def test_tokenizer_errors_are_helpful(tmp_path):
    with pytest.raises(ValueError, match="neither the built-in 'gpt2' nor a local directory"):
        load_tokenizer("some-org/some-tokenizer")  # HF_HUB_OFFLINE=1 in conftest
    with pytest.raises(ValueError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing" / "tok"))
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    # One loader for the data and the checkpoint converters: a missing tokenizer is both a
    # ValueError (a wrong config value) and a FileNotFoundError (jaxtrain.hf.clip's contract).
    from jaxtrain.tokenizer_files import TokenizerNotFoundError

    with pytest.raises(TokenizerNotFoundError, match="no tokenizer files in") as e:
        load_tokenizer(str(tmp_path))
    assert isinstance(e.value, FileNotFoundError)


def test_local_tokenizer_directory_round_trips(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    s = "Now is the winter of our discontent"
    assert tok(s)["input_ids"] == gpt2(s)["input_ids"]
    assert len(tok) == 50257 and tok.eos_token_id == 50256


# ------------------------------------------------------------------------------------------
# concat


def reference_concat(docs, seq_len, eos=1):
    """Loop reference: stream, windows, segments from eos inputs, positions since last eos."""
    stream = [t for d in docs for t in [ord(c) + 2 for c in d] + [eos]]
    n = (len(stream) - 1) // seq_len
    pos, p = [], 0
    for t in stream:
        pos.append(p)
        p = 0 if t == eos else p + 1
    out = {k: [] for k in ROW_KEYS}
    for r in range(n):
        w = stream[r * seq_len : r * seq_len + seq_len + 1]
        seg, segs = 1, []
        for j in range(seq_len):
            if j > 0 and w[j - 1] == eos:
                seg += 1
            segs.append(seg)
        out["inputs"].append(w[:-1])
        out["targets"].append(w[1:])
        out["loss_mask"].append([float(t != eos) for t in w[:-1]])
        out["segment_ids"].append(segs)
        out["positions"].append(pos[r * seq_len : r * seq_len + seq_len])
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", range(6))
def test_concat_rows_match_a_loop_reference(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(1, 40))
    docs = random_docs(rng, int(rng.integers(1, 30)), max_len=int(rng.integers(1, 80)))
    if sum(len(d) + 1 for d in docs) <= seq_len:
        docs = docs * (seq_len + 1)
    rows = pretrain_rows(docs, CharTokenizer(), seq_len=seq_len, mode="concat")
    check_row_format(rows)
    ref = reference_concat(docs, seq_len)
    for k in ROW_KEYS:
        np.testing.assert_array_equal(rows[k], ref[k], err_msg=k)


def test_concat_rows_on_gpt2_reconstruct_the_text(gpt2):
    docs = load_documents("shakespeare", split="validation", max_documents=6)
    rows = pretrain_rows(docs, gpt2, seq_len=128, mode="concat")
    check_row_format(rows)
    stream = "<|endoftext|>".join(docs) + "<|endoftext|>"
    inputs, targets = rows["inputs"].ravel(), rows["targets"].ravel()
    decoded = gpt2.decode(inputs)
    assert len(decoded) > 0.9 * len(stream) and stream.startswith(decoded)
    np.testing.assert_array_equal(targets[:-1], inputs[1:])  # one stream, shifted by one
    is_eos = rows["inputs"] == gpt2.eos_token_id
    np.testing.assert_array_equal(rows["loss_mask"] == 0, is_eos)
    # segments go up exactly after an eos input; positions restart exactly there
    steps = np.diff(rows["segment_ids"], axis=1)
    np.testing.assert_array_equal(steps, is_eos[:, :-1].astype(np.int32))
    assert (rows["segment_ids"][:, 0] == 1).all()
    restart = np.zeros_like(is_eos)
    restart[:, 1:] = is_eos[:, :-1]
    pos = rows["positions"]
    np.testing.assert_array_equal(pos[:, 1:][restart[:, 1:]], 0)
    np.testing.assert_array_equal(np.diff(pos, axis=1)[~restart[:, 1:]], 1)
    # the first token of the stream is at position 0, so continued documents keep counting
    assert pos[0, 0] == 0 and pos[1, 0] == 128 and rows["segment_ids"][1, 0] == 1


def test_too_little_text_for_a_row_is_an_error():
    with pytest.raises(ValueError, match="fewer than one row"):
        pretrain_rows(["abc"], CharTokenizer(), seq_len=8, mode="concat")
    with pytest.raises(ValueError, match="all empty"):
        pretrain_rows(["", ""], CharTokenizer(), seq_len=8, mode="pack")
    with pytest.raises(ValueError, match="Unknown mode"):
        pretrain_rows(["abc"], CharTokenizer(), seq_len=2, mode="stream")


# ------------------------------------------------------------------------------------------
# pack


def reference_pieces(docs, seq_len, eos=1):
    pieces = []
    for d in docs:
        t = [ord(c) + 2 for c in d] + [eos]
        for k in range(0, len(t) - 1, seq_len):
            pieces.append(tuple(t[k : k + seq_len + 1]))
    return pieces


def reference_ffd(sizes, capacity):
    """Plain first-fit decreasing: the number of bins and each bin's items in order."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    bins, free = [], []
    for i in order:
        for b, f in enumerate(free):
            if f >= sizes[i]:
                bins[b].append(i)
                free[b] -= sizes[i]
                break
        else:
            bins.append([i])
            free.append(capacity - sizes[i])
    return bins


def row_segments(rows, r):
    """The pieces of row r, left to right, rebuilt from inputs + the last target."""
    seg = rows["segment_ids"][r]
    out = []
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        assert len(idx) and (np.diff(idx) == 1).all(), "a segment is contiguous"
        np.testing.assert_array_equal(rows["positions"][r, idx], np.arange(len(idx)))
        np.testing.assert_array_equal(rows["targets"][r, idx[:-1]], rows["inputs"][r, idx[1:]])
        out.append((idx, tuple(rows["inputs"][r, idx]) + (rows["targets"][r, idx[-1]],)))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_pack_rows_hold_every_piece_once(seed):
    rng = np.random.default_rng(100 + seed)
    seq_len = int(rng.integers(2, 48))
    docs = random_docs(rng, int(rng.integers(1, 60)), max_len=int(rng.integers(1, 3 * seq_len)))
    docs.append("x" * (2 * seq_len + 3))  # longer than a row: split into pieces
    rows = pretrain_rows(docs, CharTokenizer(), seq_len=seq_len, mode="pack")
    check_row_format(rows)
    expected = reference_pieces(docs, seq_len)
    got, last_ends = [], []
    for r in range(len(rows["inputs"])):
        segs = row_segments(rows, r)
        assert segs and segs[0][0][0] == 0  # rows are filled from the left
        for (a, _), (b, _) in itertools.pairwise(segs):
            assert b[0] == a[-1] + 1  # segments 1, 2, ... in order, back to back
        got += [p for _, p in segs]
        end = segs[-1][0][-1] + 1
        pad = slice(end, seq_len)
        assert (rows["segment_ids"][r, pad] == 0).all() and (rows["loss_mask"][r, pad] == 0).all()
        assert (rows["inputs"][r, pad] == 0).all() and (rows["targets"][r, pad] == 0).all()
        assert (rows["positions"][r, pad] == 0).all()
        assert (rows["loss_mask"][r, :end] == 1).all()
        last_ends.append(end)
    assert sorted(got) == sorted(expected)  # every piece exactly once, none split
    long_pieces = [p for p in expected if set(p[:-1]) == {ord("x") + 2}]
    assert len(long_pieces) >= 3
    # as few rows as a plain first-fit-decreasing packing
    assert len(rows["inputs"]) == len(reference_ffd([len(p) - 1 for p in expected], seq_len))


def test_first_fit_decreasing_matches_a_plain_loop():
    rng = np.random.default_rng(7)
    for _ in range(20):
        capacity = int(rng.integers(1, 30))
        sizes = rng.integers(1, capacity + 1, size=int(rng.integers(1, 200)))
        bins, offsets, slots, n = text._first_fit_decreasing(sizes, capacity)
        ref = reference_ffd(sizes.tolist(), capacity)
        assert n == len(ref)
        for b, items in enumerate(ref):
            assert bins[items].tolist() == [b] * len(items)
            assert slots[items].tolist() == list(range(len(items)))
            assert offsets[items].tolist() == np.cumsum([0] + sizes[items].tolist())[:-1].tolist()


def test_pack_pieces_uses_the_shifted_masks_and_can_leave_pieces_unpacked():
    pieces = [np.array([5, 6, 7, 8]), np.array([9, 10]), np.array([11, 12, 13])]
    masks = [np.array([1, 0, 1, 1]), np.array([0, 1]), np.array([1, 1, 0])]
    rows = pack_pieces(pieces, masks, 5)
    check_row_format(rows)
    # first-fit decreasing: sizes 3, 1, 2 -> piece 0 and piece 2 fill row 0, piece 1 opens row 1
    assert rows["inputs"].tolist() == [[5, 6, 7, 11, 12], [9, 0, 0, 0, 0]]
    assert rows["targets"].tolist() == [[6, 7, 8, 12, 13], [10, 0, 0, 0, 0]]
    assert rows["loss_mask"].tolist() == [[0, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 0, 0, 0, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    single = pack_pieces(pieces, masks, 5, packing=False)
    assert single["inputs"].tolist() == [[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [11, 12, 0, 0, 0]]
    assert single["segment_ids"].max() == 1
    with pytest.raises(ValueError, match="2 to seq_len"):
        pack_pieces([np.arange(7)], None, 5)


def test_pack_on_gpt2_shakespeare_decodes_to_the_documents(gpt2):
    docs = load_documents("shakespeare", split="validation", max_documents=4)
    rows = pretrain_rows(docs, gpt2, seq_len=256, mode="pack")
    check_row_format(rows)
    pieces = [p for r in range(len(rows["inputs"])) for _, p in row_segments(rows, r)]
    # pieces overlap by one token; the pieces of one document, in order, rebuild it
    text_pieces = {gpt2.decode(p) for p in pieces}
    for doc in docs:
        ids = gpt2(doc)["input_ids"] + [gpt2.eos_token_id]
        for k in range(0, len(ids) - 1, 256):
            assert gpt2.decode(ids[k : k + 257]) in text_pieces
    assert sum(len(p) - 1 for p in pieces) == sum(
        len(gpt2(d)["input_ids"]) for d in docs
    )  # every next-token pair once
    assert rows["positions"].max() < 256


# ------------------------------------------------------------------------------------------
# Sources


def test_shakespeare_documents_and_splits():
    train = load_documents("shakespeare")
    validation = load_documents("shakespeare", split="validation")
    plays = load_documents("shakespeare", split="all")
    assert len(train) == len(validation) == len(plays) == 38
    for t, v, p in zip(train, validation, plays, strict=True):
        assert t + v == p and v and t.endswith("\n")
        assert 0.04 < len(v) / len(p) < 0.06
        assert v not in t  # disjoint: the held-out tail is not in the training text
    total = sum(map(len, plays))
    assert 5_000_000 > total > 4_500_000
    joined = "".join(plays)
    assert "**" not in joined and "_" not in joined and "  \n" not in joined
    assert not any(line.startswith("#") for line in joined.splitlines())
    assert "Hamlet" in joined and "To be, or not to be" in joined
    assert load_documents("shakespeare", max_documents=2) == train[:2]
    with pytest.raises(ValueError, match="Unknown split"):
        load_documents("shakespeare", split="test")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_local_jsonl_split_every_50th_row(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": f"doc {i}", "id": i} for i in range(120)])
    train = load_documents(str(path))
    validation = load_documents(str(path), split="validation")
    assert validation == ["doc 49", "doc 99"]
    assert len(train) == 118 and not set(train) & set(validation)
    assert load_documents(str(path), split="all") == [f"doc {i}" for i in range(120)]
    assert load_documents(str(path), max_documents=3) == ["doc 0", "doc 1", "doc 2"]


def test_local_sources_errors_name_the_problem(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"body": "a", "title": "b"}] * 3)
    with pytest.raises(ValueError, match=r"'text'.*docs.jsonl.*\['body', 'title'\]"):
        load_documents(str(path))
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"text": "a"}, {"text": None}, {"text": ""}, {"text": 7}, {"text": "b"}])
    with pytest.raises(ValueError, match="Row 3 .* int"):
        load_documents(str(bad), split="all")
    assert load_documents(str(bad), split="all", max_documents=3) == ["a"]  # empty rows skipped
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="not found locally.*HF_HUB_OFFLINE.*shakespeare"):
        load_documents("some-org/some-dataset")


def test_local_parquet_and_txt_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": ["alpha", "beta", "gamma"]}).to_parquet(
        str(tmp_path / "d.parquet"))
    assert load_documents(str(tmp_path / "d.parquet"), split="all", text_field="content") == [
        "alpha", "beta", "gamma"]
    with pytest.raises(ValueError, match=r"'text'.*\['content'\]"):
        load_documents(str(tmp_path / "d.parquet"))
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(3):
        (txt / f"{i}.txt").write_text(f"line one of {i}\nline two\n")
    docs = load_documents(str(txt), split="all")
    assert sorted(docs) == [f"line one of {i}\nline two\n" for i in range(3)]
    assert load_documents(str(txt), split="validation") == [docs[-1]]
    saved = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
        "validation": datasets.Dataset.from_dict({"text": ["v1"]})})
    saved.save_to_disk(str(tmp_path / "saved"))
    assert load_documents(str(tmp_path / "saved"), split="validation") == ["v1"]
    assert load_documents(str(tmp_path / "saved")) == ["t1", "t2"]


def test_every_kind_reads_one_source_interface(tmp_path):
    """jaxtrain.data.sources: split-named files keep their splits, an undivided source is split
    by row index, built-ins list their splits, and the errors name the fix."""
    import datasets

    from jaxtrain.data import sources

    folder = tmp_path / "split_named"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "t"}])
    write_jsonl(folder / "validation.jsonl", [{"text": "v"}])
    assert load_documents(str(folder), split="validation") == ["v"]
    with pytest.raises(ValueError, match=r"Unknown split 'all'.*\['train', 'validation'\]"):
        load_documents(str(folder), split="all")
    (tmp_path / "d.csv").write_text("text\nx\ny\n")
    assert load_documents(str(tmp_path / "d.csv")) == ["x"]  # the last row is validation
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [{"text": "a"}])
    datasets.Dataset.from_dict({"text": ["b"]}).to_parquet(str(mixed / "b.parquet"))
    with pytest.raises(ValueError, match="mixes file formats"):
        load_documents(str(mixed))
    with pytest.raises(ValueError, match=r"Cannot read the data file .*'\.parquet'"):
        sources.open_source(str(_touch(tmp_path / "bad.xyz")))
    builtin = sources.Builtin("gen", lambda split: [{"text": split}], ("train", "validation"))
    assert sources.read_examples("gen", "validation", builtins={"gen": builtin}) == [
        {"text": "validation"}]
    with pytest.raises(ValueError, match=r"Unknown split 'test'.*\['train', 'validation'\]"):
        sources.read_examples("gen", "test", builtins={"gen": builtin})
    np.testing.assert_array_equal(sources.local_split_indices(120, "validation"), [49, 99])


def _touch(path):
    path.write_text("")
    return path


# ------------------------------------------------------------------------------------------
# TokenRows and the cache


def test_token_rows_feed_grain_and_the_pipeline():
    rows = pretrain_rows(random_docs(np.random.default_rng(0), 40, 30), CharTokenizer(),
                         seq_len=16, mode="pack")
    source = TokenRows(rows)
    assert len(source) == len(rows["inputs"]) and source.seq_len == 16
    np.testing.assert_array_equal(source[-1]["inputs"], rows["inputs"][-1])
    with pytest.raises(IndexError):
        source[len(source)]
    batch = next(train_iterator(source, batch_size=4, seed=0))
    for k in ROW_KEYS:
        assert batch[k].shape == (4, 16) and batch[k].dtype == ROW_DTYPES[k]
    seen = np.concatenate([b["inputs"][b["valid"]] for b in eval_batches(source, batch_size=8)])
    np.testing.assert_array_equal(seen, rows["inputs"])
    assert grain.MapDataset.source(source)[2]["segment_ids"].shape == (16,)
    assert source.num_loss_tokens == int(rows["loss_mask"].sum())


def test_cached_rows_round_trip_and_rebuild_a_corrupt_file(tmp_path, gpt2, caplog):
    docs = load_documents("shakespeare", split="validation", max_documents=2)
    key = rows_cache_key(source="shakespeare", split="validation", tokenizer_name="gpt2",
                         tokenizer=gpt2, seq_len=64, mode="concat", documents=docs)
    assert key["vocab_size"] == 50257
    calls = []

    def build():
        calls.append(1)
        return pretrain_rows(docs, gpt2, seq_len=64, mode="concat")

    first = cached_rows(key, build, str(tmp_path))
    second = cached_rows(key, build, str(tmp_path))
    assert len(calls) == 1
    for k in ROW_KEYS:
        np.testing.assert_array_equal(first[k], second[k])
        assert second[k].dtype == ROW_DTYPES[k]
    [path] = [p for p in os.listdir(tmp_path) if p.endswith(".npz")]
    cached_rows({**key, "seq_len": 65}, lambda: {"inputs": np.zeros((1, 65), np.int32)},
                str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2  # another key, another file; no temp files left
    (tmp_path / path).write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING):
        third = cached_rows(key, build, str(tmp_path))
    assert len(calls) == 2 and "Rebuilding" in caplog.text
    np.testing.assert_array_equal(third["inputs"], first["inputs"])
    assert cached_rows(key, build, str(tmp_path))["inputs"].shape == first["inputs"].shape
    assert len(calls) == 2  # the rebuilt file is good


def test_cache_dir_follows_jaxtrain_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTRAIN_CACHE", str(tmp_path))
    assert text.default_cache_dir() == str(tmp_path / "rows")
    cached_rows({"a": 1}, lambda: {"x": np.arange(3)})
    assert len(os.listdir(tmp_path / "rows")) == 1
    monkeypatch.delenv("JAXTRAIN_CACHE")
    assert text.default_cache_dir() == os.path.expanduser("~/.cache/jaxtrain/rows")
