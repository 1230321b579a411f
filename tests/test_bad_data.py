"""Bad data is found when it is loaded (before the step compiles), with a message naming the
file, the row and the problem; ``data.on_bad_row='skip'`` drops exactly the bad rows,
deterministically; too small eval sets draw a warning (jaxtrain.data.sanity, file_lines,
pair_checks and the loaders of every kind)."""

import json
import logging

import datasets
import numpy as np
import pytest
from PIL import Image

import jaxtrain
from jaxtrain.config import ConfigError, apply_rules
from jaxtrain.data import pair_config, pair_rows, pair_sources
from jaxtrain.data.chat import load_chat_examples
from jaxtrain.data.pair_checks import SAMPLE_FIRST, sample_rows
from jaxtrain.data.preference import load_preference_examples
from jaxtrain.data.sources import open_source, split_rows
from jaxtrain.data.text import load_documents
from jaxtrain.tasks import get_task

from .test_lm_task import load_config

S, T = 16, 16
KW = dict(mode="i2t", num_negatives=0, image_size=S, text_max_len=T)
N = 48  # rows of the pair files: 47 train rows and 1 held out (eval_fraction 0.02)


def _cfg(name, **overrides):
    d = pair_config.default_data_config()
    d.update(prefetch=0, name=str(name), tokenizer="gpt2", **overrides)
    return d


