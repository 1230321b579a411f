"""Image decoding and CLIP-style preprocessing as pure numpy/PIL functions (no jax, no torch).

Decoding (:func:`decode_image`) accepts every form images take in datasets: encoded bytes,
``{"bytes": ..., "path": ...}`` dicts (how Hugging Face ``datasets`` stores an ``Image()``
feature), file paths (relative ones resolved against a base directory, e.g. the directory of a
jsonl/csv file), PIL images and numpy arrays (``[H, W]``, ``[H, W, 1|3|4]``; uint8, or float in
[0, 1]). Every image becomes RGB; transparency (RGBA, LA, a palette with a transparent colour)
is composited onto white, as ``transformers``' ``convert_to_rgb`` does.

Decoding for a target size (:func:`open_image`, :func:`draft_decode`): a JPEG is opened lazily
(its header gives the size) and decoded with PIL's ``draft()``, the decoder's DCT-domain
reduced-size modes (1/2, 1/4, 1/8), at the largest reduction that keeps every side the
preprocessing reads at least as large as it needs: so only a source >= 2x larger than needed is
reduced, and the resize that follows is a downscale (or identity) as before. Other formats
decode in full.

Preprocessing, in order (all on uint8 PIL images, never through float):

- eval / no augmentation, ``resize_mode="shorter_crop"`` (default; :func:`resize_shorter` then
  :func:`center_crop`): the shorter side is
  resized to ``resize`` and the longer one to ``int(resize * long / short)`` (truncated, as in
  ``transformers``), with a PIL filter (``bicubic`` by default, as CLIP); then the centre
  ``crop x crop`` is cut at ``top = (h - crop) // 2``, ``left = (w - crop) // 2``.
  This is exactly ``transformers``' ``CLIPImageProcessor`` (PIL backend) for
  ``size={"shortest_edge": resize}``, ``crop_size=crop``.
- eval / no augmentation, ``resize_mode="squash"``: the whole image resized straight to
  ``crop x crop`` (aspect ratio not kept), as ``transformers``' ``SiglipImageProcessor``.
- ``random_resized_crop`` (training): a box of ``scale`` times the image's area and aspect ratio
  in ``ratio`` (log-uniform) is drawn as torchvision's ``RandomResizedCrop`` does (10 attempts,
  then a centre crop clamped to the ratio range), from an explicit ``np.random.Generator``, and
  resized to ``crop x crop`` (OpenCLIP trains with ``scale=(0.9, 1.0)``, bicubic).
- optional horizontal flip with probability 1/2 (training only);
- ``output="float32"``: :func:`normalize`, ``(x / 255 - mean) / std`` per channel as float32
  (``x / 255`` computed in float64 and rounded to float32 first, like ``transformers``),
  ``[crop, crop, 3]``; ``output="uint8"`` (training rows): the uint8 ``[crop, crop, 3]`` crop,
  4x smaller, normalised on the accelerator by :func:`jaxtrain.tasks.clip.normalize_images`
  inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
AUGMENTS: tuple[str, ...] = ("none", "random_resized_crop")
RESIZE_MODES: tuple[str, ...] = ("shorter_crop", "squash")
OUTPUTS: tuple[str, ...] = ("float32", "uint8")
RRC_ATTEMPTS = 10


# ----------------------------------------------------------------------------------------------
# Decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an RGB PIL image; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(
            f"an image array must be [H, W] or [H, W, 1|3|4] (channels last), got shape {a.shape}"
        )
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
                raise ValueError("a float image array must hold values in [0, 1]")
            a = np.round(a.astype(np.float64) * 255).astype(np.uint8)
        elif np.issubdtype(a.dtype, np.integer) and (a.size == 0 or 0 <= a.min() <= a.max() <= 255):
            a = a.astype(np.uint8)
        else:
            raise ValueError(
                f"an image array must be uint8, or float in [0, 1]; got dtype {a.dtype}"
            )
    return Image.fromarray(a)


class LazyImage:
    """An opened, not yet decoded image file and how to name it in errors."""

    def __init__(self, image: Image.Image, what: str):
        self.image, self.what = image, what

    def load(self) -> Image.Image:
        try:
            self.image.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ... on a corrupt body
            raise ValueError(f"{self.what} that PIL cannot decode as an image "
                             f"({type(e).__name__}: {e})") from e
        return self.image


def _open_bytes(data: bytes) -> LazyImage:
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(
            f"{len(data)} bytes that PIL cannot decode as an image ({type(e).__name__}: {e})"
        ) from e
    return LazyImage(image, f"{len(data)} bytes")


def _open_path(path: str, base_dir: str | None) -> LazyImage:
    full = os.path.expanduser(path)
    if not os.path.isabs(full) and base_dir:
        full = os.path.join(base_dir, full)
    if not os.path.exists(full):
        where = f" (resolved against {base_dir!r})" if base_dir and not os.path.isabs(path) else ""
        raise ValueError(f"the image file {path!r}{where} does not exist")
    try:
        with open(full, "rb") as f:  # read whole: no file handle outlives the call
            image = Image.open(io.BytesIO(f.read()))
    except Exception as e:
        raise ValueError(
            f"PIL cannot decode the image file {full!r} ({type(e).__name__}: {e})"
        ) from e
    return LazyImage(image, f"the image file {full!r}")


def open_image(value: Any, *, base_dir: str | None = None) -> Image.Image | LazyImage:
    """``value`` opened but not decoded: encoded bytes and files give a lazy handle whose
    ``image.size`` is known from the header (:func:`draft_decode` decodes it); PIL images and
    arrays are returned as PIL images. ValueError as :func:`decode_image`."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, bytes | bytearray | memoryview):
        image = _open_bytes(bytes(value))
    elif isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            image = _open_bytes(bytes(value["bytes"]))
        elif value.get("path"):
            image = _open_path(str(value["path"]), base_dir)
        else:
            raise ValueError("an image dict with neither 'bytes' nor 'path' set")
    elif isinstance(value, str | os.PathLike):
        path = os.fspath(value)
        if path.startswith(("http://", "https://")):
            raise ValueError(
                f"the image {path!r} is a URL; download the images and store paths or bytes"
            )
        if not path:
            raise ValueError("an empty image path")
        image = _open_path(path, base_dir)
    elif isinstance(value, np.ndarray):
        image = _array_to_pil(value)
    elif value is None:
        raise ValueError("the image is missing (None)")
    else:
        raise ValueError(
            f"a {type(value).__name__} is not an image; expected bytes, a {{'bytes', 'path'}} "
            "dict, a file path, a PIL image or a numpy array"
        )
    return image


