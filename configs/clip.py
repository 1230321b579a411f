"""Contrastive dual encoders (CLIP / SigLIP) on the built-in shapes data (no download).

    python -m jaxtrain.main --config=configs/clip.py              # ~minutes on a 2-core CPU
    python -m jaxtrain.main --config=configs/clip.py:runlocal     # tiny, seconds (tests)
    python -m jaxtrain.main --config=configs/clip.py:siglip,mode=t2t,negatives=2
    python -m jaxtrain.main --config=configs/clip.py:hf=/path/to/clip-vit-base-patch32 \\
        --config.data.name=/path/to/image_text_dataset
    python benchmarks/train_step.py --config=configs/clip.py:b32 --steps=20   # the peer model

Variants (comma-separated after ':'):
  runlocal         tiny model and run (tests)
  steps=N          train N steps
  siglip           the SigLIP sigmoid loss (learnable temperature and bias)
  mode=M           i2t (default) | t2i | t2t | i2i; `unified` = one forward pass (t2t, i2i)
  negatives=N      N hard negatives per row (shapes: differ from the positive in one attribute)
  gradcache=C      the gradient cache, embedding C rows at a time
  local            the jax.shard_map loss (each device scores its queries against all keys)
  hf=PATH          start from a Hugging Face CLIP directory (its shape, tokenizer, preprocessing)
  b32              CLIP ViT-B/32 + 12-layer text tower at 224 px, batch 256, bf16 (benchmark)
"""

from jaxtrain.config import parse_variants, set_steps
from jaxtrain.tasks.clip import ClipTask

VARIANTS = ("runlocal", "steps=N", "siglip", "mode=M", "unified", "negatives=N", "gradcache=C",
            "local", "hf=PATH", "b32")


def get_config(arg: str | None = None):
    args = parse_variants(arg, VARIANTS, "configs/clip.py")
    c = ClipTask.default_config()

    c.model.update(dict(image_size=32, patch_size=8, vision_width=96, vision_layers=3,
                        vision_heads=4, text_width=96, text_layers=3, text_heads=4, embed_dim=64))
    c.train.batch_size = 128
    c.train.steps = 600
    c.train.log_every = 50
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.eval.every = 200
    c.eval.batch_size = 120
    c.checkpoint.every = 200
    c.checkpoint.keep = 2
    c.checkpoint.best_metric = "eval/retrieval/mean_recall@1"

    if "runlocal" in args:
        c.model.update(dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                            vision_heads=2, text_width=32, text_layers=1, text_heads=2,
                            embed_dim=32))
        c.data.train_examples = 2048
        c.train.batch_size = 64
        c.train.steps = 60
        c.train.log_every = 10
        c.optim.warmup_steps = 10
        c.eval.every = 30
        c.eval.batch_size = 120
        c.checkpoint.every = 30
    if "b32" in args:
        # The peer benchmark's model (../shared/bench/peer_torch.py): ViT-B/32 at 224 px and a
        # 12-layer, 512-wide text tower over 77 tokens of a 49408-token vocabulary.
        c.model.update(dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                            vision_heads=12, text_width=512, text_layers=12, text_heads=8,
                            text_max_len=77, vocab_size=49408, embed_dim=512,
                            activation="quick_gelu", dtype="bfloat16"))
        c.train.batch_size = 256
        c.data.train_examples = 2048
        c.eval.every = 0
        c.checkpoint.every = 0
    if "siglip" in args:
        c.contrastive.loss = "siglip"
    if "mode" in args:
        c.contrastive.mode = args["mode"]
    if "unified" in args:
        c.contrastive.unified_encoder = True
    if "negatives" in args:
        c.contrastive.num_negatives = int(args["negatives"])
    if "gradcache" in args:
        c.train.use_gradient_cache = True
        c.train.gradient_cache_chunk_size = int(args["gradcache"])
    if "local" in args:
        c.contrastive.local_loss = True
    if "hf" in args:
        c.init_from = args["hf"]
    if "steps" in args:
        set_steps(c, int(args["steps"]))
    c.lock()
    return c
