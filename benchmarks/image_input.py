"""Image–text input throughput: pairs per core-second at 224 px, before and after uint8 rows.

What it measures: one process turns encoded JPEG + caption pairs into a batch, as a contrastive
training row preparer does (decode, resize + crop or augment, tokenise, stack ``batch`` rows),
and divides the pairs by the CPU seconds used (``time.process_time``: other load on the machine
does not distort it, though shared caches still may).

The images are generated, not downloaded: smooth random colour fields plus noise (natural-image
-like spectra), saved as JPEG quality 90 at 256-341 px (the shorter side 256, like a resized web
crawl), ~14 KiB each; the ``--large`` set is the same at 512-683 px (where PIL's ``draft``
reduced-size decode applies). Captions: 'a photo of picture N', tokenised by GPT-2 BPE to 77.
Generated fields decode faster than photographs of the same size (fewer non-zero DCT
coefficients), so ``--photos`` builds the set from the two real photographs scikit-learn ships
(``load_sample_images``: china.jpg, flower.jpg, 427x640): random crops (position, scale, flip)
resized to the same sizes and re-encoded at one JPEG quality chosen so the files average
``--photo-kib`` (14 KiB; 56 at ``--large``, the same bytes per pixel; the large crops are
upscaled 1.2-2.7x, as the sources are only 427 px high, so they decode faster than real ones).

Modes:

- ``float32`` (before): full decode, resize + centre crop, normalise to float32 on the host,
  stack float32 (what rows were before issue 14);
- ``uint8`` (after): reduced-size decode where it applies, resize + crop on uint8, stack uint8;
  the normalisation runs on the accelerator inside the step;
- ``uint8_rrc``: ``uint8`` with random_resized_crop (0.9, 1.0) + flip, the OpenCLIP recipe;
- ``uint8_squash``: ``uint8`` with SigLIP's squash resize.

Run: ``python benchmarks/image_input.py [--pairs N] [--large] [--photos] [--modes float32,uint8]``.
Prints one line per mode: pairs per core-second, ms per pair, the host cores one accelerator at
``--target`` pairs/s (default 6,500: one H100 training CLIP B/32) would need, and the bytes per
batch row that cross to the device.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

from jaxtrain.data.images import ImagePreprocess

SIZE = 224


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 picture: colour fields at 4, 16 and 64 cells across, plus pixel noise."""
    out = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((4, 90), (16, 32), (64, 6)):
        small = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        out += amp * np.stack([np.asarray(Image.fromarray(small[..., c]).resize(
            (width, height), Image.Resampling.BICUBIC)) for c in range(3)], -1)
    out += rng.normal(0, 2, out.shape)
    return np.clip(out + 128, 0, 255).astype(np.uint8)


def make_jpegs(n: int, seed: int = 0, scale: int = 1) -> list[bytes]:
    """``n`` JPEGs (quality 90): the shorter side 256 * scale, the longer 256-341 * scale."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        long = int(rng.integers(256, 342)) * scale
        h, w = (256 * scale, long) if i % 2 else (long, 256 * scale)
        buf = io.BytesIO()
        Image.fromarray(natural_image(rng, h, w)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def photo_jpegs(n: int, seed: int = 0, scale: int = 1, kib: float = 14.0
                ) -> tuple[list[bytes], int]:
    """``n`` JPEGs cut from scikit-learn's two sample photographs, sized as :func:`make_jpegs`.

    Each is a random box of the output's aspect ratio, ``s`` times its size, at a random position
    in a random source, flipped with probability 1/2, resized (bicubic) to a shorter side of
    ``256 * scale`` and a longer one of 256-341 ``* scale``; ``s = max(min(1, s_max),
    s_max * U(0.6, 1))`` with ``s_max`` the largest box that fits (no upscaling where it can).
    One quality (10-95) is used for all: the one whose first 32 images average closest to
    ``kib * scale**2`` KiB.
    Returns ``(jpegs, quality)``.
    """
    from sklearn.datasets import load_sample_images  # the only use of scikit-learn

    sources = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        long = int(rng.integers(256, 342)) * scale
        h, w = (256 * scale, long) if i % 2 else (long, 256 * scale)
        src = sources[int(rng.integers(len(sources)))]
        s_max = min(src.width / w, src.height / h)
        s = max(min(1.0, s_max), s_max * rng.uniform(0.6, 1.0))
        bw, bh = min(round(s * w), src.width), min(round(s * h), src.height)
        left, top = int(rng.integers(src.width - bw + 1)), int(rng.integers(src.height - bh + 1))
        crop = src.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + bw, top + bh))
        crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5
                     else crop)

    def encode(image: Image.Image, quality: int) -> bytes:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    target = kib * scale**2 * 1024
    quality = min(range(10, 96, 5), key=lambda q: abs(
        np.mean([len(encode(c, q)) for c in crops[:32]]) - target))
    return [encode(c, quality) for c in crops], quality


MODES = {
    "float32": dict(output="float32", draft=False),
    "uint8": dict(output="uint8"),
    "uint8_rrc": dict(output="uint8", augment="random_resized_crop", hflip=True),
    "uint8_squash": dict(output="uint8", resize_mode="squash"),
}


def run(mode: str, jpegs: list[bytes], batch: int, tokenizer) -> dict:
    pre = ImagePreprocess(crop=SIZE, **MODES[mode])
    augment = pre.augment != "none" or pre.hflip
    start = time.process_time()
    row_bytes = 0
    for b0 in range(0, len(jpegs), batch):
        images, texts = [], []
        for i in range(b0, min(b0 + batch, len(jpegs))):
            rng = np.random.default_rng([0, i]) if augment else None
            images.append(pre(jpegs[i], rng))
            texts.append(tokenizer.encode(f"a photo of picture {i}", 77))
        stacked = {"image": np.stack(images), "text": np.stack(texts)}
        row_bytes = sum(v[0].nbytes for v in stacked.values())
    seconds = time.process_time() - start
    return {"mode": mode, "pairs": len(jpegs), "cpu_s": round(seconds, 3),
            "pairs_per_core_s": round(len(jpegs) / seconds, 1),
            "ms_per_pair": round(1e3 * seconds / len(jpegs), 3), "row_bytes": row_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--large", action="store_true", help="512-683 px sources (draft applies)")
    p.add_argument("--photos", action="store_true",
                   help="crops of scikit-learn's sample photographs, not generated fields")
    p.add_argument("--photo-kib", type=float, default=14.0, help="mean KiB of --photos at 256 px")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--target", type=float, default=6500.0, help="pairs/s of one accelerator")
    p.add_argument("--repeats", type=int, default=2, help="best of N (CPU time)")
    args = p.parse_args()
    from jaxtrain.data.tokenizers import TextTokenizer

    tokenizer = TextTokenizer("gpt2")
    scale = 2 if args.large else 1
    if args.photos:
        jpegs, quality = photo_jpegs(args.pairs, scale=scale, kib=args.photo_kib)
    else:
        jpegs, quality = make_jpegs(args.pairs, scale=scale), 90
    print(f"{len(jpegs)} {'photo' if args.photos else 'generated'} JPEGs, mean "
          f"{np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB, "
          f"{'512-683' if args.large else '256-341'} px, quality {quality}; {SIZE} px crops")
    for mode in args.modes.split(","):
        result = max((run(mode, jpegs, args.batch, tokenizer) for _ in range(args.repeats)),
                     key=lambda r: r["pairs_per_core_s"])
        result["cores_for_target"] = round(args.target / result["pairs_per_core_s"], 1)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