def draft_decode(opened: Image.Image | LazyImage, need: tuple[int, int] | None = None
                 ) -> tuple[Image.Image, float]:
    """(RGB image, reduction) of an :func:`open_image` result.

    ``need`` = (width, height): the decoded image must be at least this large. A lazy JPEG is
    then decoded with ``draft()`` at 1/s scale, s the largest of 8, 4, 2, 1 with
    ``s <= min(W // width, H // height)``; ``reduction`` = 1/s maps source pixel coordinates to
    decoded ones (an s x s block of the source becomes one pixel; the decoded size is
    ``ceil(W / s) x ceil(H / s)``). Already decoded images and other formats: reduction 1.
    """
    if not isinstance(opened, LazyImage):
        return to_rgb(opened), 1.0
    image, scale = opened.image, 1.0
    if need is not None and image.format == "JPEG" and min(need) > 0:
        width = image.width  # draft() changes image.size to the reduced one
        drafted = image.draft(image.mode, (int(need[0]), int(need[1])))
        if drafted is not None:  # (mode, (0, 0, W / s, H / s))
            scale = drafted[1][2] / width
    return to_rgb(opened.load()), scale


def decode_image(value: Any, *, base_dir: str | None = None) -> Image.Image:
    """An RGB PIL image from bytes, a ``{"bytes", "path"}`` dict, a path, a PIL image or an array.

    A relative path is resolved against ``base_dir``. Raises ValueError saying what the value
    was and why it is not an image.
    """
    return draft_decode(open_image(value, base_dir=base_dir))[0]


# ----------------------------------------------------------------------------------------------
# Geometry


