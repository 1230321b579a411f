"""Image decoding/preprocessing (jaxtrain.data.images), contrastive pair data (pair_config,
pair_sources, pair_rows) and the zero-shot set (zero_shot)."""

import dataclasses
import io
import json
import pathlib

import datasets
import numpy as np
import pytest
from PIL import Image

from jaxtrain.config import ConfigError, apply_rules, base_config, validate
from jaxtrain.data import pair_config, pair_rows, pair_sources, zero_shot
from jaxtrain.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImagePreprocess,
    decode_image,
    normalize,
    random_resized_crop,
    random_resized_crop_box,
)
from jaxtrain.data.shapes import (
    NUM_NEIGHBOURS,
    POSITIONS,
    SHAPES,
    CaptionTokenizer,
    Combo,
    ShapesPairs,
    ShapesSource,
    differing_attributes,
    neighbour_combos,
)
from tests.pair_helpers import assert_same_batches, take

S, T = 16, 16  # model image size and text length in these tests
GPT2_PAD = 50256


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _rand_image(rng, h=20, w=24) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _cfg(**overrides):
    d = pair_config.default_data_config()
    d.prefetch = 0
    for k, v in overrides.items():
        d[k] = v
    return d


def _zs(**overrides):
    z = zero_shot.default_config()
    for k, v in overrides.items():
        z[k] = v
    return z


def _parse(caption: str) -> Combo:
    words = f" {caption.replace(',', '').replace(':', '').replace('.', '')} "

    def pick(values):
        return next(v for v in values if f" {v} " in words)

    return Combo(pick(SHAPES), pick(("red", "green", "blue", "yellow", "purple", "white")),
                 pick(("small", "large")), pick(POSITIONS))


# --- decoding -------------------------------------------------------------------------------


