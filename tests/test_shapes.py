"""Tests for the built-in shapes CLIP data (jaxtrain.data.shapes)."""

import time

import grain
import numpy as np
import pytest

from jaxtrain.data import shapes
from jaxtrain.data.shapes import (
    COLOR_RGB,
    COLORS,
    NUM_COMBOS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    CaptionTokenizer,
    Combo,
    ShapesSource,
    combo_from_id,
    combo_id,
    make_caption,
    render,
)


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer()


def _coloured_mask(image: np.ndarray) -> np.ndarray:
    """Pixels clearly brighter than the dark background (max background value is 0.16)."""
    return image.max(axis=-1) > 0.3


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: float(np.sum((rgb - np.asarray(COLOR_RGB[c])) ** 2)))


# --- combos -------------------------------------------------------------------------------


def test_constants():
    assert len(SHAPES) == 4 and len(COLORS) == 6 and len(SIZES) == 2 and len(POSITIONS) == 5
    assert NUM_COMBOS == 240
    assert set(COLOR_RGB) == set(COLORS)


def test_combo_id_round_trip():
    ids = [combo_id(*combo_from_id(i)) for i in range(NUM_COMBOS)]
    assert ids == list(range(NUM_COMBOS))
    assert len({combo_from_id(i) for i in range(NUM_COMBOS)}) == NUM_COMBOS
    assert combo_from_id(combo_id("cross", "white", "large", "center")) == Combo(
        "cross", "white", "large", "center"
    )


def test_combo_errors():
    with pytest.raises(ValueError, match="hexagon"):
        combo_id("hexagon", "red", "small", "center")
    with pytest.raises(ValueError, match="240"):
        combo_from_id(NUM_COMBOS)


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_vocab(tok):
    assert tok.vocab[:3] == ("<pad>", "<bos>", "<eos>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len(tok.vocab) == len(set(tok.vocab))
    assert CaptionTokenizer().vocab == tok.vocab  # deterministic
    for word in (*SHAPES, *COLORS, *SIZES, "top", "left", "bottom", "right", "center"):
        assert word in tok.vocab


def test_tokenizer_encode_layout_and_round_trip(tok):
    ids = tok.encode("Top right: a small green triangle.", max_len=12)
    assert ids.dtype == np.int32 and ids.shape == (12,)
    assert ids[0] == tok.bos_id
    assert ids[7] == tok.eos_id  # bos + 6 words
    assert np.all(ids[8:] == tok.pad_id)
    assert np.all(ids[1:7] > tok.eos_id)
    assert tok.decode(ids) == "top right a small green triangle"


def test_tokenizer_exact_fit(tok):
    ids = tok.encode("a red circle", max_len=5)
    assert ids.tolist()[0] == tok.bos_id and ids.tolist()[-1] == tok.eos_id
    assert tok.decode(ids) == "a red circle"


def test_tokenizer_errors(tok):
    with pytest.raises(ValueError, match="'hexagon'.*a red hexagon"):
        tok.encode("a red hexagon", max_len=16)
    with pytest.raises(ValueError, match=r"a small red circle.*6.*max_len=5"):
        tok.encode("a small red circle", max_len=5)
    with pytest.raises(ValueError, match="<pad>"):
        tok.encode("a <pad> circle", max_len=16)


def test_min_max_len(tok):
    longest = max(
        len(tok.encode(make_caption(combo_from_id(i), t), 64).nonzero()[0])
        for t in range(len(TEMPLATES))
        for i in range(NUM_COMBOS)
    )
    assert tok.min_max_len == longest
    assert tok.min_max_len <= 16  # the default max_text_len fits


def test_every_caption_mentions_its_attributes(tok):
    assert len(TEMPLATES) >= 8
    for t in range(len(TEMPLATES)):
        for i in range(NUM_COMBOS):
            combo = combo_from_id(i)
            decoded = tok.decode(tok.encode(make_caption(combo, t), tok.min_max_len))
            words = decoded.split()
            assert combo.shape in words and combo.color in words and combo.size in words
            assert f" {combo.position} " in f" {decoded} ", (decoded, combo)
            others = (set(SHAPES) | set(COLORS)) - {combo.shape, combo.color}
            assert not others & set(words)


def test_source_captions_vary(tok):
    src = ShapesSource(200)
    captions = {src.caption(i) for i in range(200)}
    templates_seen = {
        t for t in range(len(TEMPLATES)) for c in captions if c == make_caption(_combo(c), t)
    }
    assert len(templates_seen) == len(TEMPLATES)


def _combo(caption: str) -> Combo:
    """Recover the combo from a caption (test helper, relies on all attributes being present)."""
    text = f" {caption.replace(',', '').replace(':', '')} "

    def pick(values):
        return next(v for v in values if f" {v} " in text)

    return Combo(pick(SHAPES), pick(COLORS), pick(SIZES), pick(POSITIONS))


# --- source -------------------------------------------------------------------------------


def test_example_shapes_dtypes_range():
    src = ShapesSource(10, image_size=24, max_text_len=20)
    ex = src[3]
    assert set(ex) == {"image", "text", "label"}
    assert ex["image"].dtype == np.float32 and ex["image"].shape == (24, 24, 3)
    assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["text"].dtype == np.int32 and ex["text"].shape == (20,)
    assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
    assert 0 <= int(ex["label"]) < NUM_COMBOS
    caption = src.caption(3)
    assert src.tokenizer.decode(ex["text"]) == src.tokenizer.decode(
        src.tokenizer.encode(caption, 20)
    )
    assert combo_id(*_combo(caption)) == int(ex["label"]) == combo_id(*src.combo(3))


def test_determinism():
    a, b = ShapesSource(50, seed=3), ShapesSource(50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], a[i]
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
            np.testing.assert_array_equal(x[key], b[i][key])
    np.testing.assert_array_equal(a[-1]["image"], a[49]["image"])
    c = ShapesSource(50, seed=4)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    assert [int(a[i]["label"]) for i in range(50)] != [int(c[i]["label"]) for i in range(50)]
    assert not np.array_equal(a[0]["image"], a[1]["image"])


@pytest.mark.parametrize("image_size", [16, 20, 32, 64])
def test_image_sizes(image_size):
    src = ShapesSource(20, image_size=image_size)
    for i in range(20):
        image = src[i]["image"]
        assert image.shape == (image_size, image_size, 3)
        assert _coloured_mask(image).sum() >= 3  # even small shapes at 16px are visible


def test_unique_combos():
    src = ShapesSource(NUM_COMBOS, unique_combos=True, seed=1)
    labels = [int(src[i]["label"]) for i in range(NUM_COMBOS)]
    assert sorted(labels) == list(range(NUM_COMBOS))
    other = ShapesSource(NUM_COMBOS, unique_combos=True, seed=2)
    assert labels != [int(other[i]["label"]) for i in range(NUM_COMBOS)]
    small = ShapesSource(30, unique_combos=True, seed=1)
    assert [int(small[i]["label"]) for i in range(30)] == labels[:30]


def test_argument_errors():
    with pytest.raises(ValueError, match=r"num_examples=241.*240|240.*num_examples=241"):
        ShapesSource(241, unique_combos=True)
    with pytest.raises(ValueError, match="num_examples"):
        ShapesSource(0)
    with pytest.raises(ValueError, match="image_size=8"):
        ShapesSource(10, image_size=8)
    minimum = CaptionTokenizer().min_max_len
    with pytest.raises(ValueError, match=rf"max_text_len=5.*{minimum}"):
        ShapesSource(10, max_text_len=5)
    ShapesSource(10, max_text_len=minimum)  # exactly enough is fine
    with pytest.raises(IndexError):
        ShapesSource(10)[10]


# --- pixels -------------------------------------------------------------------------------


def test_centre_pixel_has_named_colour():
    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "cross"):  # a triangle's centre is also inside, see below
        for colour in COLORS:
            image = render(Combo(shape, colour, "large", "center"), rng, 32)
            assert _nearest_colour(image[16, 16]) == colour, (shape, colour)
    for colour in COLORS:
        image = render(Combo("triangle", colour, "large", "center"), rng, 32)
        assert _nearest_colour(image[18, 16]) == colour


