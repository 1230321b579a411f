"""CLIP on the built-in shapes data (no download).

    python -m jaxtrain.main --config=configs/clip.py              # ~minutes on a 2-core CPU
    python -m jaxtrain.main --config=configs/clip.py:runlocal     # tiny, seconds (tests)
    python -m jaxtrain.main --config=configs/clip.py:runlocal,steps=50

Variants (comma-separated after ':'): `runlocal` (tiny model and run), `steps=N`.
"""

from jaxtrain.config import parse_variants
from jaxtrain.tasks.clip import ClipTask


def get_config(arg: str | None = None):
    args = parse_variants(arg, ("runlocal", "steps=N"), "configs/clip.py")
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
    c.checkpoint.best_metric = "eval/mean_recall@1"

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
    if "steps" in args:
        c.train.steps = int(args["steps"])
    c.lock()
    return c