def test_decode_every_form(tmp_path):
    rng = np.random.default_rng(0)
    rgb = _rand_image(rng, 6, 5)
    data = _png(rgb)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(data)
    forms = [
        data, bytearray(data), {"bytes": data, "path": None}, {"bytes": None, "path": "sub/a.png"},
        "sub/a.png", pathlib.Path("sub/a.png"), str(tmp_path / "sub" / "a.png"),
        Image.fromarray(rgb), rgb, rgb.astype(np.float32) / 255,
    ]
    for value in forms:
        out = np.asarray(decode_image(value, base_dir=str(tmp_path)))
        assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
        np.testing.assert_array_equal(out, rgb)
    gray = rgb[..., 0]
    for value in (gray, gray[..., None], _png(gray), Image.fromarray(gray, "L")):
        np.testing.assert_array_equal(np.asarray(decode_image(value)), np.repeat(gray[..., None],
                                                                                  3, -1))
    rgba = np.concatenate([rgb, np.zeros((6, 5, 1), np.uint8)], -1)
    rgba[0, 0, 3] = 255  # one opaque pixel; the rest is transparent -> white
    out = np.asarray(decode_image(_png(rgba)))
    np.testing.assert_array_equal(out[0, 0], rgb[0, 0])
    assert (out.reshape(-1, 3)[1:] == 255).all()
    np.testing.assert_array_equal(np.asarray(decode_image(rgba)), out)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert np.asarray(decode_image(palette)).shape == (6, 5, 3)
    la = np.stack([gray, np.full_like(gray, 255)], -1)
    np.testing.assert_array_equal(np.asarray(decode_image(Image.fromarray(la, "LA")))[..., 0],
                                  gray)
    for bad, match in [(b"not an image", "cannot decode"), ("missing.png", "does not exist"),
                       (None, "missing"), (np.zeros((2, 3, 5), np.uint8), "shape"),
                       ("https://x.org/a.png", "URL"), (3.5, "float is not an image"),
                       (np.full((2, 2, 3), 2.0), r"\[0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            decode_image(bad, base_dir=str(tmp_path))


def test_matches_clip_image_processor():
    """Resize (shorter side) + centre crop + normalise == CLIPImageProcessor, bit for bit."""
    from transformers.models.clip import image_processing_pil_clip  # no torchvision needed

    rng = np.random.default_rng(1)
    cases = [(37, 53, 24, 20), (64, 33, 17, 17), (30, 30, 30, 28), (20, 45, 40, 32)]
    for h, w, resize, crop in cases:
        for mode in ("RGB", "RGBA", "L"):
            array = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze()
            image = Image.fromarray(array, mode)
            hf = image_processing_pil_clip.CLIPImageProcessorPil(
                size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop})
            ref = hf(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            ours = ImagePreprocess(crop=crop, resize=resize)(image)
            assert ours.dtype == np.float32 and ours.shape == (crop, crop, 3)
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert tuple(hf.image_mean) == CLIP_MEAN and tuple(hf.image_std) == CLIP_STD


def test_random_resized_crop():
    scale, ratio = (0.3, 0.6), (3 / 4, 4 / 3)
    for seed in range(200):
        h, w = int(20 + seed % 37), int(25 + seed % 41)
        top, left, ch, cw = random_resized_crop_box(h, w, np.random.default_rng(seed), scale,
                                                    ratio)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        fraction = ch * cw / (h * w)
        # Rounding w and h to integers moves the area a little.
        tolerance = (ch + cw + 1) / (h * w)
        assert scale[0] - tolerance <= fraction <= scale[1] + tolerance, (h, w, ch, cw)
        assert ratio[0] - 2 / ch <= cw / ch <= ratio[1] + 2 / ch
    a = random_resized_crop_box(40, 50, np.random.default_rng(7), scale, ratio)
    assert a == random_resized_crop_box(40, 50, np.random.default_rng(7), scale, ratio)
    assert len({random_resized_crop_box(40, 50, np.random.default_rng(s)) for s in range(20)}) > 5
    # No box of that area fits a 100 x 4 strip with ratios near 1: the centre fallback, clamped.
    assert random_resized_crop_box(4, 100, np.random.default_rng(0), (0.9, 1.0), ratio) == (
        0, 47, 4, 5)
    image = Image.fromarray(_rand_image(np.random.default_rng(2), 30, 40))
    out = random_resized_crop(image, 12, np.random.default_rng(3), scale, ratio)
    assert out.size == (12, 12)
    again = random_resized_crop(image, 12, np.random.default_rng(3), scale, ratio)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    # The full-scale crop of a square image is a plain resize.
    square = Image.fromarray(_rand_image(np.random.default_rng(4), 24, 24))
    full = random_resized_crop(square, 12, np.random.default_rng(0), (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(
        square.resize((12, 12), Image.Resampling.BICUBIC)))
    pre = ImagePreprocess(crop=12, augment="random_resized_crop", rrc_scale=scale, hflip=True)
    outs = [pre(image, np.random.default_rng(s)) for s in range(6)]
    assert all(o.shape == (12, 12, 3) and o.dtype == np.float32 for o in outs)
    np.testing.assert_array_equal(pre(image, np.random.default_rng(5)), outs[5])
    assert len({o.tobytes() for o in outs}) == 6
    np.testing.assert_array_equal(pre(image), ImagePreprocess(crop=12)(image))  # no rng: eval
    np.testing.assert_allclose(normalize(np.full((1, 1, 3), 255, np.uint8), (0.5,) * 3,
                                         (0.25,) * 3), 2.0)


# --- shapes in every mode -------------------------------------------------------------------


def test_shapes_pairs_every_mode():
    tok = CaptionTokenizer()
    base = ShapesSource(30, image_size=S, max_text_len=T, seed=4)
    for mode in pair_config.MODES:
        src = ShapesPairs(30, modalities=pair_config.PAIR_MODES[mode], num_negatives=5,
                          image_size=S, seed=4)
        for i in range(30):
            ex, ref, combos = src[i], base[i], src.combos(i)
            if mode == "i2t":
                np.testing.assert_array_equal(ex["query"], ref["image"])
                np.testing.assert_array_equal(tok.encode(ex["positive"], T), ref["text"])
            if mode == "t2i":
                np.testing.assert_array_equal(ex["positive"], ref["image"])
                assert ex["query"] == base.caption(i)
            if mode == "t2t":
                assert ex["query"] == base.caption(i) and ex["positive"] != ex["query"]
                assert _parse(ex["positive"]) == base.combo(i)
            if mode == "i2i":
                np.testing.assert_array_equal(ex["query"], ref["image"])
                assert not np.array_equal(ex["positive"], ex["query"])
            assert len(ex["negatives"]) == 5 and len(set(combos["negatives"])) == 5
            for c in combos["negatives"]:
                assert len(differing_attributes(c, base.combo(i))) == 1
            if mode in ("i2t", "t2t"):
                assert [_parse(n) for n in ex["negatives"]] == combos["negatives"]
            else:
                assert all(n.shape == (S, S, 3) for n in ex["negatives"])
    assert len(neighbour_combos(base.combo(0))) == NUM_NEIGHBOURS == 13
    many = ShapesPairs(3, modalities=("text", "image"), num_negatives=20)
    assert len(set(many.combos(0)["negatives"])) == 13
    with pytest.raises(ValueError, match="modalities must be"):
        ShapesPairs(3, modalities=("image", "audio"))


def test_shapes_batches_every_mode():
    d = _cfg(train_examples=64, eval_examples=10)
    tok = CaptionTokenizer()
    for mode in pair_config.MODES:
        it = pair_rows.train_iterator(d, mode=mode, num_negatives=2, image_size=S, text_max_len=T,
                                  seed=0, batch_size=4)
        batch = next(it)
        q, p = {"i2t": ("i", "t"), "t2i": ("t", "i"), "t2t": ("t", "t"), "i2i": ("i", "i")}[mode]
        shape = {"i": ((S, S, 3), np.float32), "t": ((T,), np.int32)}
        assert set(batch) == {"query", "positive", "negatives"}
        assert batch["query"].shape == (4, *shape[q][0]) and batch["query"].dtype == shape[q][1]
        assert batch["positive"].shape == (4, *shape[p][0])
        assert batch["negatives"].shape == (4, 2, *shape[p][0])
        assert batch["negatives"].dtype == shape[p][1]
        if p == "t":  # the hard negatives differ from the positive in exactly one attribute
            for pos, negs in zip(batch["positive"], batch["negatives"], strict=True):
                for n in negs:
                    assert len(differing_attributes(_parse(tok.decode(n)),
                                                    _parse(tok.decode(pos)))) == 1
    # The eval rows, in order: the held-out set the CLIP task always had, images normalised.
    held_out = ShapesSource(10, image_size=S, max_text_len=T, seed=3 + 1_000_003,
                            unique_combos=True)
    batches = list(pair_rows.eval_batches(d, mode="i2t", num_negatives=0, image_size=S,
                                      text_max_len=T, batch_size=4, seed=3))
    assert [len(b["valid"]) for b in batches] == [4, 4, 4]
    assert np.concatenate([b["valid"] for b in batches]).sum() == 10
    assert not batches[-1]["valid"][2:].any()
    for i in range(10):
        b, j = batches[i // 4], i % 4
        np.testing.assert_allclose(b["query"][j], normalize(held_out[i]["image"]), atol=1e-6)
        np.testing.assert_array_equal(b["positive"][j], held_out[i]["text"])


def test_resume_host_split_and_augmentation():
    d = _cfg(train_examples=24, augment="random_resized_crop", rrc_scale=(0.5, 1.0))
    kw = dict(mode="i2t", num_negatives=1, image_size=S, text_max_len=T, seed=5)
    it = pair_rows.train_iterator(d, batch_size=4, **kw)
    take(it, 7)  # past the first epoch (6 batches)
    state = it.get_state()
    expected = take(it, 4)
    fresh = pair_rows.train_iterator(d, batch_size=4, **kw)
    fresh.set_state(json.loads(json.dumps(state)))
    assert_same_batches(take(fresh, 4), expected)
    # Two hosts read the two halves of the same global batches, augmentation included.
    one = take(pair_rows.train_iterator(d, batch_size=8, **kw), 4)
    halves = [take(pair_rows.train_iterator(d, batch_size=4, process_index=h, process_count=2,
                                             **kw), 4) for h in range(2)]
    for b, x, y in zip(one, *halves, strict=True):
        for k in b:
            np.testing.assert_array_equal(b[k], np.concatenate([x[k], y[k]]))
    # Augmentation differs across epochs: the same example is cropped differently.
    epochs = take(pair_rows.train_iterator(d, batch_size=4, **kw), 12)
    by_text = {}
    for b in epochs:
        for image, text in zip(b["query"], b["positive"], strict=True):
            by_text.setdefault(text.tobytes(), []).append(image)
    seen_twice = [v for v in by_text.values() if len(v) == 2]
    assert seen_twice and all(not np.array_equal(a, b) for a, b in seen_twice)
    plain = take(pair_rows.train_iterator(_cfg(train_examples=24), batch_size=4, **kw), 1)[0]
    np.testing.assert_array_equal(plain["positive"], epochs[0]["positive"])  # same order
    assert not np.array_equal(plain["query"], epochs[0]["query"])


def test_resume_with_worker_processes():
    d = _cfg(train_examples=20, augment="random_resized_crop", workers=2)
    kw = dict(mode="t2i", num_negatives=1, image_size=S, text_max_len=T, seed=1, batch_size=4)
    reference = take(pair_rows.train_iterator(_cfg(train_examples=20,
                                                augment="random_resized_crop"), **kw), 6)
    it = pair_rows.train_iterator(d, **kw)
    try:
        assert_same_batches(take(it, 3), reference[:3])
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    fresh = pair_rows.train_iterator(d, **kw)
    try:
        fresh.set_state(state)
        assert_same_batches(take(fresh, 3), reference[3:])
    finally:
        fresh.close()


# --- datasets -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(11)
    return [_rand_image(rng, int(rng.integers(14, 30)), int(rng.integers(14, 30)))
            for _ in range(10)]


def _expected(picture, size=S):  # rows carry the uint8 crop (normalised on device)
    return ImagePreprocess(crop=size, output="uint8")(Image.fromarray(picture))


def _check_i2t(d, pictures, tok_name="gpt2", first=None):
    from jaxtrain.data.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2") if tok_name == "gpt2" else None
    kw = dict(mode="i2t", num_negatives=0, image_size=S, text_max_len=T)
    batches = list(pair_rows.eval_batches(d, batch_size=4, **kw))
    valid = np.concatenate([b["valid"] for b in batches])
    query = np.concatenate([b["query"] for b in batches])[valid]
    positive = np.concatenate([b["positive"] for b in batches])[valid]
    first = len(pictures) - len(query) if first is None else first
    for k in range(len(query)):
        np.testing.assert_allclose(query[k], _expected(pictures[first + k]), atol=1e-6)
        if tok is not None:
            ids = tok(f"picture {first + k}")["input_ids"]
            np.testing.assert_array_equal(positive[k][:len(ids)], ids)
            assert (positive[k][len(ids):] == GPT2_PAD).all()
    train = next(pair_rows.train_iterator(d, seed=0, batch_size=4, **kw))
    assert train["query"].shape == (4, S, S, 3) and train["positive"].shape == (4, T)
    return len(query)


def test_saved_dataset_with_image_feature(tmp_path, pictures):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["odd_one", "even_one"])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pictures],
         "text": [f"picture {i}" for i in range(10)], "label": [1 - i % 2 for i in range(10)]},
        features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    d = _cfg(name=str(tmp_path / "saved"), tokenizer="gpt2", eval_fraction=0.2)
    assert _check_i2t(d, pictures) == 2  # no eval split: the last 20% are held out
    d.eval_fraction = 0.0
    with pytest.raises(ValueError, match="no split 'validation'.*eval_fraction"):
        pair_rows.eval_batches(d, mode="i2t", num_negatives=0, image_size=S, text_max_len=T,
                           batch_size=4)
    # Zero-shot from a ClassLabel column: names from the feature, '_' -> ' ' in prompts.
    zs = _zs(name=str(tmp_path / "saved"), split="train", templates=("a photo of a {}.", "{}"))
    z = zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T)
    assert z.class_names == ["odd_one", "even_one"] and len(z) == 10
    np.testing.assert_array_equal(z.labels, [1 - i % 2 for i in range(10)])
    assert z.prompts.shape == (2, 2, T) and z.prompts.dtype == np.int32
    from jaxtrain.data.tokenizers import load_tokenizer

    ids = load_tokenizer("gpt2")("a photo of a even one.")["input_ids"]
    np.testing.assert_array_equal(z.prompts[1, 0, :len(ids)], ids)
    batches = list(z.batches(4))
    assert len(batches) == 3 and batches[-1]["valid"].sum() == 2
    np.testing.assert_allclose(batches[0]["image"][1], _expected(pictures[1]), atol=1e-6)
    assert z.images.shape == (10, S, S, 3)