@pytest.fixture
def folder(tmp_path):
    """tmp_path with N small PNGs img/0.png ... and a corrupt one, img/corrupt.jpg."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(
            tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage, not a JPEG")
    return tmp_path


def _pairs(path, n=N, image=None, lines=None):
    """A jsonl of n pairs {"image": img/i.png, "text": "picture i"}; `image` maps a row to
    another image path, `lines` a row to raw bytes for its whole line."""
    image, lines = image or {}, lines or {}
    with open(path, "wb") as f:
        for i in range(n):
            row = {"image": image.get(i, f"img/{i % N}.png"), "text": f"picture {i}"}
            f.write(lines.get(i, json.dumps(row).encode()) + b"\n")
    return path


def _texts(part):
    return list(part.examples["text"])


def _load(d, which="train"):
    return pair_sources.load_part(d, which, mode="i2t", num_negatives=0, image_size=S, seed=0)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _batches(d, n):
    it = pair_rows.train_iterator(d, seed=0, batch_size=8, **KW)
    return [next(it) for _ in range(n)]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- files: empty, unparseable lines --------------------------------------------------------


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_an_empty_file_has_no_rows(tmp_path, policy):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "header.csv").write_text("image,text\n")
    for name in ("empty.jsonl", "header.csv"):
        with pytest.raises(ConfigError, match=rf"The data file '.*{name}' has no rows"):
            pair_rows.train_iterator(_cfg(tmp_path / name, on_bad_row=policy), seed=0,
                                     batch_size=8, **KW)
        with pytest.raises(ConfigError, match=rf"'.*{name}' has no rows"):
            load_documents(str(tmp_path / name), on_bad_row=policy)


def test_a_non_utf8_caption_is_named_or_skipped(folder, caplog):
    bad = b'{"image": "img/5.png", "text": "caf\xff\xfe"}'
    path = _pairs(folder / "pairs.jsonl", lines={5: bad})
    with pytest.raises(ConfigError, match=r"Line 6 \(row 5\) of the data file '.*pairs\.jsonl'"
                       r": not UTF-8 text: byte 0xff at byte 35 of the line \(byte \d+ of the "
                       r"file\).*Fix or drop the row, or set data.on_bad_row='skip'"):
        pair_rows.train_iterator(_cfg(path), seed=0, batch_size=8, **KW)
    with caplog.at_level(logging.WARNING):
        d = _cfg(path, on_bad_row="skip")
        part, again = _load(d), _load(d)
    kept = [r for r in range(N - 1) if r != 5]  # row 47 is the held-out one
    assert list(part.rows) == kept and list(again.rows) == kept
    assert _texts(part) == [f"picture {r}" for r in kept] == _texts(again)
    assert list(_load(d, "eval").rows) == [N - 1]
    skipped = [m for m in _warnings(caplog) if "Skipped" in m]
    assert len(skipped) == 1 and "Skipped 1 bad row of the data file" in skipped[0]
    assert "Line 6 (row 5): not UTF-8" in skipped[0] and "47 kept" in skipped[0]
    _same(_batches(d, 7), _batches(d, 7))  # over an epoch boundary


def test_csv_and_jsonl_lines_that_do_not_parse(tmp_path, caplog):
    csv = tmp_path / "docs.csv"
    csv.write_bytes(b"text,source\nzero,a\none,b,extra\ntwo \xe9,c\nthree,d\n")
    with pytest.raises(ConfigError, match=r"Line 3 \(row 1\) of the data file '.*docs\.csv': "
                       r"3 fields, but the header has 2"):
        load_documents(str(csv), split="all")
    assert load_documents(str(csv), split="all", on_bad_row="skip") == ["zero", "three"]
    source = open_source(str(csv), on_bad_row="skip")
    examples, rows = split_rows(source, "all")
    assert list(rows) == [0, 3] and list(examples["source"]) == ["a", "d"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "zero"}\n\n{"text": "one"\n["a list"]\n{"text": "three"}\n')
    with pytest.raises(ConfigError, match=r"Line 3 \(row 1\) of .*docs\.jsonl': not valid JSON"):
        load_documents(str(jsonl), split="all")
    with caplog.at_level(logging.WARNING):
        assert load_documents(str(jsonl), split="all", on_bad_row="skip") == ["zero", "three"]
    [warning] = [m for m in _warnings(caplog) if "docs.jsonl" in m]
    assert "Skipped 2 bad rows" in warning and "Line 4 (row 2): a JSON list, not an object" \
        in warning
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (folder / "validation.jsonl").write_text('{"text": "c"}\n{"text": \n')
    for policy in ("error", "skip"):  # lines inside a directory's files are not dropped
        with pytest.raises(ConfigError, match=r"Line 2 \(row 1\) of the file 'validation\.jsonl'"
                           r" in the dataset directory '.*folder': not valid JSON"):
            load_documents(str(folder), on_bad_row=policy)
    everything_bad = tmp_path / "bad.jsonl"
    everything_bad.write_text("{\n")
    with pytest.raises(ConfigError, match="Every row of the data file '.*bad.jsonl' is bad"):
        load_documents(str(everything_bad), on_bad_row="skip")


# --- pairs: cells and images, checked before any batch --------------------------------------


def test_missing_and_corrupt_images_are_found_when_the_data_is_loaded(folder, caplog):
    path = _pairs(folder / "pairs.jsonl", image={3: "img/corrupt.jpg", 7: "img/99.png"})
    with pytest.raises(ConfigError, match=r"Row 3 of '.*pairs\.jsonl' \(split 'train' less its "
                       r"held-out end\): the query image in column 'image' cannot be decoded"):
        pair_rows.train_iterator(_cfg(path), seed=0, batch_size=8, **KW)
    only_missing = _pairs(folder / "missing.jsonl", image={7: "img/99.png"})
    with pytest.raises(ConfigError, match=r"Row 7 of .*missing\.jsonl.*'img/99\.png' \(resolved "
                       r"against '.*'\), which does not exist\. Fix or drop the row"):
        pair_rows.eval_batches(_cfg(only_missing, eval_split="train"), batch_size=8, **KW)
    d = _cfg(path, on_bad_row="skip")
    with caplog.at_level(logging.WARNING):
        part = _load(d)
    kept = [r for r in range(N - 1) if r not in (3, 7)]
    assert list(part.rows) == kept and _texts(part) == [f"picture {r}" for r in kept]
    [warning] = [m for m in _warnings(caplog) if "Skipped" in m]
    assert "Skipped 2 bad rows" in warning and "Row 3:" in warning and "Row 7:" in warning
    _same(_batches(d, 3), _batches(d, 3))


def test_wrong_typed_and_missing_cells(folder):
    path = _pairs(folder / "cells.jsonl", lines={2: b'{"image": "img/2.png", "text": 5}',
                                                 4: b'{"image": "img/4.png"}',
                                                 6: b'{"text": "no image"}'})
    with pytest.raises(ConfigError, match=r"Row 2 of .*: the positive text in column 'text' is "
                       r"a int \('5'\), not a string"):
        _load(_cfg(path))
    part = _load(_cfg(path, on_bad_row="skip"))
    assert list(part.rows) == [r for r in range(N - 1) if r not in (2, 4, 6)]


def test_negatives_shorter_than_needed_or_missing_files(folder):
    rows = [{"query": f"img/{i}.png", "positive": f"img/{i + 1}.png",
             "negatives": [f"img/{i + 2}.png", "img/98.png" if i == 1 else f"img/{i + 3}.png"]
             if i != 4 else [f"img/{i + 2}.png"]} for i in range(10)]
    path = folder / "negatives.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(mode="i2i", num_negatives=2, image_size=S, seed=0)
    with pytest.raises(ConfigError, match=r"Row 1 of .*the negatives column 'negatives' has a "
                       r"bad item 1: it is the image file 'img/98\.png'"):
        pair_sources.load_part(_cfg(path, eval_fraction=0.1), "train", **kw)
    part = pair_sources.load_part(_cfg(path, eval_fraction=0.1, on_bad_row="skip"), "train", **kw)
    assert list(part.rows) == [0, 2, 3, 5, 6, 7, 8]  # row 4 has 1 negative, fewer than 2


def test_a_corrupt_image_outside_the_sample(folder, caplog):
    """Found only when its row is prepared: an error naming it, or ('skip') the next row that
    decodes takes its place, the same way every time."""
    unsampled = min(set(range(SAMPLE_FIRST, N - 1)) - set(sample_rows(N - 1, set())))
    path = _pairs(folder / "late.jsonl", image={unsampled: "img/corrupt.jpg"})
    rows, prepare = pair_rows.build_rows(_cfg(path), which="train", **KW, seed=0)
    assert len(rows) == N - 1  # passed the up-front checks
    with pytest.raises(ValueError, match=rf"Row {unsampled} of .*cannot decode"):
        prepare(0, rows[unsampled])
    rows, prepare = pair_rows.build_rows(_cfg(path, on_bad_row="skip"), which="train", **KW,
                                         seed=0)
    with caplog.at_level(logging.WARNING):
        _same([prepare(0, rows[unsampled])], [prepare(0, rows[unsampled + 1])])
    assert any(f"row {unsampled + 1} of" in m and "is used in place of a bad row" in m
               for m in _warnings(caplog))
    d = _cfg(path, on_bad_row="skip")
    _same(_batches(d, 12), _batches(d, 12))  # two epochs: the row is met twice


# --- eval sets ------------------------------------------------------------------------------


def test_too_small_an_eval_split_warns_and_an_empty_one_is_an_error(folder, tmp_path, caplog):
    path = _pairs(folder / "small.jsonl")
    with caplog.at_level(logging.WARNING):
        batches = list(pair_rows.eval_batches(_cfg(path), batch_size=8, **KW))
    assert sum(int(b["valid"].sum()) for b in batches) == 1
    [warning] = [m for m in _warnings(caplog) if "small.jsonl" in m]
    assert "held-out rows 47-47) has only 1 pair (fewer than 50)" in warning
    for how in ("data.eval_split", "data.eval_fraction", "evals.<name>.source"):
        assert how in warning
    caplog.clear()
    big = _pairs(folder / "big.jsonl", n=120)
    with caplog.at_level(logging.WARNING):
        pair_rows.eval_batches(_cfg(big, eval_fraction=0.5), batch_size=8, **KW)
    assert not [m for m in _warnings(caplog) if "big.jsonl" in m]

    features = datasets.Features({"query": datasets.Value("string"),
                                  "positive": datasets.Value("string")})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"query": ["a", "b"], "positive": ["c", "d"]},
                                            features=features),
        "validation": datasets.Dataset.from_dict({"query": [], "positive": []},
                                                 features=features),
    }).save_to_disk(str(tmp_path / "saved"), num_shards={"train": 1, "validation": 1})
    with pytest.raises(ConfigError, match=r"'.*saved' \(split 'validation'\) has no rows"):
        pair_rows.eval_batches(_cfg(tmp_path / "saved"), batch_size=8,
                               **{**KW, "mode": "t2t"})


def test_an_lm_eval_set_too_small_warns(tmp_path, caplog):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n"
                            for i in range(30)))
    c = load_config("lm", data__source=str(path), data__seq_len=32)
    task = get_task("lm")(c)
    with caplog.at_level(logging.WARNING):
        next(task.heldout_batches(batch_size=8, process_index=0, process_count=1))
    [warning] = [m for m in _warnings(caplog) if "docs.jsonl" in m]
    assert "(split 'validation') has only" in warning and "data.eval_source" in warning


# --- the other kinds' rows ------------------------------------------------------------------


def test_text_chat_and_preference_rows(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"text": "a"}\n{"text": 7}\n{"text": "b"}\n{"text": ["c"]}\n')
    with pytest.raises(ConfigError, match=r"Row 1 of '.*docs\.jsonl' \(split 'all'\): the text "
                       "field 'text' holds a int"):
        load_documents(str(docs), split="all")
    assert load_documents(str(docs), split="all", on_bad_row="skip") == ["a", "b"]

    chat = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    rows = [good, {"messages": [{"role": "user", "content": "no reply"}]}, good,
            {"messages": [{"role": "wizard", "content": "?"}]}]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"Row 1 of '.*chat\.jsonl' \(split 'all'\): Cannot "
                       "read a conversation.*no assistant turn.*on_bad_row='skip'"):
        load_chat_examples(str(chat), split="all")
    kept = load_chat_examples(str(chat), split="all", on_bad_row="skip")
    assert kept == [good, good]

    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}
    rows = [good, {"prompt": "1 + 1?", "chosen": "2"}, {**good, "rejected": ""}, good]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"Row 1 of '.*pairs\.jsonl' \(split 'all'\): "
                       r"Preference row 1 .*'rejected' is missing"):
        load_preference_examples(str(pairs), split="all")
    assert load_preference_examples(str(pairs), split="all", on_bad_row="skip") == [good, good]


def test_on_bad_row_is_validated_for_every_task():
    for name in ("clip", "lm", "dpo"):
        task = get_task(name)
        c = task.default_config()
        assert c.data.on_bad_row == "error"
        apply_rules(c, task.config_rules())
        c.data.on_bad_row = "ignore"
        with pytest.raises(ConfigError, match=r"'data\.on_bad_row' must be 'error' .* or "
                           r"'skip'.*got 'ignore'"):
            apply_rules(c, task.config_rules())


# --- one run ------------------------------------------------------------------------------


def test_train_stops_before_compiling_or_skips(folder):
    path = _pairs(folder / "train.jsonl", image={2: "img/404.png"})
    c = load_config("clip", "runlocal", train__steps=2, train__batch_size=8,
                    eval__batch_size=8, eval__every=0, checkpoint__every=0,
                    optim__warmup_steps=0)
    c.data.update(name=str(path), tokenizer="gpt2", prefetch=0)
    c.model.vocab_size = 50304  # the default evaluators kept: zero_shot is off for these data
    with pytest.raises(ConfigError, match=r"Row 2 of '.*train\.jsonl'.*'img/404\.png'"):
        jaxtrain.train(c, str(folder / "run_error"))
    c.data.on_bad_row = "skip"
    result = jaxtrain.train(c, str(folder / "run_skip"))
    assert result.final_step == 2
