"""Token stores at scale: a ~2 GB text corpus, training RSS growth and time to the first batch.

    python benchmarks/token_store_rss.py                       # 100 MB base x 20 = ~2 GB
    python benchmarks/token_store_rss.py --base_mb=20 --scale=5 --steps=10   # quick

1. Writes a base corpus on ``--dir`` (``base.jsonl``, ``--base_mb`` MB): the built-in Shakespeare
   plays, cut into documents of ~40 paragraphs, copy after copy, each copy's paragraphs shuffled
   within each document (a different corpus, the same language); a multiple of 50 documents.
2. Builds its token stores with ``jaxtrain.data.token_store.build_token_store`` (the code of
   ``python -m jaxtrain.data.prepare``) in ``--workers`` processes: CPU seconds of this process
   and its children, tokens per CPU-second.
3. Writes the big corpus ``big.jsonl`` = the base file ``--scale`` times, and its stores as the
   base stores repeated ``--scale`` times, under the big corpus's own key (its path and file
   fingerprint). That is exactly the store tokenizing ``big.jsonl`` would write: documents are
   tokenized one by one, and with a multiple of 50 documents per copy every copy splits into
   train/validation rows alike (checked: the first two copies' stores equal a tokenization of
   the doubled file when ``--check``). Tokenizing it instead would take ``scale`` times step 2.
4. Trains a tiny Llama (configs/lm.py:runlocal with seq_len 128) for ``--steps`` steps in a
   fresh process per run: on the big store, on the base store, on random tokens (``synthetic``:
   the RSS that training costs without any text data) and on the base corpus in memory
   (``data.token_store=memory``, today's path). Reported per run: the process's RSS after
   imports, its growth at the first batch and after training (current, and peak: VmHWM), and
   the seconds (wall and CPU) from creating the train iterator to its first batch.

Figures: CPU seconds (other agents share this machine's cores; its load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def write_base_corpus(path: str, target_mb: float, seed: int = 0) -> int:
    import numpy as np

    from jaxtrain.data.text import shakespeare_documents

    docs = []
    for play in shakespeare_documents("all"):
        paras = [p for p in play.split("\n\n") if p.strip()]
        docs += ["\n\n".join(paras[i:i + 40]) for i in range(0, len(paras), 40)]
    rng = np.random.default_rng(seed)
    size, n = 0, 0
    with open(path, "w") as f:
        while size < target_mb * 1e6 or n % 50:
            doc = docs[n % len(docs)]
            if n >= len(docs):  # later copies: the document's paragraphs in a new order
                paras = doc.split("\n\n")
                doc = "\n\n".join(paras[i] for i in rng.permutation(len(paras)))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def lm_config(source: str, store: str, steps: int):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "configs"))
    import lm  # configs/lm.py

    c = lm.get_config("runlocal")
    c.data.update(dict(source=source, token_store=store, max_documents=0, seq_len=128))
    if source == "synthetic":  # the control: random tokens, no text data at all
        c.data.update(dict(kind="synthetic", train_examples=512, eval_examples=64))
    c.train.steps = steps
    c.eval.every = steps
    c.checkpoint.every = steps
    return c


def repeat_store(base: str, out: str, scale: int, key: dict) -> None:
    import numpy as np

    from jaxtrain.data.token_store import META_FILE, OFFSETS_FILE, TOKENS_FILE

    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(base, META_FILE)) as f:
        meta = json.load(f)
    with open(os.path.join(base, TOKENS_FILE), "rb") as src, \
            open(os.path.join(out, TOKENS_FILE), "wb") as dst:
        for _ in range(scale):
            src.seek(0)
            shutil.copyfileobj(src, dst, 16 << 20)
    offsets = np.load(os.path.join(base, OFFSETS_FILE))
    n = int(offsets[-1])
    big = np.concatenate([offsets[:-1] + k * n for k in range(scale)] + [[scale * n]])
    np.save(os.path.join(out, OFFSETS_FILE), big.astype(np.int64))
    meta.update(key=key, num_documents=len(big) - 1, num_tokens=scale * n,
                documents_read=meta["documents_read"] * scale)
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def child(args) -> None:
    """One training run (a fresh process): peak RSS growth and time to the first batch."""
    from jaxtrain import api
    from jaxtrain.tasks.lm import LMTask

    c = lm_config(args.source, args.store, args.steps)
    rss0, _ = rss_mb()
    task = LMTask(c)
    t0, p0 = time.time(), time.process_time()
    it = task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1)
    next(it)
    first = (time.time() - t0, time.process_time() - p0)
    rss_data, _ = rss_mb()
    api.train(c, args.workdir)
    rss1, peak = rss_mb()
    print(json.dumps(dict(first_batch_s=round(first[0], 2), first_batch_cpu_s=round(first[1], 2),
                          rss_after_imports_mb=round(rss0), rss_growth_at_first_batch_mb=round(
                              rss_data - rss0, 1), rss_growth_after_training_mb=round(rss1 - rss0),
                          peak_rss_growth_mb=round(peak - rss0))))


def train_run(args, source: str, store: str) -> dict:
    workdir = os.path.join(args.dir, "workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, __file__, "--child", f"--source={source}", f"--store={store}",
         f"--steps={args.steps}", f"--workdir={workdir}", f"--dir={args.dir}"],
        capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"training run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/jaxtrain_token_store_bench")
    p.add_argument("--base_mb", type=float, default=100)
    p.add_argument("--scale", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--check", action="store_true", help="verify the repeated store on 2 copies")
    p.add_argument("--runs", default="big,base,synthetic,base-in-memory",
                   help="training runs: big, base (stores), synthetic (no text data), "
                        "base-in-memory (data.token_store=memory: today's rows, tokenized in the "
                        "training process)")
    p.add_argument("--train_only", action="store_true",
                   help="only the training runs, on the corpora and stores already in --dir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from jaxtrain.data.token_store import STORE_SPLITS, TokenStore, build_token_store, open_store
    from jaxtrain.data.tokenizers import load_lm_tokenizer

    os.makedirs(args.dir, exist_ok=True)
    print(f"load average: {os.getloadavg()}")
    if args.train_only:  # the corpora and stores of an earlier run
        big, base = (os.path.join(args.dir, f) for f in ("big.jsonl", "base.jsonl"))
        big_store, base_store = (os.path.join(args.dir, f) for f in ("big_store", "base_store"))
        return train_runs(args, big, big_store, base, base_store)
    base = os.path.join(args.dir, "base.jsonl")
    n = write_base_corpus(base, args.base_mb)
    print(f"base corpus: {os.path.getsize(base) / 1e6:.0f} MB, {n} documents")
    base_store = os.path.join(args.dir, "base_store")
    shutil.rmtree(base_store, ignore_errors=True)
    c0 = cpu_seconds()
    build_token_store(lm_config(base, base_store, args.steps), base_store, workers=args.workers)
    cpu = cpu_seconds() - c0
    tokens = sum(TokenStore(os.path.join(base_store, s)).num_tokens for s in STORE_SPLITS)
    print(f"tokenized {tokens} tokens in {cpu:.0f} CPU-s ({args.workers} workers): "
          f"{tokens / cpu:,.0f} tokens per CPU-second; store "
          f"{os.path.getsize(os.path.join(base_store, 'train', 'tokens.bin')) / 1e6:.0f} MB")

    big = os.path.join(args.dir, "big.jsonl")
    with open(base, "rb") as src, open(big, "wb") as dst:
        for _ in range(args.scale):
            src.seek(0)
            shutil.copyfileobj(src, dst, 16 << 20)
    big_store = os.path.join(args.dir, "big_store")
    c = lm_config(big, big_store, args.steps)
    tok = load_lm_tokenizer(c.data.tokenizer, c.model.vocab_size)
    from jaxtrain.data import token_store

    for split in STORE_SPLITS:
        key = token_store.data_store_key(c.data, tok, split, "")[0]
        repeat_store(os.path.join(base_store, split), os.path.join(big_store, split),
                     args.scale, key)
    big_tokens = TokenStore(os.path.join(big_store, "train")).num_tokens
    print(f"big corpus: {os.path.getsize(big) / 1e9:.2f} GB, train store {big_tokens} tokens "
          f"({os.path.getsize(os.path.join(big_store, 'train', 'tokens.bin')) / 1e9:.2f} GB); "
          f"tokenizing it here would take ~{cpu * args.scale:.0f} CPU-s")
    if args.check:
        import numpy as np

        two = os.path.join(args.dir, "two.jsonl")
        with open(two, "wb") as f:
            f.write(open(base, "rb").read() * 2)
        built = open_store(lm_config(two, os.path.join(args.dir, "two_store"),
                                     args.steps).data, tok, "train")
        ref = TokenStore(os.path.join(big_store, "train"))
        same = np.array_equal(np.asarray(built.tokens),
                              np.asarray(ref.tokens[:built.num_tokens])) and \
            np.array_equal(built.offsets, ref.offsets[:len(built.offsets)])
        print(f"check: tokenizing 2 copies == the repeated store's first 2 copies: {same}")
    train_runs(args, big, big_store, base, base_store)


def train_runs(args, big: str, big_store: str, base: str, base_store: str) -> None:

    runs = {"big": (big, big_store), "base": (base, base_store), "synthetic": ("synthetic", ""),
            "base-in-memory": (base, "memory")}
    for name in args.runs.split(","):
        source, store = runs[name]
        r = train_run(args, source, store)
        print(f"run {name}: " + json.dumps(r))


if __name__ == "__main__":
    main()