def test_parquet_with_bytes_and_local_tokenizer(tmp_path, pictures):
    from jaxtrain.data.tokenizers import load_tokenizer

    load_tokenizer("gpt2").save_pretrained(str(tmp_path / "tok"))
    datasets.Dataset.from_dict({"img": [_png(p) for p in pictures],
                                "caption": [f"picture {i}" for i in range(10)]}).to_parquet(
        str(tmp_path / "pairs.parquet"))
    d = _cfg(name=str(tmp_path / "pairs.parquet"), tokenizer=str(tmp_path / "tok"),
             image_column="img", text_column="caption", eval_fraction=0.3, max_eval_examples=2)
    assert _check_i2t(d, pictures, tok_name="gpt2", first=7) == 2


def test_jsonl_with_relative_paths_every_mode(tmp_path, pictures):
    (tmp_path / "img").mkdir()
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(tmp_path / "img" / f"{i}.png")
    rows = [{"image": f"img/{i}.png", "text": f"picture {i}", "query": f"img/{i}.png",
             "positive": f"img/{(i + 1) % 10}.png",
             "negatives": [f"img/{(i + 2) % 10}.png", f"img/{(i + 3) % 10}.png"]}
            for i in range(10)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = _cfg(name=str(path), tokenizer="gpt2", eval_fraction=0.1)
    assert _check_i2t(d, pictures) == 1
    csv = tmp_path / "data.csv"
    csv.write_text("image,text\n" + "".join(f"img/{i}.png,picture {i}\n" for i in range(10)))
    assert _check_i2t(_cfg(name=str(csv), tokenizer="gpt2", eval_fraction=0.2), pictures) == 2
    # i2i with hard negatives from a list column; eval takes the first num_negatives.
    (b,) = pair_rows.eval_batches(d, mode="i2i", num_negatives=1, image_size=S, text_max_len=T,
                              batch_size=2)
    np.testing.assert_allclose(b["query"][0], _expected(pictures[9]), atol=1e-6)
    np.testing.assert_allclose(b["positive"][0], _expected(pictures[0]), atol=1e-6)
    np.testing.assert_allclose(b["negatives"][0, 0], _expected(pictures[1]), atol=1e-6)
    assert b["negatives"].shape == (2, 1, S, S, 3) and b["valid"].tolist() == [True, False]
    train = next(pair_rows.train_iterator(d, mode="i2i", num_negatives=2, image_size=S,
                                      text_max_len=T, seed=0, batch_size=3))
    assert train["negatives"].shape == (3, 2, S, S, 3)
    with pytest.raises(ValueError, match=r"Row 0 .*has 2 negatives.*num_negatives=3"):
        pair_rows.train_iterator(d, mode="i2i", num_negatives=3, image_size=S, text_max_len=T,
                             seed=0, batch_size=3)


def test_imagefolder_with_metadata(tmp_path, pictures):
    for split, indices in (("train", range(8)), ("validation", range(8, 10))):
        folder = tmp_path / "folder" / split
        folder.mkdir(parents=True)
        with open(folder / "metadata.jsonl", "w") as f:
            for i in indices:
                Image.fromarray(pictures[i]).save(folder / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    d = _cfg(name=str(tmp_path / "folder"), tokenizer="gpt2")
    assert _check_i2t(d, pictures) == 2  # the folder's own validation split


def test_t2t_with_text_negatives():
    ds = datasets.Dataset.from_dict({
        "query": [f"question {i}" for i in range(6)], "positive": [f"answer {i}" for i in range(6)],
        "negatives": [[f"wrong {i}", f"bad {i}", f"no {i}"] for i in range(6)]})
    d = _cfg(tokenizer="gpt2")
    rows, preparer = pair_rows.build_rows(d, which="train", mode="t2t", num_negatives=2,
                                  image_size=S, text_max_len=8, seed=0)
    from jaxtrain.data.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2")
    raw = pair_sources.PairRows(ds, {"query": "query", "positive": "positive",
                                 "negatives": "negatives"})[4]
    train = dataclasses.replace(preparer, seed=0)
    row = train(17, raw)
    assert row["negatives"].shape == (2, 8)
    texts = {tok.decode([t for t in n if t != GPT2_PAD]) for n in row["negatives"]}
    assert texts < {"wrong 4", "bad 4", "no 4"}
    assert_same_batches([train(17, raw)], [row])  # deterministic in (seed, position)
    picks = {tuple(sorted(tok.decode([t for t in n if t != GPT2_PAD]) for n in
                          train(p, raw)["negatives"])) for p in range(30)}
    assert len(picks) > 1  # a random subset per position
    eval_row = preparer(0, raw)
    assert tok.decode([t for t in eval_row["negatives"][0] if t != GPT2_PAD]) == "wrong 4"


# --- zero-shot, config, errors --------------------------------------------------------------


def test_zero_shot_on_shapes():
    d = _cfg(eval_examples=40)
    zs = zero_shot.default_config()
    z = zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T, seed=2)
    held_out = ShapesSource(40, image_size=S, max_text_len=T, seed=2 + 1_000_003,
                            unique_combos=True)
    assert z.class_names == list(SHAPES) and len(z) == 40
    np.testing.assert_array_equal(z.labels, [SHAPES.index(held_out.combo(i).shape)
                                             for i in range(40)])
    np.testing.assert_allclose(z.rows[3]["image"], normalize(held_out[3]["image"]), atol=1e-6)
    tok = CaptionTokenizer()
    assert z.prompts.shape == (4, 1, T)
    assert [tok.decode(p[0]) for p in z.prompts] == [f"a photo of a {s}" for s in SHAPES]
    zs.attribute = "position"
    assert zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T).class_names == list(
        POSITIONS)
    # The task's tokenizer, when given, is used instead of loading data.tokenizer again.
    caption = pair_rows.load_text_tokenizer(d)
    np.testing.assert_array_equal(zero_shot.zero_shot_set(
        zs, d, image_size=S, text_max_len=T, tokenizer=caption).prompts, zero_shot.zero_shot_set(
        zs, d, image_size=S, text_max_len=T).prompts)
    assert zero_shot.zero_shot_set(_zs(name="none"), d, image_size=S, text_max_len=T) is None
    assert zero_shot.zero_shot_set(zs, _cfg(name="x/y", tokenizer="gpt2"), image_size=S,
                                   text_max_len=T) is None  # '' with a dataset: off


