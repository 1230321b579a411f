"""DPO: preference optimisation of a chat model against a frozen reference (the starting policy).

    python -m jaxtrain.main --config=configs/sft.py                 # 1. SFT (writes runs/sft)
    python -m jaxtrain.main --config=configs/dpo.py                 # 2. DPO from runs/sft
    python -m jaxtrain.main --config=configs/dpo.py:lora            #    ... with LoRA adapters
    python -m jaxtrain.main --config=configs/dpo.py --config.init_from=path/to/hf_model \\
        --config.data.source=pairs.jsonl --config.data.tokenizer=path/to/hf_model

Data: `prompt` / `chosen` / `rejected` columns (strings or chat `messages` lists; or `chosen` /
`rejected` full conversations sharing the prompt turns); optional `ref_chosen_logps` /
`ref_rejected_logps` columns with `dpo.reference='precomputed'`. The built-in set: arithmetic
questions in the built-in SFT chat style, chosen = the correct answer, rejected = a wrong one.

Variants: runlocal, steps=N, lora (rank-8 adapters on q/k/v/o; the base is the reference),
loss=sigmoid|ipo|hinge|robust, reference=model|precomputed|none, init=PATH.
"""

from jaxtrain.config import parse_variants, set_steps
from jaxtrain.tasks.dpo import DPOTask

VARIANTS = ("runlocal", "steps=N", "lora", "loss=sigmoid|ipo|hinge|robust",
            "reference=model|precomputed|none", "init=PATH")


def get_config(arg: str | None = None):
    args = parse_variants(arg, VARIANTS, "configs/dpo.py")
    c = DPOTask.default_config()
    # the shape of the model comes from there: the workdir of configs/sft.py[:runlocal]
    c.init_from = args.get("init", "runs/sft-runlocal" if "runlocal" in args else "runs/sft")
    c.model.vocab_size = 50304
    c.data.max_length = 96
    c.data.max_prompt_length = 64
    c.data.train_examples = 2000
    c.data.eval_examples = 200
    c.dpo.beta = 0.1
    c.dpo.loss_type = args.get("loss", "sigmoid")
    c.dpo.reference = args.get("reference", "model")
    if c.dpo.loss_type == "robust":
        c.dpo.label_smoothing = 0.1
    c.train.batch_size = 16
    c.train.steps = 200
    c.train.log_every = 25
    c.optim.lr = 2e-4
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.warmup_steps = 20
    c.optim.schedule = "cosine"
    c.eval.every = 50
    c.eval.batch_size = 40
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.checkpoint.best_metric = "eval/val/rewards/accuracies"
    c.checkpoint.best_mode = "max"
    if "lora" in args:
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.lora.dropout = 0.05
        c.optim.lr = 2e-3
    if "runlocal" in args:
        c.data.max_length = 64
        c.data.max_prompt_length = 48
        c.data.train_examples = 256
        c.data.eval_examples = 40
        c.train.batch_size = 8
        c.train.steps = 20
        c.train.log_every = 5
        c.optim.warmup_steps = 2
        c.eval.every = 10
        c.eval.batch_size = 40
        c.checkpoint.every = 10
    if "steps" in args:
        set_steps(c, int(args["steps"]))
    c.lock()
    return c
