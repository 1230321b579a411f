"""Teacher -> student distillation, of a language model's logits or a dual encoder's embeddings.

    python -m jaxtrain.main --config=configs/lm.py                  # train a teacher first
    python -m jaxtrain.main --config=configs/distill.py:lm          # distil it into a smaller LM
    python -m jaxtrain.main --config=configs/distill.py:lm --config.distill.teacher=path/to/hf_model

    python -m jaxtrain.main --config=configs/clip.py                # a CLIP teacher (runs/clip)
    python -m jaxtrain.main --config=configs/distill.py:clip        # a smaller CLIP student
                                                                    # (in runs/distill-clip)

`lm`: a causal LM student learns from a frozen teacher's logits,
    loss = alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student).
The teacher is a jaxtrain workdir (default: runs/lm, what configs/lm.py writes; runs/lm-runlocal
with `runlocal`), a Hugging Face directory (config.json + safetensors) or a Hugging Face Hub id
(org/name, from the cache when HF_HUB_OFFLINE=1); it must share the student's vocabulary.

`clip`: a dual-encoder student matches the teacher's query–key similarity distribution,
    loss = alpha · T² · KL(softmax(S_teacher/T) ‖ softmax(S_student/T)) + (1 − alpha) · InfoNCE,
with S = exp(logit_scale) · cosine similarities over the global batch, rows and columns. The
teacher is a jaxtrain CLIP workdir (default: runs/clip, what configs/clip.py writes;
runs/clip-runlocal with `runlocal`), a Hugging Face CLIP directory or a Hub id; it must read the
same images and tokens as the student.

Default workdirs: runs/distill (lm), runs/distill-clip, runs/distill-clip-runlocal, ...

Variants: lm (the default) | clip, runlocal, steps=N, teacher=PATH.
"""

from jaxtrain.config import parse_variants, set_steps
from jaxtrain.tasks.lm import LMTask

VARIANTS = ("lm", "clip", "runlocal", "steps=N", "teacher=PATH")


def get_config(arg: str | None = None):
    args = parse_variants(arg or "lm", VARIANTS, "configs/distill.py")
    if "clip" in args:
        return clip_config(args)
    c = LMTask.default_config()
    # the workdir configs/lm.py[:runlocal] trains in (jaxtrain.cli.default_workdir)
    c.distill.teacher = args.get("teacher", "runs/lm-runlocal" if "runlocal" in args else "runs/lm")
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
        set_steps(c, int(args["steps"]))
    c.lock()
    return c


def clip_config(args: dict):
    """configs/clip.py's data and schedule; the student has half the teacher's width."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip.py")
    spec = importlib.util.spec_from_file_location("jaxtrain_configs_clip", path)
    clip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip)
    c = clip.get_config("runlocal" if "runlocal" in args else None)
    c.unlock()
    c.distill.teacher = args.get("teacher",
                                 "runs/clip-runlocal" if "runlocal" in args else "runs/clip")
    c.distill.alpha = 0.5
    c.distill.temperature = 1.0
    if "runlocal" not in args:
        c.model.update(dict(vision_width=48, vision_layers=2, vision_heads=2, text_width=48,
                            text_layers=2, text_heads=2, embed_dim=32))
    if "steps" in args:
        set_steps(c, int(args["steps"]))
    c.lock()
    return c