def test_zero_shot_labels_from_ints_and_strings(tmp_path, pictures):
    ds = datasets.Dataset.from_dict({"image": [_png(p) for p in pictures[:4]],
                                     "label": [0, 1, 1, 0], "name": ["b", "a", "a", "b"]})
    ds.save_to_disk(str(tmp_path / "zs"))
    d = _cfg()
    zs = _zs(name=str(tmp_path / "zs"), split="train")
    with pytest.raises(ValueError, match="plain integers.*evals.zero_shot.class_names"):
        zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T)
    zs.class_names = ("circle", "square")
    z = zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T)
    assert z.class_names == ["circle", "square"] and z.labels.tolist() == [0, 1, 1, 0]
    zs.class_names, zs.label_column = (), "name"
    d.tokenizer = "gpt2"
    z = zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T)
    assert z.class_names == ["a", "b"] and z.labels.tolist() == [1, 0, 0, 1]
    zs.label_column = "category"
    with pytest.raises(ValueError, match=r"needs labels.*'category'.*\['image', 'label', 'name'\]"
                       r".*Set evals.mine.label_column"):
        zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T, prefix="evals.mine.")
    zs.split = "test"
    with pytest.raises(ValueError, match="no split 'test'.*set evals.zero_shot.split"):
        zero_shot.zero_shot_set(zs, d, image_size=S, text_max_len=T)


