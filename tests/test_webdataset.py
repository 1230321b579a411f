"""Webdataset tar shards (jaxtrain.data.webdataset): shard patterns, the same pairs as the same
data in a jsonl, exact resume, bad samples, and preparing shards from them."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from jaxtrain.config import ConfigError
from jaxtrain.data import pair_rows
from jaxtrain.data.pair_writer import prepare_pairs
from jaxtrain.data.webdataset import expand_braces, shard_paths
from tests.pair_helpers import assert_same_batches, data_config, take

S, T = 16, 16
KW = dict(mode="i2t", num_negatives=0, image_size=S, text_max_len=T)


def _image(rng, fmt: str) -> bytes:
    h, w = (int(v) for v in rng.integers(14, 48, 2))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(root, samples, per_shard=5, caption_as=("txt", "json", "txt")):
    """img2dataset's layout: KEY.jpg, KEY.txt (or only KEY.json with the caption), KEY.json."""
    root.mkdir(exist_ok=True)
    for s in range(-(-len(samples) // per_shard)):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(len(samples), (s + 1) * per_shard)):
                key, (ext, image), caption = f"{s:05d}{i:04d}", samples[i][0], samples[i][1]
                _add(tar, f"{key}.{ext}", image)
                meta = {"caption": caption, "url": f"http://x/{i}", "key": key}
                if caption_as[s % len(caption_as)] == "txt":
                    _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
    return root


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(7)
    return [(("png" if i % 7 == 3 else "jpg", _image(rng, "PNG" if i % 7 == 3 else "JPEG")),
             f"picture {i} é") for i in range(15)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, samples):
    return _write_shards(tmp_path_factory.mktemp("wds") / "shards", samples)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, samples):
    root = tmp_path_factory.mktemp("ref")
    rows = []
    for i, ((ext, image), caption) in enumerate(samples):
        (root / f"{i}.{ext}").write_bytes(image)
        rows.append({"image": f"{i}.{ext}", "text": caption})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "pairs.jsonl")


def _cfg(**overrides):
    return data_config(**{"tokenizer": "gpt2", "eval_fraction": 0.2, **overrides})


def test_shard_patterns(shards, tmp_path):
    assert expand_braces("s{08..10}-{a,b}.tar") == [
        "s08-a.tar", "s08-b.tar", "s09-a.tar", "s09-b.tar", "s10-a.tar", "s10-b.tar"]
    every = [str(shards / f"0000{s}.tar") for s in range(3)]
    assert shard_paths(str(shards)) == every
    assert shard_paths(str(shards / "*.tar")) == every
    assert shard_paths(str(shards / "{00000..00002}.tar")) == every
    assert shard_paths(every[1]) == every[1:2]
    assert shard_paths(str(tmp_path)) is None and shard_paths("a/b.jsonl") is None
    with pytest.raises(ConfigError, match=r"1 of its 4 files do not exist.*00003.tar"):
        shard_paths(str(shards / "{00000..00003}.tar"))
    with pytest.raises(ConfigError, match="no file matches"):
        shard_paths(str(shards / "x*.tar"))


def test_same_pairs_as_jsonl_and_exact_resume(shards, jsonl):
    wds, ref = _cfg(name=str(shards / "{00000..00002}.tar")), _cfg(name=jsonl)
    assert_same_batches(list(pair_rows.eval_batches(wds, batch_size=2, **KW)),
          list(pair_rows.eval_batches(ref, batch_size=2, **KW)))
    train = dict(seed=3, batch_size=4, **KW)
    aug = dict(augment="random_resized_crop", hflip=True)
    expected = take(pair_rows.train_iterator(_cfg(name=jsonl, **aug), **train), 7)
    it = pair_rows.train_iterator(_cfg(name=str(shards), **aug), **train)
    assert_same_batches(take(it, 4), expected[:4])  # past the first epoch (3 batches of 12 rows)
    state = json.loads(json.dumps(it.get_state()))
    fresh = pair_rows.train_iterator(_cfg(name=str(shards), **aug), **train)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 3), expected[4:])
    # The samples pickle for grain's worker processes (open files are not carried).
    rows, _ = pair_rows.build_rows(wds, which="train", seed=0, **KW)
    first = rows[0]
    again = pickle.loads(pickle.dumps(rows))
    assert again[0]["positive"] == first["positive"] == "picture 0 é"


def test_bad_samples_and_modes(tmp_path, samples):
    root = tmp_path / "bad"
    _write_shards(root, samples[:6], per_shard=6, caption_as=("txt",))
    with tarfile.open(root / "00001.tar", "w") as tar:  # a key without caption, a broken image
        _add(tar, "x/lonely.jpg", samples[0][0][1])
        _add(tar, "x/broken.jpg", b"\xff\xd8 not a jpeg")
        _add(tar, "x/broken.txt", b"broken")
        _add(tar, "x/meta.json", b"{}")
    with pytest.raises(ValueError, match=r"Sample 'x/lonely' of 00001.tar.*no a \.txt or "
                                         r"\.json member"):
        pair_rows.build_rows(_cfg(name=str(root)), which="train", seed=0, **KW)
    rows, _ = pair_rows.build_rows(_cfg(name=str(root), on_bad_row="skip", eval_fraction=0.0),
                                   which="train", seed=0, **KW)
    assert len(rows) == 6
    with pytest.raises(ConfigError, match="mode 'i2t' or 't2i' without negatives"):
        pair_rows.build_rows(_cfg(name=str(root)), which="train", seed=0,
                             **{**KW, "mode": "t2t"})
    whole, _ = pair_rows.build_rows(_cfg(name=str(root), on_bad_row="skip", eval_split="train"),
                                    which="eval", seed=0, **KW)  # an evals.<name>.source
    assert len(whole) == 6
    with pytest.raises(ValueError, match="data.eval_fraction is 0"):
        pair_rows.build_rows(_cfg(name=str(root), on_bad_row="skip", eval_fraction=0.0),
                             which="eval", seed=0, **KW)


def test_prepare_from_webdataset(shards, tmp_path):
    wds = _cfg(name=str(shards))
    meta = prepare_pairs(wds, str(tmp_path / "p"), **KW)
    assert meta["parts"]["train"]["rows"] == 12 and meta["parts"]["eval"]["rows"] == 3
    prep = _cfg(name=str(tmp_path / "p"))
    assert_same_batches(list(pair_rows.eval_batches(prep, batch_size=2, **KW)),
          list(pair_rows.eval_batches(wds, batch_size=2, **KW)))
    train = dict(seed=0, batch_size=4, **KW)
    assert_same_batches(take(pair_rows.train_iterator(prep, **train), 4),
          take(pair_rows.train_iterator(wds, **train), 4))


@pytest.mark.slow
def test_grain_worker_processes(shards, tmp_path):
    """Tar samples and prepared shards cross to grain's spawned workers: same batches."""
    prepare_pairs(_cfg(name=str(shards)), str(tmp_path / "p"), **KW)
    train = dict(seed=2, batch_size=4, **KW)
    for name in (str(shards), str(tmp_path / "p")):
        expected = take(pair_rows.train_iterator(_cfg(name=name), **train), 4)
        it = pair_rows.train_iterator(_cfg(name=name, workers=1), **train)
        try:
            assert_same_batches(take(it, 4), expected)
        finally:
            it.close()
