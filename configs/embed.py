"""Embedding models on the built-in shapes data (no download), scored by nDCG@10.

    python -m jaxtrain.main --config=configs/embed.py:bert       # BERT encoder, mean pooling
    python -m jaxtrain.main --config=configs/embed.py:decoder    # decoder + LoRA, last token
    python -m jaxtrain.main --config=configs/embed.py:siglip     # SigLIP, image -> text
    python -m jaxtrain.main --config=configs/embed.py:decoder,hf=/ckpt/Qwen2-0.5B \\
        --config.data.name=/data/pairs.jsonl --config.data.negatives_column=negatives

Variants (comma-separated after ':'):
  bert        (default) a BERT-family encoder from random init (model.name='embedder',
              text_tower 'bert', mean pooling), text -> text with 2 hard negatives per row;
              built-in data reads the offline WordPiece tokenizer 'shapes-wordpiece'
  decoder     the decoder-embedder recipe (E5-Mistral / Qwen-embedding): a Llama-family decoder
              (text_tower 'llama', GPT-2 BPE offline), last-token pooling on an appended eos,
              instruction prefixes, LoRA adapters, the gradient cache, hard negatives
  siglip      the SigLIP family (model.name='siglip', sigmoid loss), image -> text
  runlocal    tiny and short (tests)
  steps=N     train N steps
  hf=DIR      fine-tune a Hugging Face checkpoint: the tower from its config.json
              (model.text_tower='auto': bert / llama / qwen2 / mistral; a SigLIP directory for
              the siglip variant), its tokenizer and its shape

The eval `ir` (type information_retrieval) scores the held-out queries against the deduplicated
held-out positives: eval/ir/ndcg@10 (the checkpoint kept as best), mrr@10, recall@k; the
`retrieval` eval gives recall@1/5/10 both ways.
"""

import ml_collections

from jaxtrain.config import parse_variants, set_steps
from jaxtrain.data.shapes import CaptionTokenizer
from jaxtrain.evaluators import eval_config
from jaxtrain.models.embedder import EmbedderConfig, tower_defaults
from jaxtrain.models.registry import get_model
from jaxtrain.tasks.clip import ClipTask

VARIANTS = ("bert", "decoder", "siglip", "runlocal", "steps=N", "hf=DIR")
QUERY_PREFIX = "Instruct: find the caption of the same picture\nQuery: "


def _embedder(tower: str, text: dict, **fields) -> ml_collections.ConfigDict:
    model = EmbedderConfig.schema({"text_tower": tower})
    model["text"].update(text)
    model.update(text_tower=tower, **fields)
    return ml_collections.ConfigDict(model)


def get_config(arg: str | None = None):
    args = parse_variants(arg, VARIANTS, "configs/embed.py")
    kind = "decoder" if "decoder" in args else "siglip" if "siglip" in args else "bert"
    c = ClipTask.default_config()
    c.contrastive.mode = "t2t"
    c.contrastive.num_negatives = 2  # shapes: each differs from the positive in one attribute
    c.train.batch_size = 64
    c.train.steps = 150
    c.train.log_every = 25
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 30
    c.optim.schedule = "cosine"
    c.data.train_examples = 20_000
    c.eval.every = 25
    c.eval.batch_size = 120
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    c.checkpoint.best_metric = "eval/ir/ndcg@10"
    del c.evals["zero_shot"]
    c.evals.ir = eval_config("information_retrieval")  # the held-out set, every eval

    if kind == "bert":
        c.model = _embedder("bert", dict(
            vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
            max_position_embeddings=32), pooling="mean", text_max_len=32)
    elif kind == "decoder":
        c.model = _embedder("llama", dict(
            vocab_size=50304, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=128, tie_embeddings=True), pooling="last_token", text_max_len=40)
        c.contrastive.query_prefix = QUERY_PREFIX
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.lora.targets = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
        c.lora.trainable = r"logit_scale|.*norm.*"
        c.train.use_gradient_cache = True
        c.train.gradient_cache_chunk_size = 16
        c.optim.lr = 3e-3
    else:
        model = get_model("siglip").default_config()
        model.update(image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                     vision_heads=4, vision_mlp_dim=128, vocab_size=CaptionTokenizer().vocab_size,
                     text_max_len=16, text_width=64, text_layers=2, text_heads=4,
                     text_mlp_dim=128)
        c.model = ml_collections.ConfigDict(model)
        c.contrastive.mode = "i2t"
        c.contrastive.num_negatives = 0
        c.contrastive.loss = "siglip"
        c.train.batch_size = 128
        c.train.steps = 400
        c.eval.every = 50
        c.evals.zero_shot = eval_config("zero_shot")  # the held-out images by shape

    if "runlocal" in args:
        c.data.train_examples = 1024
        c.train.batch_size = 32
        c.train.steps = 30
        c.train.log_every = 10
        c.optim.warmup_steps = 5
        c.eval.every = 15
        c.checkpoint.every = 15
        if kind == "bert":
            c.model.text.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        elif kind == "decoder":
            c.model.text.update(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=64)
        else:
            c.model.update(vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64,
                           text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64,
                           image_size=16)
    if "hf" in args:
        c.init_from = args["hf"]
        if kind != "siglip":  # the tower and its shape from the directory's config.json
            c.model.text_tower = "auto"
            c.model.text = ml_collections.ConfigDict(tower_defaults("auto"))
            c.model.text_max_len = 128
        c.optim.lr = 2e-5 if kind == "bert" else 1e-4
    if "steps" in args:
        set_steps(c, int(args["steps"]))
    c.lock()
    return c