def test_default_config_validates():
    c = base_config()
    c.data = pair_config.default_data_config()
    rules = pair_config.data_config_rules()
    validate(c, c, rules)
    assert {k for k, _, _ in rules} >= {"data.augment", "data.rrc_scale", "data.workers"}
    for key, value, match in [("augment", "mixup", "data.augment"),
                              ("rrc_scale", (0.9, 0.5), "data.rrc_scale"),
                              ("image_interpolation", "cubic", "data.image_interpolation"),
                              ("eval_examples", 241, "data.eval_examples")]:
        bad = base_config()
        bad.data = pair_config.default_data_config()
        bad.data[key] = value
        with pytest.raises(ConfigError, match=match):
            validate(bad, c, rules)
    assert "zero_shot" not in c.data  # the zero-shot set's keys belong to its evaluator
    zs_rules = zero_shot.config_rules("evals.zero_shot.")
    apply_rules({"evals": {"zero_shot": zero_shot.default_config()}}, zs_rules)
    for key, value in [("templates", ("no placeholder",)), ("attribute", "hue"),
                       ("max_examples", -1), ("label_column", "")]:
        bad_zs = _zs(**{key: value})
        with pytest.raises(ConfigError, match=f"'evals.zero_shot.{key}'"):
            apply_rules({"evals": {"zero_shot": bad_zs}}, zs_rules)


