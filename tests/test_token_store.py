"""Token stores: rows read lazily from an on-disk store equal today's in-memory rows."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxtrain.data import text
from jaxtrain.data.pipeline import train_iterator
from jaxtrain.data.text import ROW_DTYPES, ROW_KEYS, pretrain_rows, shakespeare_documents
from jaxtrain.data.token_store import (
    TokenStore,
    build_token_store,
    open_store,
    store_rows,
    token_dtype,
    write_token_store,
)
from jaxtrain.data.tokenizers import load_tokenizer
from jaxtrain.errors import ConfigError


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


class CharTokenizer:
    """One id per character (ord + 2), eos = 1; ``size`` sets len() (and so the dtype)."""

    eos_token_id = 1

    def __init__(self, size=130):
        self.size = size

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [[ord(c) + 2 for c in d] for d in docs]}

    def __len__(self):
        return self.size

    def get_vocab(self):
        return {chr(i): i + 2 for i in range(128)}


def random_docs(seed, n, max_len):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij"))
    docs = ["".join(rng.choice(letters, size=int(rng.integers(1, max_len + 1))))
            for _ in range(n)]
    docs[3] = ""  # an empty document is dropped, as in memory
    return docs


def assert_rows_equal(lazy, arrays):
    assert len(lazy) == len(arrays["inputs"])
    for i in range(len(lazy)):
        row = lazy[i]
        for k in ROW_KEYS:
            assert row[k].dtype == ROW_DTYPES[k], k
            np.testing.assert_array_equal(row[k], arrays[k][i], err_msg=f"row {i} {k}")
    assert lazy.num_loss_tokens == int(arrays["loss_mask"].sum())


@pytest.mark.parametrize("mode", ["concat", "pack"])
@pytest.mark.parametrize("seq_len", [1, 7, 32])
def test_store_rows_equal_in_memory_rows(tmp_path, mode, seq_len):
    docs = random_docs(0, 60, 80)
    tok = CharTokenizer()
    # small chunks: the stream is written in many pieces
    store = write_token_store(docs, tok, str(tmp_path / "s"), progress=False, chunk_chars=100)
    assert store.num_documents == 59 and store.dtype == np.uint16
    assert_rows_equal(store_rows(store, seq_len, mode),
                      pretrain_rows(docs, tok, seq_len=seq_len, mode=mode))


@pytest.mark.parametrize("mode", ["concat", "pack"])
def test_shakespeare_store_equals_in_memory_rows_with_gpt2(tmp_path, gpt2, mode):
    docs = shakespeare_documents("validation")
    store = write_token_store(docs, gpt2, str(tmp_path / "s"), progress=False)
    assert store.dtype == np.uint16  # 50257 ids fit 16 bits: 2 bytes per token
    assert os.path.getsize(os.path.join(store.path, "tokens.bin")) == 2 * store.num_tokens
    assert_rows_equal(store_rows(store, 64, mode), pretrain_rows(docs, gpt2, seq_len=64,
                                                                 mode=mode))
    if mode == "pack":  # the plan is cached beside the store and read back
        assert os.path.exists(os.path.join(store.path, "pack-64.npz"))
        assert_rows_equal(store_rows(TokenStore(store.path), 64, mode),
                          pretrain_rows(docs, gpt2, seq_len=64, mode=mode))


def test_uint32_when_the_vocabulary_does_not_fit_16_bits(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    docs = random_docs(1, 20, 30)
    tok = CharTokenizer(size=70000)
    store = write_token_store(docs, tok, str(tmp_path / "s"), progress=False)
    assert store.dtype == np.uint32 and store.meta["dtype"] == "uint32"
    assert os.path.getsize(os.path.join(store.path, "tokens.bin")) == 4 * store.num_tokens
    assert_rows_equal(store_rows(store, 16, "concat"),
                      pretrain_rows(docs, tok, seq_len=16, mode="concat"))


def test_parallel_workers_write_the_same_store(tmp_path):
    docs = random_docs(2, 200, 60)
    tok = CharTokenizer()
    one = write_token_store(docs, tok, str(tmp_path / "a"), progress=False, chunk_chars=500)
    two = write_token_store(docs, tok, str(tmp_path / "b"), progress=False, chunk_chars=500,
                            workers=2)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(two.tokens))
    np.testing.assert_array_equal(one.offsets, two.offsets)


def test_rows_pickle_without_their_tokens(tmp_path):
    docs = random_docs(3, 400, 80)
    store = write_token_store(docs, CharTokenizer(), str(tmp_path / "s"), progress=False)
    rows = store_rows(store, 16, "concat")
    _ = rows[0]  # opens the memmap
    blob = pickle.dumps(rows)
    assert len(blob) < store.num_tokens  # the offsets, not the tokens, travel to workers
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[5]["inputs"], rows[5]["inputs"])


def lm_config(tmp_path, **data):
    from jaxtrain.tasks.lm import LMTask

    c = LMTask.default_config()
    c.data.update({**dict(source="shakespeare", max_documents=4, seq_len=32,
                          cache_dir=str(tmp_path / "cache")), **data})
    return c


@pytest.mark.parametrize("mode", ["concat", "pack"])
def test_resume_mid_epoch_on_a_store_gives_the_same_batches(tmp_path, gpt2, mode):
    c = lm_config(tmp_path, mode=mode)
    rows = store_rows(open_store(c.data, gpt2, "train"), 32, mode)
    full = train_iterator(rows, batch_size=4, seed=0)
    batches = [next(full) for _ in range(len(rows) // 4 + 3)]  # past an epoch boundary
    resumed = train_iterator(rows, batch_size=4, seed=0)
    for _ in range(5):
        next(resumed)
    state = resumed.get_state()
    fresh = train_iterator(store_rows(TokenStore(rows.store.path), 32, mode), batch_size=4,
                           seed=0)
    fresh.set_state(state)
    for expected in batches[5:]:
        got = next(fresh)
        for k in ROW_KEYS:
            np.testing.assert_array_equal(got[k], expected[k])
    memory = text.TokenRows(pretrain_rows(
        text.load_documents("shakespeare", max_documents=4), gpt2, seq_len=32, mode=mode))
    first = next(train_iterator(memory, batch_size=4, seed=0))
    for k in ROW_KEYS:  # and a run from the store sees what an in-memory run sees
        np.testing.assert_array_equal(first[k], batches[0][k])


def test_stale_store_errors_at_an_explicit_path_and_prepare_rebuilds_it(tmp_path, gpt2):
    shared = str(tmp_path / "shared")
    c = lm_config(tmp_path, token_store=shared)
    paths = build_token_store(c, shared, workers=0)
    assert paths == [os.path.join(shared, "train"), os.path.join(shared, "validation")]
    before = open_store(c.data, gpt2, "train").num_documents
    assert before == 4
    c.data.max_documents = 2  # other data, same explicit folder
    with pytest.raises(ConfigError, match=r"was built for other data: its max_documents differ"):
        open_store(c.data, gpt2, "train")
    build_token_store(c, shared, workers=0)
    assert open_store(c.data, gpt2, "train").num_documents == 2
    with open(os.path.join(shared, "train", "store.json")) as f:
        meta = json.load(f)
    assert meta["key"]["tokenizer"] == "gpt2" and meta["key"]["source"] == "shakespeare"
    other = tmp_path / "other.jsonl"  # an eval's own source: not the shared folder's store
    other.write_text("".join(json.dumps({"text": f"line {i} " * 30}) + "\n" for i in range(9)))
    store = open_store(c.data, gpt2, "validation", str(other))
    assert not store.path.startswith(shared) and store.key["split"] == "all"


def test_default_store_is_keyed_so_changed_data_gets_a_new_store(tmp_path, gpt2):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n"
                           for i in range(60)))
    c = lm_config(tmp_path, source=str(src), max_documents=0)
    first = open_store(c.data, gpt2, "train")
    assert open_store(c.data, gpt2, "train").path == first.path  # reused
    src.write_text(src.read_text() + json.dumps({"text": "one more"}) + "\n")
    os.utime(src, ns=(1, 1))  # the source fingerprint sees size and mtime
    second = open_store(c.data, gpt2, "train")
    assert second.path != first.path and second.num_documents == first.num_documents + 1


def test_concurrent_builders_keep_the_first_store(tmp_path):
    out = str(tmp_path / "s")
    first = write_token_store(random_docs(5, 10, 10), CharTokenizer(), out, progress=False)
    again = write_token_store(random_docs(6, 30, 10), CharTokenizer(), out, progress=False,
                              replace=False)  # lost the race: the first one stays
    assert again.num_documents == first.num_documents
    assert os.listdir(tmp_path) == ["s"]  # no temp dir left behind


def test_a_corrupt_store_is_a_clear_error(tmp_path):
    store = write_token_store(random_docs(4, 10, 10), CharTokenizer(), str(tmp_path / "s"),
                              progress=False)
    with open(os.path.join(store.path, "tokens.bin"), "ab") as f:
        f.write(b"xx")
    with pytest.raises(ConfigError, match="is inconsistent.*delete it and build it again"):
        TokenStore(store.path)


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from jaxtrain.data.pipeline import train_iterator
    from jaxtrain.data.token_store import TokenStore, store_rows
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = store_rows(TokenStore(sys.argv[1]), 128, sys.argv[2])
    rows[0]
    base = peak()
    for i in range(len(rows)):  # every row: every token of the store is read
        rows[i]
    direct = peak() - base
    it = train_iterator(rows, batch_size=64, seed=0)
    for _ in range(len(rows) // 64):  # an epoch through grain, as training reads it
        next(it)
    print(direct, peak() - base)
""")


