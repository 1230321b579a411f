"""Prepared shards (jaxtrain.data.shards, prepared_pairs, prepare): records round-trip, training
on prepared shards sees the batches of the raw files, settings mismatches are errors."""

import io
import json
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from jaxtrain.config import ConfigError
from jaxtrain.data import pair_rows, prepared_pairs
from jaxtrain.data.pair_writer import prepare_pairs
from jaxtrain.data.shards import ShardRows, ShardWriter, decode_record, encode_record
from tests.pair_helpers import assert_same_batches, data_config, take

S, T = 16, 16
KW = dict(mode="i2t", num_negatives=0, image_size=S, text_max_len=T)


def _jpeg(rng, h, w) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    img = (base + 60 * np.sin(x[..., None] / rng.uniform(2, 6) + np.arange(3))
           + 40 * np.cos(y[..., None] / rng.uniform(2, 6))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A jsonl of 20 JPEG files (14-70 px, some > 2x the crop: decoded with draft) + captions."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for i in range(20):
        (root / "img" / f"{i}.jpg").write_bytes(_jpeg(rng, int(rng.integers(14, 70)),
                                                      int(rng.integers(14, 70))))
        rows.append({"image": f"img/{i}.jpg", "text": f"picture number {i}"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(**overrides):
    return data_config(**{"tokenizer": "gpt2", "eval_fraction": 0.2, **overrides})


def test_record_roundtrip_and_shards(tmp_path):
    row = {"image": np.arange(24, dtype=np.uint8).reshape(2, 4, 3), "text": "a caption é",
           "negatives": [np.ones((1, 2), np.float32), b"\xff\xd8jpeg"], "n": 3,
           "meta": {"ids": np.asarray([1, 2], np.int64)}}
    back = decode_record(encode_record(row))
    np.testing.assert_array_equal(back["image"], row["image"])
    assert back["image"].dtype == np.uint8 and back["text"] == row["text"] and back["n"] == 3
    assert back["negatives"][1] == b"\xff\xd8jpeg"
    np.testing.assert_array_equal(back["negatives"][0], row["negatives"][0])
    np.testing.assert_array_equal(back["meta"]["ids"], [1, 2])
    with pytest.raises(ValueError, match="not a jaxtrain shard record"):
        decode_record(b"nope" + bytes(8))
    w = ShardWriter(str(tmp_path), "train", rows_per_shard=3)
    for i in range(7):
        w.write({"i": i, "x": np.full(2, i, np.uint8)})
    names = w.close()
    assert names == [f"train-0000{k}-of-00003.array_record" for k in range(3)]
    rows = ShardRows([str(tmp_path / n) for n in names])
    assert len(rows) == 7 and [rows[i]["i"] for i in range(7)] == list(range(7))
    sub = rows.subset([5, 1])
    assert [sub[0]["i"], sub[1]["i"]] == [5, 1] and sub[1]["x"].tolist() == [1, 1]


def test_prepared_gives_the_raw_batches(tmp_path, data_file):
    raw = _cfg(name=data_file, hflip=True, image_resize=20)  # resize 20, centre crop 16
    meta = prepare_pairs(raw, str(tmp_path / "p"), rows_per_shard=5, **KW)
    assert meta["parts"]["train"]["rows"] == 16 and meta["parts"]["eval"]["rows"] == 4
    assert len(meta["parts"]["train"]["shards"]) == 4
    assert meta["columns"] == {"image": "image", "text": "text"}
    prep = _cfg(name=str(tmp_path / "p"), hflip=True, image_resize=20,
                eval_fraction=0.5)  # no second hold-out
    assert_same_batches(list(pair_rows.eval_batches(prep, batch_size=3, **KW)),
          list(pair_rows.eval_batches(raw, batch_size=3, **KW)))
    train = dict(seed=4, batch_size=4, **KW)
    expected = take(pair_rows.train_iterator(raw, **train), 9)  # > 2 epochs, with flips
    assert expected[0]["query"].dtype == np.uint8
    it = pair_rows.train_iterator(prep, **train)
    assert_same_batches(take(it, 5), expected[:5])
    state = json.loads(json.dumps(it.get_state()))
    fresh = pair_rows.train_iterator(prep, **train)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), expected[5:])
    # Preparing again the same is a no-op; other settings into the same directory an error.
    before = os.path.getmtime(tmp_path / "p" / "prepared.json")
    again = prepare_pairs(raw, str(tmp_path / "p"), rows_per_shard=5, **KW)
    assert again["fingerprint"] == meta["fingerprint"]
    assert os.path.getmtime(tmp_path / "p" / "prepared.json") == before
    with pytest.raises(ConfigError, match="another fingerprint.*--overwrite"):
        prepare_pairs(_cfg(name=data_file, image_resize=24), str(tmp_path / "p"), **KW)
    # max_train_examples keeps the first prepared rows.
    capped = pair_rows.build_rows(_cfg(name=str(tmp_path / "p"), max_train_examples=6,
                                       image_resize=20),
                                  which="train", seed=0, **KW)[0]
    assert len(capped) == 6 and capped[5]["__row__"] == 5
    # --overwrite replaces the data, and the old shards go.
    meta = prepare_pairs(_cfg(name=data_file, image_resize=24), str(tmp_path / "p"),
                         overwrite=True, **KW)
    assert sorted(f for f in os.listdir(tmp_path / "p") if f.endswith(".array_record")) == \
        sorted(meta["parts"]["train"]["shards"] + meta["parts"]["eval"]["shards"])
    assert meta["settings"]["resize"] == 24


def test_settings_mismatch_errors(tmp_path, data_file):
    out = str(tmp_path / "p")
    prepare_pairs(_cfg(name=data_file, eval_fraction=0.0, eval_split=""), out,
                                 **KW)
    with pytest.raises(ConfigError, match=r"image crop .* is 16, but this run's 24"):
        pair_rows.build_rows(_cfg(name=out), which="train", seed=0,
                             **{**KW, "image_size": 24})
    with pytest.raises(ConfigError, match=r"data.image_resize is 16, but this run's 20"):
        pair_rows.build_rows(_cfg(name=out, image_resize=20), which="train", seed=0, **KW)
    with pytest.raises(ConfigError, match=r"data.image_interpolation is 'bicubic', but this "
                                          r"run's 'bilinear'"):
        pair_rows.build_rows(_cfg(name=out, image_interpolation="bilinear"), which="train",
                             seed=0, **KW)
    with pytest.raises(ConfigError, match=r"training images are final crops \(for data.augment="
                                          r"'none'\), but this run's shorter sides"):
        pair_rows.build_rows(_cfg(name=out, augment="random_resized_crop"), which="train",
                             seed=0, **KW)
    with pytest.raises(ConfigError, match=r"reads the text column 'caption'.*'text' \(text\)"):
        pair_rows.build_rows(_cfg(name=out, text_column="caption"), which="train", seed=0, **KW)
    with pytest.raises(ConfigError, match="prepared without an eval part"):
        pair_rows.build_rows(_cfg(name=out), which="eval", seed=0, **KW)
    # Normalisation is free: the shards hold pixels before it.
    pair_rows.build_rows(_cfg(name=out, image_mean=(0.5, 0.5, 0.5)), which="train", seed=0,
                         **KW)
    with pytest.raises(ConfigError, match="nothing to prepare"):
        prepare_pairs(_cfg(tokenizer=""), out, **KW)


def test_random_resized_crop_and_jpeg(tmp_path, data_file):
    rrc = _cfg(name=data_file, augment="random_resized_crop", rrc_scale=(0.5, 1.0))
    out = str(tmp_path / "rrc")
    meta = prepare_pairs(rrc, out, **KW)
    assert meta["settings"]["short_side"] == prepared_pairs.default_short_side(S) == 18
    rows = ShardRows([os.path.join(out, s) for s in meta["parts"]["train"]["shards"]])
    assert min(rows[0]["image"].shape[:2]) == 18
    prep = _cfg(name=out, augment="random_resized_crop", rrc_scale=(0.5, 1.0))
    train = dict(seed=1, batch_size=4, **KW)
    expected = take(pair_rows.train_iterator(prep, **train), 6)
    assert expected[0]["query"].shape == (4, S, S, 3)
    it = pair_rows.train_iterator(prep, **train)
    take(it, 2)
    fresh = pair_rows.train_iterator(prep, **train)
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    assert_same_batches(take(fresh, 4), expected[2:])
    # JPEG-encoded shards: close to the raw crops (lossy), much smaller.
    raw = _cfg(name=data_file)
    prepare_pairs(raw, str(tmp_path / "jpg"), image_format="jpeg", **KW)
    a = np.concatenate([b["query"] for b in pair_rows.eval_batches(raw, batch_size=4, **KW)])
    b = np.concatenate([b["query"] for b in pair_rows.eval_batches(
        _cfg(name=str(tmp_path / "jpg")), batch_size=4, **KW)])
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 4


def test_prepare_entry_point(tmp_path, data_file, monkeypatch):
    from jaxtrain.data import prepare
    from jaxtrain.tasks.clip import ClipTask

    c = ClipTask.default_config()
    c.model.image_size, c.model.vocab_size, c.model.text_max_len = S, 50304, T
    c.data.name, c.data.tokenizer = data_file, "gpt2"
    meta = prepare.prepare(c, str(tmp_path / "p"))
    assert meta["parts"]["train"]["rows"] == 20 - 1  # eval_fraction 0.02 of 20: 1 row
    assert meta["settings"]["crop"] == S
    # A text config goes to the token store builder.
    calls = []
    fake = types.ModuleType("jaxtrain.data.token_store")
    fake.build_token_store = lambda config, out: calls.append((config.task, out)) or "store"
    monkeypatch.setitem(sys.modules, "jaxtrain.data.token_store", fake)
    from jaxtrain.tasks.lm import LMTask

    lm = LMTask.default_config()
    assert prepare.prepare(lm, "somewhere") == "store" and calls == [(lm.task, "somewhere")]


@pytest.mark.slow
def test_worker_processes_write_the_same_shards(tmp_path, data_file):
    d = _cfg(name=data_file, augment="random_resized_crop")
    one = prepare_pairs(d, str(tmp_path / "one"), rows_per_shard=7, **KW)
    two = prepare_pairs(d, str(tmp_path / "two"), rows_per_shard=7, workers=2, **KW)
    assert one["fingerprint"] == two["fingerprint"] and one["parts"] == two["parts"]
    for part in one["parts"].values():
        for shard in part["shards"]:
            assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" /
                                                               shard).read_bytes(), shard
