"""Built-in image-caption data for CLIP training: coloured shapes, generated on the fly.

Each example is a small RGB image of one shape on a dark, noisy background, paired with a
caption that describes it, e.g. ``"a small red circle at the top left"``. An image is fully
described by a *combo* of four attributes:

- shape: circle, square, triangle, cross;
- colour: red, green, blue, yellow, purple, white;
- size: small (about a fifth of the image side) or large (about half of it);
- position: one of the four quadrants or the centre.

That gives ``4 * 6 * 2 * 5 = 240`` combos. Captions are written with several templates that
phrase and order the attributes differently, so a text encoder has to learn the words rather
than memorise a single sentence layout.

Why this is a real retrieval task: picking the right caption out of all 240 requires reading
every attribute from the pixels. Colour needs per-pixel colour, shape needs local geometry
(a cross and a square of the same colour and size differ only in their corners), size needs
the extent of the object, and position needs global spatial layout. The shape's brightness,
exact size and exact position are jittered and the background is noisy, so no single pixel or
fixed template gives the answer away, yet the task is clean and quickly learnable by a small
model. Nothing is downloaded: every example is a deterministic function of ``(seed, index)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
NUM_COMBOS: int = len(SHAPES) * len(COLORS) * len(SIZES) * len(POSITIONS)

# RGB in [0, 1], well separated from each other and from the dark background.
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.85, 0.18),
    "blue": (0.18, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.68, 0.15, 0.92),
    "white": (0.96, 0.96, 0.96),
}

# Shape side (or diameter) as a fraction of the image side, sampled uniformly per example.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.20, 0.25), "large": (0.45, 0.50)}

# Shape centre anchors as (x, y) fractions of the image side, y pointing down.
POSITION_ANCHOR: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}

CENTER_JITTER = 0.06  # max centre offset, fraction of the image side
BACKGROUND_RANGE = (0.02, 0.16)  # uniform background noise
BRIGHTNESS_RANGE = (0.85, 1.0)  # multiplicative jitter of the shape colour
SHAPE_NOISE = 0.04  # uniform per-pixel noise amplitude on the shape
MIN_IMAGE_SIZE = 16

# Every template mentions all four attributes exactly once.
TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} at the {position}",
    "a photo of a {size} {color} {shape} in the {position}",
    "{position}: a {size} {color} {shape}",
    "there is a {color} {shape}, {size}, at the {position}",
    "a {size} {color} {shape}, {position}",
    "an image showing a {color} {shape} of {size} size near the {position}",
    "{size} {shape} colored {color} in the {position} of the picture",
    "the {position} has a {size} {color} {shape}",
)

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
_PUNCTUATION = ",:."


class Combo(NamedTuple):
    """The four attributes that fully describe one image."""

    shape: str
    color: str
    size: str
    position: str


def _attribute_index(values: tuple[str, ...], value: str, kind: str) -> int:
    if value not in values:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {values}")
    return values.index(value)


def combo_id(shape: str, color: str, size: str, position: str) -> int:
    """Return the id in ``[0, NUM_COMBOS)`` of a combo; inverse of :func:`combo_from_id`."""
    i = _attribute_index(SHAPES, shape, "shape")
    i = i * len(COLORS) + _attribute_index(COLORS, color, "color")
    i = i * len(SIZES) + _attribute_index(SIZES, size, "size")
    return i * len(POSITIONS) + _attribute_index(POSITIONS, position, "position")


def combo_from_id(i: int) -> Combo:
    """Return the combo with id ``i``; inverse of :func:`combo_id`."""
    if not 0 <= int(i) < NUM_COMBOS:
        raise ValueError(f"combo id {i} out of range [0, {NUM_COMBOS})")
    rest, position = divmod(int(i), len(POSITIONS))
    rest, size = divmod(rest, len(SIZES))
    shape, color = divmod(rest, len(COLORS))
    return Combo(SHAPES[shape], COLORS[color], SIZES[size], POSITIONS[position])


def make_caption(combo: Sequence[str], template: int = 0) -> str:
    """Return the caption of ``combo`` (shape, color, size, position) from a template index."""
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template index {template} out of range [0, {len(TEMPLATES)})")
    c = Combo(*combo)
    combo_id(*c)  # validates the attribute names
    return TEMPLATES[template].format(**c._asdict())


def _words(text: str) -> list[str]:
    """Lowercase, strip punctuation, split on whitespace."""
    return text.lower().translate(str.maketrans("", "", _PUNCTUATION)).split()


@functools.cache
def _all_captions() -> tuple[str, ...]:
    return tuple(
        make_caption(combo_from_id(i), t) for t in range(len(TEMPLATES)) for i in range(NUM_COMBOS)
    )


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set()
    for template in TEMPLATES:
        for field in ("shape", "color", "size", "position"):
            template = template.replace("{" + field + "}", " ")
        words.update(_words(template))
    for values in (SHAPES, COLORS, SIZES, POSITIONS):
        for value in values:
            words.update(_words(value))
    return SPECIAL_TOKENS + tuple(sorted(words))


class CaptionTokenizer:
    """Fixed word-level tokenizer for the shapes captions.

    Ids: ``pad=0``, ``bos=1``, ``eos=2``, then every template and attribute word in sorted order.
    """

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __init__(self) -> None:
        self.vocab: tuple[str, ...] = _vocabulary()
        self._ids = {word: i for i, word in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.vocab)

    @functools.cached_property
    def min_max_len(self) -> int:
        """Length of the longest encoded caption (bos and eos included): the minimum max_len."""
        return max(len(_words(c)) for c in _all_captions()) + 2

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """Encode ``text`` as int32 ``[bos] + words + [eos]``, 0-padded to ``max_len``."""
        words = _words(text)
        unknown = [w for w in words if w not in self._ids or w in SPECIAL_TOKENS]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r} in text {text!r}")
        length = len(words) + 2
        if length > max_len:
            raise ValueError(
                f"text {text!r} encodes to {length} tokens (with bos/eos), "
                f"more than max_len={max_len}"
            )
        ids = np.full((max_len,), PAD_ID, dtype=np.int32)
        ids[:length] = [BOS_ID, *(self._ids[w] for w in words), EOS_ID]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode ids back to space-separated words, skipping pad/bos and stopping at eos."""
        words = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            words.append(self.vocab[i])
        return " ".join(words)


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
    """Boolean mask of ``shape`` of extent ``side`` centred at the origin of ``x``/``y``."""
    half = side / 2
    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "triangle":  # apex up at y = -half, base at y = +half
        return (y <= half) & (np.abs(x) <= (y + half) / 2)
    if shape == "cross":
        bar = side / 6
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
        return inside & ((np.abs(x) <= bar) | (np.abs(y) <= bar))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _shape_geometry(
    combo: Combo, rng: np.random.Generator, image_size: int
) -> tuple[float, float, float]:
    """Sample (centre x, centre y, side) in pixels, keeping the shape inside the image."""
    side = rng.uniform(*SIZE_RANGE[combo.size])
    anchor = np.asarray(POSITION_ANCHOR[combo.position])
    centre = anchor + rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2)
    centre = np.clip(centre, side / 2, 1 - side / 2)
    return centre[0] * image_size, centre[1] * image_size, side * image_size