@pytest.mark.slow
def test_iterating_a_store_keeps_rss_bounded(tmp_path):
    """An epoch over a 12 MB uint16 store (6M tokens; 120 MB as in-memory rows) grows the
    process's peak RSS by < 2 MiB when every row is read (rows are read with pread: the
    kernel's page cache is not the process's RSS), and by < 64 MiB through grain's shuffled
    batches (grain's own buffers, measured the same for a source of constant rows)."""
    num_tokens = 6_000_000
    rng = np.random.default_rng(0)
    path = tmp_path / "s"
    path.mkdir()
    rng.integers(2, 50000, num_tokens, dtype=np.uint16).tofile(path / "tokens.bin")
    lengths = rng.integers(200, 5000, num_tokens // 1000)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = offsets[offsets < num_tokens]
    offsets = np.append(offsets, num_tokens).astype(np.int64)
    np.save(path / "offsets.npy", offsets)
    (path / "store.json").write_text(json.dumps({
        "dtype": "uint16", "num_tokens": num_tokens, "num_documents": len(offsets) - 1}))
    for mode in ("concat", "pack"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), mode],
                             capture_output=True, text=True, timeout=600, check=True)
        direct, through_grain = (int(v) for v in out.stdout.split()[-2:])
        print(f"{mode}: peak RSS grew by {direct / 2**20:.1f} MiB reading every row, "
              f"{through_grain / 2**20:.1f} MiB over a grain epoch")
        assert direct < 2 << 20, (mode, direct)
        assert through_grain < 64 << 20, (mode, through_grain)