def _resample(interpolation: str) -> Image.Resampling:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"Unknown interpolation {interpolation!r}; expected one of {list(INTERPOLATIONS)}."
        )
    return INTERPOLATIONS[interpolation]


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size`` (longer: truncated, as HF)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio."""
    height, width = shorter_side_size(image.height, image.width, size)
    return image.resize((width, height), resample=_resample(interpolation))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size x size`` of an ``[H, W, C]`` array; a smaller image is zero-padded
    around it first (as ``transformers``' ``center_crop``)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        new_h, new_w = max(h, size), max(w, size)
        top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded = np.zeros((new_h, new_w, *image.shape[2:]), image.dtype)
        padded[top_pad:top_pad + h, left_pad:left_pad + w] = image
        top = (h - size) // 2 + top_pad
        left = (w - size) // 2 + left_pad
        return padded[max(0, top):top + size, max(0, left):left + size]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 attempts draw an area fraction uniformly from ``scale`` and an aspect ratio (w / h)
    log-uniformly from ``ratio``; the first box that fits is placed uniformly. Otherwise the
    whole image, clamped to the ratio range, is cropped at the centre.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(RRC_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
) -> Image.Image:
    """A :func:`random_resized_crop_box` of ``image`` resized to ``size x size``."""
    top, left, h, w = random_resized_crop_box(image.height, image.width, rng, scale, ratio)
    return image.resize((size, size), resample=_resample(interpolation),
                        box=(left, top, left + w, top + h))


def normalize(
    image: np.ndarray,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """float32 ``(x - mean) / std`` of an ``[H, W, 3]`` image: uint8 is first divided by 255
    (in float64, then rounded to float32, as ``transformers``), float is taken as in [0, 1]."""
    if image.dtype == np.uint8:
        x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    else:
        x = image.astype(np.float32)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The whole transform


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Decode + resize/crop (or augment) one image to ``[crop, crop, 3]``: uint8
    (``output="uint8"``, normalised later on device) or normalised float32 (``"float32"``).

    ``resize`` 0 means ``crop`` (CLIP: resize the shorter side to 224, crop 224);
    ``resize_mode``: ``"shorter_crop"`` or ``"squash"`` (resize to ``crop x crop``, SigLIP).
    Augmentation (``augment="random_resized_crop"`` and ``hflip``) only happens when an rng is
    passed. ``draft``: decode JPEGs at a reduced size where the source is >= 2x larger than
    needed (:func:`draft_decode`).
    """

    crop: int
    resize: int = 0
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    augment: str = "none"
    rrc_scale: tuple[float, float] = (0.9, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    resize_mode: str = "shorter_crop"
    output: str = "float32"
    draft: bool = True

    def __post_init__(self) -> None:
        _resample(self.interpolation)
        if self.crop < 1 or self.resize < 0:
            raise ValueError(f"crop must be >= 1 and resize >= 0; got {self.crop}, {self.resize}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"Unknown augment {self.augment!r}; expected one of {AUGMENTS}.")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"Unknown resize_mode {self.resize_mode!r}; expected one of "
                             f"{RESIZE_MODES}.")
        if self.output not in OUTPUTS:
            raise ValueError(f"Unknown output {self.output!r}; expected one of {OUTPUTS}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}"
            )

    def geometry(self, image: Image.Image | LazyImage, rng: np.random.Generator | None
                 ) -> np.ndarray:
        """uint8 ``[crop, crop, 3]`` of an image (or :func:`open_image` handle): resize + centre
        crop (or squash), or the augmentation. The random box is drawn from the source's size,
        so a reduced (draft) decode crops the same region as a full one."""
        opened = image.image if isinstance(image, LazyImage) else image
        width, height = opened.size
        resample = _resample(self.interpolation)
        size = self.crop
        if rng is not None and self.augment == "random_resized_crop":
            top, left, h, w = random_resized_crop_box(height, width, rng, self.rrc_scale,
                                                      self.rrc_ratio)
            # the box, after a 1/s reduction, must still be >= crop on both sides
            need = (math.ceil(width * size / w), math.ceil(height * size / h))
            pil, f = draft_decode(image, need if self.draft else None)
            box = (left, top, left + w, top + h)
            if f != 1.0:
                box = tuple(v * f for v in box)
            out = np.asarray(pil.resize((size, size), resample=resample, box=box))
        else:
            if self.resize_mode == "squash":
                th, tw = size, size
            else:
                th, tw = shorter_side_size(height, width, self.resize or self.crop)
            pil, f = draft_decode(image, (tw, th) if self.draft else None)
            # a reduced decode covers the source's extent scaled by f (its last pixel row and
            # column may stick out): resize exactly that extent, as the full image would be
            box = None if f == 1.0 else (0.0, 0.0, width * f, height * f)
            out = np.asarray(pil.resize((tw, th), resample=resample, box=box))
            if self.resize_mode == "shorter_crop":
                out = center_crop(out, size)
        if rng is not None and self.hflip and rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def __call__(
        self, value: Any, rng: np.random.Generator | None = None, *, base_dir: str | None = None
    ) -> np.ndarray:
        """Preprocess any :func:`decode_image` input. A float ``[crop, crop, 3]`` array with
        nothing to augment (generated data, already at its size) is only normalised, to
        float32, whatever ``output`` (it has no uint8 form to keep)."""
        augments = rng is not None and (self.augment != "none" or self.hflip)
        if (isinstance(value, np.ndarray) and value.shape == (self.crop, self.crop, 3)
                and np.issubdtype(value.dtype, np.floating) and not augments):
            return normalize(value, self.mean, self.std)
        out = self.geometry(open_image(value, base_dir=base_dir), rng)
        return out if self.output == "uint8" else normalize(out, self.mean, self.std)