def render(combo: Sequence[str], rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    """Draw ``combo`` (shape, color, size, position) as a float32 ``(H, W, 3)`` image in [0, 1]."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is too small; need at least {MIN_IMAGE_SIZE}")
    c = Combo(*combo)
    combo_id(*c)  # validates the attribute names
    cx, cy, side = _shape_geometry(c, rng, image_size)
    colour = np.asarray(COLOR_RGB[c.color]) * rng.uniform(*BRIGHTNESS_RANGE)
    image = rng.uniform(*BACKGROUND_RANGE, size=(image_size, image_size, 3))
    coords = np.arange(image_size) + 0.5  # pixel centres
    mask = _shape_mask(c.shape, coords[None, :] - cx, coords[:, None] - cy, side)
    shape_pixels = colour + rng.uniform(-SHAPE_NOISE, SHAPE_NOISE, size=image.shape)
    image = np.where(mask[..., None], shape_pixels, image)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# Entropy tag for the unique-combo permutation; never equal to a (seed, index) pair.
_PERMUTATION_TAG = (0x5EED, 0xC0DE)


class ShapesSource:
    """Random-access source of shapes examples, usable with ``grain.MapDataset.source``.

    ``source[i]`` is ``{'image': float32 (H, W, 3), 'text': int32 (max_text_len,),
    'label': int32 combo id}``, a pure function of ``(seed, i)``.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        image_size: int = 32,
        max_text_len: int = 16,
        seed: int = 0,
        unique_combos: bool = False,
    ) -> None:
        self.tokenizer = CaptionTokenizer()
        _validate_args(num_examples, image_size, max_text_len, seed, unique_combos, self.tokenizer)
        self.num_examples = num_examples
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.seed = seed
        self.unique_combos = unique_combos
        self._permutation: np.ndarray | None = None
        if unique_combos:
            perm_rng = np.random.default_rng([seed, *_PERMUTATION_TAG])
            self._permutation = perm_rng.permutation(NUM_COMBOS)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"ShapesSource(num_examples={self.num_examples}, image_size={self.image_size}, "
            f"max_text_len={self.max_text_len}, seed={self.seed}, "
            f"unique_combos={self.unique_combos})"
        )

    def _normalize_index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self.num_examples
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return i

    def _spec(self, index: int) -> tuple[int, int, np.random.Generator]:
        """Return (combo id, template index, rng positioned for rendering) for ``index``."""
        i = self._normalize_index(index)
        rng = np.random.default_rng([self.seed, i])
        if self._permutation is not None:
            label = int(self._permutation[i])
        else:
            label = int(rng.integers(NUM_COMBOS))
        template = int(rng.integers(len(TEMPLATES)))
        return label, template, rng

    def caption(self, index: int) -> str:
        """Return the caption text of example ``index``."""
        label, template, _ = self._spec(index)
        return make_caption(combo_from_id(label), template)

    def combo(self, index: int) -> Combo:
        """Return the combo of example ``index``."""
        return combo_from_id(self._spec(index)[0])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        label, template, rng = self._spec(index)
        combo = combo_from_id(label)
        return {
            "image": render(combo, rng, self.image_size),
            "text": self.tokenizer.encode(make_caption(combo, template), self.max_text_len),
            "label": np.asarray(label, dtype=np.int32),
        }


