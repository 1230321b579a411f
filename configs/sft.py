"""Chat supervised fine-tuning: loss on the assistant's tokens only.

    python -m jaxtrain.main --config=configs/sft.py                 # built-in chat data, CPU
    python -m jaxtrain.main --config=configs/sft.py:runlocal        # seconds (tests)
    python -m jaxtrain.main --config=configs/sft.py --config.init_from=path/to/hf_model \\
        --config.data.source=chats.jsonl --config.data.tokenizer=path/to/hf_model

Data: rows in `messages` (role/content), `conversations` (ShareGPT from/value),
`prompt`/`response` (or instruction/output) format, or `data.text_fields="question,answer"`.
The tokenizer's chat template is used, ChatML when it has none.
`init_from` (a Hugging Face directory or a jaxtrain workdir) sets the model's shape and weights.
Evals: `val` (perplexity of the held-out answers) and `generation` (greedy answers to the
held-out prompts: BLEU, ROUGE, exact match; samples in <workdir>/samples/generation/).

Variants: runlocal, steps=N, nopack (one conversation per row), size=tiny|small.
"""

from jaxtrain.config import parse_variants, set_steps
from jaxtrain.evaluators import eval_config
from jaxtrain.tasks.lm import LMTask

VARIANTS = ("runlocal", "steps=N", "nopack", "size=tiny|small")


def get_config(arg: str | None = None):
    args = parse_variants(arg, VARIANTS, "configs/sft.py")
    c = LMTask.default_config()
    # The tiny model of configs/lm.py, with grouped-query attention (3 query heads, 1 kv head).
    c.model.update(dict(hidden_size=96, num_layers=4, num_heads=3, num_kv_heads=1,
                        intermediate_size=256, tie_embeddings=True, vocab_size=50304))
    if args.get("size", "tiny") == "small":
        c.model.update(dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                            intermediate_size=2048, tie_embeddings=False, dtype="bfloat16"))
    c.data.kind = "chat"
    c.data.source = "builtin"
    c.data.packing = "nopack" not in args
    c.data.seq_len = 256
    c.data.train_examples = 4000
    c.data.eval_examples = 200
    c.data.eval_rows = 0
    c.train.batch_size = 8
    c.train.steps = 300
    c.train.log_every = 25
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.warmup_steps = 30
    c.optim.schedule = "cosine"
    c.eval.every = 100
    c.eval.batch_size = 32
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.checkpoint.best_metric = "eval/val/loss"
    c.checkpoint.best_mode = "min"
    # Greedy answers to the held-out conversations' last user turns, scored against the
    # reference answers: eval/generation/{bleu,rouge1,rouge2,rougeL,exact_match,...}.
    c.evals.generation = eval_config("generation", max_examples=100, max_new_tokens=32)
    if "runlocal" in args:
        c.model.update(dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64))
        c.data.seq_len = 128
        c.data.train_examples = 200
        c.data.eval_examples = 40
        c.train.batch_size = 8
        c.train.steps = 20
        c.train.log_every = 5
        c.optim.warmup_steps = 2
        c.eval.every = 10
        c.eval.batch_size = 16
        c.checkpoint.every = 10
        c.evals.generation.max_examples = 16
    if "steps" in args:
        set_steps(c, int(args["steps"]))
    c.lock()
    return c