def test_mean_shape_colour_and_position():
    rng = np.random.default_rng(1)
    for i in range(NUM_COMBOS):
        combo = combo_from_id(i)
        image = render(combo, rng, 32)
        mask = _coloured_mask(image)
        assert mask.sum() > 0, combo
        assert _nearest_colour(image[mask].mean(axis=0)) == combo.color, combo
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        if combo.position == "center":
            assert abs(cx - 16) < 4 and abs(cy - 16) < 4, combo
        else:
            assert (cy < 16) == combo.position.startswith("top"), combo
            assert (cx < 16) == combo.position.endswith("left"), combo


def test_large_shapes_bigger_than_small():
    rng = np.random.default_rng(2)
    for shape in SHAPES:
        for position in POSITIONS:
            small = _coloured_mask(render(Combo(shape, "white", "small", position), rng, 32)).sum()
            large = _coloured_mask(render(Combo(shape, "white", "large", position), rng, 32)).sum()
            assert large > 2.5 * small, (shape, position, small, large)


def test_background_is_dark_and_noisy():
    image = render(Combo("circle", "red", "small", "top left"), np.random.default_rng(0), 32)
    corner = image[-6:, -6:]  # far from a small top-left shape
    assert corner.max() < 0.2 and corner.std() > 0.01


def test_render_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image_size"):
        render(Combo("circle", "red", "small", "center"), rng, 8)
    with pytest.raises(ValueError, match="orange"):
        render(("circle", "orange", "small", "center"), rng, 32)


def test_fast():
    src = ShapesSource(1000)
    start = time.perf_counter()
    for i in range(1000):
        src[i]
    assert time.perf_counter() - start < 1.0


# --- grain --------------------------------------------------------------------------------


def test_through_grain():
    src = ShapesSource(20, image_size=16, max_text_len=16, seed=5)
    batches = list(grain.MapDataset.source(src).batch(8))
    assert len(batches) == 3
    first = batches[0]
    assert first["image"].shape == (8, 16, 16, 3) and first["image"].dtype == np.float32
    assert first["text"].shape == (8, 16) and first["text"].dtype == np.int32
    assert first["label"].shape == (8,) and first["label"].dtype == np.int32
    np.testing.assert_array_equal(first["label"], [int(src[i]["label"]) for i in range(8)])
    assert batches[-1]["image"].shape == (4, 16, 16, 3)


def test_module_has_no_jax_dependency():
    assert "jax" not in shapes.__dict__