def _validate_args(
    num_examples: int,
    image_size: int,
    max_text_len: int,
    seed: int,
    unique_combos: bool,
    tokenizer: CaptionTokenizer,
) -> None:
    if num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is too small; need at least {MIN_IMAGE_SIZE}")
    if max_text_len < tokenizer.min_max_len:
        raise ValueError(
            f"max_text_len={max_text_len} is too short for the longest caption; "
            f"need at least {tokenizer.min_max_len}"
        )
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if unique_combos and num_examples > NUM_COMBOS:
        raise ValueError(
            f"unique_combos=True allows at most {NUM_COMBOS} examples "
            f"(one per combo), got num_examples={num_examples}"
        )


# ----------------------------------------------------------------------------------------------
# Pairs for dual-encoder training in every retrieval mode


ATTRIBUTES: tuple[str, ...] = Combo._fields  # ("shape", "color", "size", "position")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = dict(
    zip(ATTRIBUTES, (SHAPES, COLORS, SIZES, POSITIONS), strict=True)
)
# Combos that differ from a given one in exactly one attribute: 3 + 5 + 1 + 4.
NUM_NEIGHBOURS: int = sum(len(v) - 1 for v in ATTRIBUTE_VALUES.values())
MODALITIES: tuple[str, ...] = ("image", "text")
# Entropy tag of a pair's second view and negatives; the (seed, index) rng renders the first.
_PAIR_TAG = (0x9A1F, 0x5EC0)


def neighbour_combos(combo: Sequence[str]) -> tuple[Combo, ...]:
    """The 13 combos that differ from ``combo`` in exactly one attribute (attribute by attribute,
    values in their declared order): the hardest negatives for a retrieval model."""
    c = Combo(*combo)
    combo_id(*c)  # validates the attribute names
    return tuple(
        c._replace(**{attribute: value})
        for attribute, values in ATTRIBUTE_VALUES.items()
        for value in values
        if value != getattr(c, attribute)
    )


