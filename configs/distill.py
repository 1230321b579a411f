"""Teacher -> student distillation.

    python -m jaxtrain.main --config=configs/lm.py                  # train a teacher first
    python -m jaxtrain.main --config=configs/distill.py:lm          # distil it into a smaller LM
    python -m jaxtrain.main --config=configs/distill.py:lm --config.distill.teacher=path/to/hf_model

`lm`: a causal LM student learns from a frozen teacher's logits,
    loss = alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student).
The teacher is a jaxtrain workdir (default: runs/lm, what configs/lm.py writes) or a Hugging Face
directory (config.json + safetensors); it must share the student's vocabulary.

Variants: lm (the default), runlocal, steps=N, teacher=PATH.
"""

from jaxtrain.config import parse_variants
from jaxtrain.tasks.lm import LMTask


def get_config(arg: str | None = None):
    args = parse_variants(arg or "lm", ("lm", "runlocal", "steps=N", "teacher=PATH"),
                          "configs/distill.py")
    c = LMTask.default_config()
    c.distill.teacher = args.get("teacher", "runs/lm")
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
    # Half the default configs/lm.py model (the teacher) in width and depth.
    c.model.update(dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                        intermediate_size=192, tie_embeddings=True, vocab_size=50304))
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = 300
    c.train.log_every = 25
    c.optim.lr = 3e-3
    c.optim.b2 = 0.95
    c.optim.clip_norm = 1.0
    c.optim.warmup_steps = 30
    c.optim.schedule = "cosine"
    c.optim.min_lr_ratio = 0.1
    c.eval.every = 100
    c.data.eval_rows = 256
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    if "runlocal" in args:
        c.model.update(dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            intermediate_size=32))
        c.data.seq_len = 32
        c.data.max_documents = 4
        c.train.steps = 10
        c.train.log_every = 5
        c.optim.warmup_steps = 2
        c.eval.every = 10
        c.eval.batch_size = 16
        c.data.eval_rows = 32
        c.checkpoint.every = 10
    if "steps" in args:
        c.train.steps = int(args["steps"])
    c.lock()
    return c
