"""Causal LM pretraining (a Llama-family decoder) on the built-in Shakespeare with GPT-2 BPE.

    python -m jaxtrain.main --config=configs/lm.py                  # tiny model, CPU minutes
    python -m jaxtrain.main --config=configs/lm.py:runlocal         # seconds (tests)
    python -m jaxtrain.main --config=configs/lm.py:size=350m --config.data.source=data/*.jsonl
    python benchmarks/train_step.py --config=configs/lm.py:size=1b,bench   # the H100 benchmark

Variants (comma-separated after ':'):
  size=tiny|small|350m|1b|7b|70b  model size (1b = the 953M model of shared/bench/peer_torch.py;
                              7b / 70b: Llama-2's layers, 70b with 8 key-value heads; the
                              vocabulary is the tokenizer's, 50304 for GPT-2, not Llama's 32000)
  runlocal                    tiny and short (tests)
  steps=N                     train steps
  scan                        scan over layers (faster compiles, slower steps on GPU)
  pack                        pack whole documents into rows instead of cutting one stream
  curriculum                  sequence-length curriculum: seq_len/4, then /2, then full
  bench                       random tokens, batch 8 x 2048, vocab 32000, bf16, cuDNN attention
"""

from jaxtrain.config import parse_variants, set_steps
from jaxtrain.tasks.lm import LMTask

VARIANTS = ("size=tiny|small|350m|1b|7b|70b", "runlocal", "steps=N", "scan", "pack", "curriculum",
            "bench")

SIZES = {
    # tiny: sized for a 2-core CPU, where GPT-2's 50k-token output layer dominates the cost.
    "tiny": dict(hidden_size=96, num_layers=4, num_heads=3, num_kv_heads=3,
                 intermediate_size=256, tie_embeddings=True),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                  intermediate_size=2048),
    "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16,
                 intermediate_size=2816),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
               intermediate_size=5632),
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               intermediate_size=11008),
    "70b": dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                intermediate_size=28672),
}


def get_config(arg: str | None = None):
    args = parse_variants(arg, VARIANTS, "configs/lm.py")
    size = args.get("size", "tiny")
    if size not in SIZES:
        raise ValueError(f"configs/lm.py: size={size!r}; valid sizes: {', '.join(SIZES)}.")
    c = LMTask.default_config()
    c.model.update(SIZES[size])
    c.model.vocab_size = 50304  # GPT-2's 50257, padded to a multiple of 128
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = 300
    c.train.log_every = 25
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.95
    c.optim.clip_norm = 1.0
    c.optim.warmup_steps = 30
    c.optim.schedule = "cosine"
    c.optim.min_lr_ratio = 0.1
    c.eval.every = 100
    c.eval.batch_size = 64
    c.data.eval_rows = 256
    c.checkpoint.every = 200
    c.checkpoint.keep = 2
    c.checkpoint.best_metric = "eval/val/loss"
    c.checkpoint.best_mode = "min"
    if size != "tiny":  # accelerator sizes
        c.model.dtype = "bfloat16"
        c.data.seq_len = 2048
        c.train.batch_size = 64
        c.train.steps = 20_000
        c.optim.lr = 3e-4
        c.optim.warmup_steps = 1000
        c.eval.every = 1000
        c.checkpoint.every = 1000
        c.model.remat_policy = "dots_no_batch" if size in ("1b", "7b", "70b") else "none"
    if "runlocal" in args:
        c.model.update(dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64))
        c.data.seq_len = 32
        c.data.max_documents = 4
        c.train.batch_size = 8
        c.train.steps = 20
        c.train.log_every = 5
        c.optim.warmup_steps = 2
        c.eval.every = 10
        c.eval.batch_size = 16
        c.data.eval_rows = 32
        c.checkpoint.every = 10
    if "bench" in args:
        c.data.kind = "synthetic"
        c.model.vocab_size = 32000
        c.model.dtype = "bfloat16"
        c.model.attention_impl = "cudnn"
        c.model.remat_policy = "none"
        c.data.seq_len = 2048
        c.data.train_examples = 64
        c.data.eval_examples = 8
        c.train.batch_size = 8
    if "scan" in args:
        c.model.scan_layers = True
    if "pack" in args:
        c.data.mode = "pack"
    if "steps" in args:  # before the curriculum, whose stages are fractions of the run
        set_steps(c, int(args["steps"]))
    if "curriculum" in args:
        n = c.data.seq_len
        c.data.curriculum = f"{n // 4}:{c.train.steps // 4},{n // 2}:{c.train.steps // 2}"
    c.lock()
    return c