def _bad_dataset(tmp_path, pictures):
    ds = datasets.Dataset.from_dict({
        "image": [_png(p) for p in pictures[:5]] + [b"garbage"],
        "text": ["a", "b", None, "d", "e", "f"], "number": [1, 2, 3, 4, 5, 6]})
    ds.save_to_disk(str(tmp_path / "bad"))
    return str(tmp_path / "bad")


def test_errors(tmp_path, pictures):
    kw = dict(mode="i2t", num_negatives=0, image_size=S, text_max_len=T, batch_size=2)
    with pytest.raises(ValueError, match="'no_such/dataset_xyz'.*HF_HUB_OFFLINE"):
        pair_rows.eval_batches(_cfg(name="no_such/dataset_xyz", tokenizer="gpt2"), **kw)
    with pytest.raises(ValueError, match="looks like a local path but does not exist"):
        pair_rows.eval_batches(_cfg(name=str(tmp_path / "nope.jsonl"), tokenizer="gpt2"), **kw)
    with pytest.raises(ConfigError, match="data.tokenizer is ''.*save_pretrained"):
        pair_rows.eval_batches(_cfg(name=str(tmp_path)), **kw)
    with pytest.raises(ConfigError, match="hflip"):
        pair_rows.eval_batches(_cfg(hflip=True), **kw)
    with pytest.raises(ConfigError, match="image_crop"):
        pair_rows.eval_batches(_cfg(image_crop=S + 1), **kw)
    with pytest.raises(ConfigError, match="text_max_len"):
        pair_rows.eval_batches(_cfg(), **{**kw, "text_max_len": 5})
    with pytest.raises(ConfigError, match="mode 'x2y'"):
        pair_rows.eval_batches(_cfg(), **{**kw, "mode": "x2y"})
    name = _bad_dataset(tmp_path, pictures)
    d = _cfg(name=name, tokenizer="gpt2", eval_split="train", eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"text_column = 'caption'.*\['image', 'text', 'number'\]"):
        pair_rows.eval_batches(_cfg(name=name, tokenizer="gpt2", text_column="caption"), **kw)
    with pytest.raises(ValueError, match=r"mode 't2t'.*query.*positive.*columns are"):
        pair_rows.eval_batches(d, **{**kw, "mode": "t2t"})
    with pytest.raises(ValueError, match=r"mode 'i2t' \(with 2 negatives\).*negatives_column"):
        pair_rows.eval_batches(d, **{**kw, "num_negatives": 2})
    with pytest.raises(ValueError, match="'number'.*int64.*not text strings"):
        pair_rows.eval_batches(_cfg(name=name, tokenizer="gpt2", text_column="number"), **kw)
    # Bad rows are found when the data is loaded, before any batch: the first one named.
    with pytest.raises(ConfigError, match=r"Row 2 of .*the positive text in column 'text' is "
                       r"missing"):
        pair_rows.eval_batches(d, **kw)
    with pytest.raises(ConfigError, match=r"Row 2 of"):
        pair_rows.train_iterator(d, **{**kw, "batch_size": 4}, seed=0)
    d.on_bad_row = "skip"  # rows 2 (no text) and 5 (an undecodable image) are dropped
    batches = list(pair_rows.eval_batches(d, **kw))
    assert sum(int(b["valid"].sum()) for b in batches) == 4
    d.on_bad_row = "error"
    with pytest.raises(ValueError, match="larger than the data"):
        pair_rows.train_iterator(_cfg(train_examples=4), **{**kw, "batch_size": 8}, seed=0)


def test_hf_text_tokenizer_leaves_the_shared_builtin_tokenizer_alone():
    """encode() sets truncation/padding on its tokenizer: the shared built-in GPT-2 one (the LM
    task's) must not inherit it."""
    from jaxtrain.data.tokenizers import load_tokenizer

    d = pair_config.default_data_config()
    d.tokenizer = "gpt2"
    assert pair_rows.load_text_tokenizer(d).encode("hello world " * 50, 16).shape == (16,)
    assert len(load_tokenizer("gpt2")("hello world " * 50)["input_ids"]) == 101