def differing_attributes(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    """Names of the attributes in which combos ``a`` and ``b`` differ."""
    return tuple(f for f, x, y in zip(ATTRIBUTES, Combo(*a), Combo(*b), strict=True) if x != y)


class ShapesPairs:
    """Random-access (query, positive, hard negatives) shapes examples for every pair of
    modalities (the retrieval modes of :data:`jaxtrain.data.pair_config.PAIR_MODES`).

    ``source[i]`` is ``{"query", "positive", "negatives", "label"}``: an image is a float32
    ``(image_size, image_size, 3)`` array in [0, 1], a text the caption string (tokenise it with
    :class:`CaptionTokenizer` or any other tokenizer), ``negatives`` a list of
    ``num_negatives`` items of the positive's modality, ``label`` the int32 combo id. All are a
    pure function of ``(seed, i)``. Example ``i`` has the combo, template and first rendering of
    ``ShapesSource(num_examples, seed=seed, unique_combos=...)[i]``; ``modalities`` is
    (query, positive):

    - ``("image", "text")``: that image and that caption (exactly ``ShapesSource``'s example);
      ``("text", "image")``: the same, swapped;
    - ``("text", "text")``: that caption, and a paraphrase: the same combo in another template;
    - ``("image", "image")``: that image, and a second rendering of the combo (new size/position
      jitter, brightness and noise);
    - negatives: combos that differ from the positive's in exactly one attribute (see
      :func:`neighbour_combos`), distinct while ``num_negatives <= 13`` (beyond that the 13
      repeat), each captioned with a random template or freshly rendered.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        modalities: tuple[str, str] = ("image", "text"),
        num_negatives: int = 0,
        image_size: int = 32,
        seed: int = 0,
        unique_combos: bool = False,
    ) -> None:
        modalities = tuple(modalities)
        if len(modalities) != 2 or not set(modalities) <= set(MODALITIES):
            raise ValueError(
                f"modalities must be (query, positive), each one of {MODALITIES}; got "
                f"{modalities!r}."
            )
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self._base = ShapesSource(
            num_examples, image_size=image_size, max_text_len=CaptionTokenizer().min_max_len,
            seed=seed, unique_combos=unique_combos,
        )
        self.num_examples, self.image_size, self.seed = num_examples, image_size, seed
        self.modalities, self.num_negatives = modalities, num_negatives
        self.unique_combos = unique_combos

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"ShapesPairs(num_examples={self.num_examples}, modalities={self.modalities!r}, "
            f"num_negatives={self.num_negatives}, image_size={self.image_size}, "
            f"seed={self.seed}, unique_combos={self.unique_combos})"
        )

    def _negative_combos(self, combo: Combo, rng: np.random.Generator) -> list[Combo]:
        neighbours = neighbour_combos(combo)
        order: list[int] = []
        while len(order) < self.num_negatives:
            order.extend(rng.permutation(len(neighbours)).tolist())
        return [neighbours[k] for k in order[: self.num_negatives]]

    def _rngs(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        """(second-view rng, negatives rng) of example ``index``, independent streams."""
        i = self._base._normalize_index(index)
        return (np.random.default_rng([self.seed, i, *_PAIR_TAG, 0]),
                np.random.default_rng([self.seed, i, *_PAIR_TAG, 1]))

    def combos(self, index: int) -> dict[str, Combo | list[Combo]]:
        """The combos of example ``index``: ``{"query", "positive", "negatives"}``."""
        combo = combo_from_id(self._base._spec(index)[0])
        return {"query": combo, "positive": combo,
                "negatives": self._negative_combos(combo, self._rngs(index)[1])}

    def __getitem__(self, index: int) -> dict:
        label, template, rng = self._base._spec(index)
        combo = combo_from_id(label)
        view_rng, negatives_rng = self._rngs(index)
        query_kind, positive_kind = self.modalities
        caption, image = make_caption(combo, template), None
        if "image" in self.modalities:
            image = render(combo, rng, self.image_size)  # the first rendering, from (seed, i)
        if query_kind != positive_kind:
            query, positive = (image, caption) if query_kind == "image" else (caption, image)
        elif query_kind == "text":  # a paraphrase: the same combo in another template
            other = (template + 1 + int(view_rng.integers(len(TEMPLATES) - 1))) % len(TEMPLATES)
            query, positive = caption, make_caption(combo, other)
        else:  # a second rendering of the combo
            query, positive = image, render(combo, view_rng, self.image_size)
        negatives: list = []
        for c in self._negative_combos(combo, negatives_rng):
            if positive_kind == "text":
                negatives.append(make_caption(c, int(negatives_rng.integers(len(TEMPLATES)))))
            else:
                negatives.append(render(c, negatives_rng, self.image_size))
        return {"query": query, "positive": positive, "negatives": negatives,
                "label": np.asarray(label, dtype=np.int32)}
