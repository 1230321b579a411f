"""Image–text input from prepared ArrayRecord shards: pairs per core-second at 224 px.

What it measures: the real training input path, ``jaxtrain.data.pair_rows.train_iterator``
(grain: shuffled random access, row preparation, batching; ``data.workers=0``,
``data.prefetch=0`` so everything runs in this thread), reading

- ``raw``: the JPEG files themselves (a jsonl of paths; decode, resize + crop), for reference;
- ``webdataset``: the same JPEGs and captions in img2dataset-style tar shards (``.jpg`` +
  ``.txt``), read by offset (:mod:`jaxtrain.data.webdataset`);
- ``prepared``: shards written by ``python -m jaxtrain.data.prepare`` with uint8 224 x 224 crops
  (``data.augment='none'``): read, check, stack; no decode;
- ``prepared_rrc``: shards of 256-px-shorter-side uint8 images, random_resized_crop (0.9, 1.0)
  and flips at training time (the OpenCLIP recipe);
- ``prepared_jpeg``: ``--image_format=jpeg`` shards (quality 95 crops, decoded again).

Each row also tokenises its caption with GPT-2 BPE to 77 tokens (the shards store text). The
figure is pairs divided by the CPU seconds of the process (``time.process_time``), so other
load on the machine does not distort it (shared caches still may); best of ``--repeats``. The
JPEGs are :mod:`benchmarks.image_input`'s (256-341 px, ~14 KiB, quality 90). Preparing is
timed too (pairs per core-second, once) and the shards' bytes per pair are printed.

Run: ``python benchmarks/prepared_input.py [--pairs 512] [--batches 12] [--modes ...]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_input import make_jpegs  # noqa: E402 - the same images as the raw-JPEG benchmark

SIZE, TEXT_LEN = 224, 77
MODES = {
    "raw": dict(prepared=None, augment="none"),
    "webdataset": dict(prepared=None, augment="none", tars=True),
    "prepared": dict(prepared="raw", augment="none"),
    "prepared_rrc": dict(prepared="raw", augment="random_resized_crop", hflip=True),
    "prepared_jpeg": dict(prepared="jpeg", augment="none"),
}


def data_config(name: str, augment: str, hflip: bool = False):
    from jaxtrain.data import pair_config

    d = pair_config.default_data_config()
    d.name, d.tokenizer, d.eval_fraction, d.eval_split = name, "gpt2", 0.0, ""
    d.augment, d.hflip, d.prefetch, d.workers = augment, hflip, 0, 0
    return d


def shard_bytes(out: str) -> int:
    return sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
               if f.startswith("train-") and f.endswith(".array_record"))


def run(d, batches: int, batch: int) -> float:
    """Pairs per core-second of ``batches`` batches after one warm-up batch."""
    from jaxtrain.data import pair_rows

    kw = dict(mode="i2t", num_negatives=0, image_size=SIZE, text_max_len=TEXT_LEN)
    it = pair_rows.train_iterator(d, seed=0, batch_size=batch, **kw)
    next(it)
    start = time.process_time()
    for _ in range(batches):
        b = next(it)
    seconds = time.process_time() - start
    assert b["query"].shape == (batch, SIZE, SIZE, 3) and b["query"].dtype == np.uint8
    return batches * batch / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="timed batches per repeat")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=2, help="best of N (CPU time)")
    p.add_argument("--target", type=float, default=6500.0, help="pairs/s of one accelerator")
    args = p.parse_args()
    from jaxtrain.data.pair_writer import prepare_pairs

    tmp = tempfile.mkdtemp(prefix="jaxtrain-prepared-bench-")
    jpegs = make_jpegs(args.pairs)
    rows = []
    for i, data in enumerate(jpegs):
        with open(os.path.join(tmp, f"{i}.jpg"), "wb") as f:
            f.write(data)
        rows.append({"image": f"{i}.jpg", "text": f"a photo of picture {i}"})
    source = os.path.join(tmp, "pairs.jsonl")
    with open(source, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tars = os.path.join(tmp, "tars")
    os.makedirs(tars)
    for s in range(0, len(jpegs), 100):
        with tarfile.open(os.path.join(tars, f"{s // 100:05d}.tar"), "w") as tar:
            for i in range(s, min(s + 100, len(jpegs))):
                for name, data in ((f"{i:09d}.jpg", jpegs[i]),
                                   (f"{i:09d}.txt", rows[i]["text"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    print(f"{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB, "
          f"256-341 px; {SIZE} px crops, captions to {TEXT_LEN} GPT-2 tokens, batch {args.batch}")
    for mode in args.modes.split(","):
        spec = MODES[mode]
        hflip = spec.get("hflip", False)
        d = data_config(tars if spec.get("tars") else source, spec["augment"], hflip)
        extra = {}
        if spec["prepared"] is not None:
            out = os.path.join(tmp, mode)
            start = time.process_time()
            prepare_pairs(d, out, mode="i2t", num_negatives=0, image_size=SIZE,
                          text_max_len=TEXT_LEN, image_format=spec["prepared"])
            seconds = time.process_time() - start
            extra = {"prepare_pairs_per_core_s": round(len(jpegs) / seconds, 1),
                     "shard_kib_per_pair": round(shard_bytes(out) / len(jpegs) / 1024, 1)}
            d = data_config(out, spec["augment"], hflip)
        rate = max(run(d, args.batches, args.batch) for _ in range(args.repeats))
        print(json.dumps({"mode": mode, "pairs_per_core_s": round(rate, 1),
                          "ms_per_pair": round(1e3 / rate, 3),
                          "cores_for_target": round(args.target / rate, 1), **extra}))


if __name__ == "__main__":
    main()
