"""The sentence-transformers export (:mod:`jaxtrain.export.sentence_transformers`).

The folder of a hand-built embedder (random params, BERT and decoder towers, cls / mean /
last_token pooling, with and without a projection, with instruction prefixes) is loaded with
``SentenceTransformer(path, device='cpu')``; its ``encode()`` (with the role's prompt) must equal
jaxtrain's embeddings of the training rows of the same texts. A tiny trained ``embedder`` run
goes through the CLI end to end (slow).
"""

import json
import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxtrain.data.tokenizers import TextTokenizer  # noqa: E402
from jaxtrain.export.checks import ExportError  # noqa: E402
from jaxtrain.export.sentence_transformers import (  # noqa: E402
    check_config,
    embeddings,
    verify_folder,
    write_folder,
)
from jaxtrain.models.embedder import EmbedderConfig, init_params  # noqa: E402

TEXTS = ["a red circle", "two small blue squares left of a green triangle", "star",
         "the big yellow shape above the purple one, twice"]
BERT = {"vocab_size": 173, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 32}
LLAMA = {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 48}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer with an eos (as GPT-2 / Qwen2's), saved as a directory."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 5 + ["query: passage: instruct: find"], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    path = str(tmp_path_factory.mktemp("bpe"))
    fast.save_pretrained(path)
    return path


def _embedder(tower: str, tokenizer: str, seed: int = 0, **model):
    cfg = EmbedderConfig.from_dict({
        "text_tower": tower, "text": BERT if tower == "bert" else LLAMA, "text_max_len": 16,
        **model})
    params = nn.unbox(init_params(cfg, jax.random.key(seed)))
    leaves, tree = jax.tree.flatten(params)  # move norms / biases away from 1 / 0
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
                                       for x, k in zip(leaves, keys, strict=True)])
    rows = TextTokenizer(tokenizer, **EmbedderConfig.text_rows(
        {"pooling": cfg.pooling}))
    return cfg, params, rows


def _tokenize(rows, cfg, prefixes):
    def tokenize(texts, role):
        return np.stack([rows.encode(prefixes.get(role, "") + t, cfg.text_max_len)
                         for t in texts])
    return tokenize


CASES = {
    "bert-mean": ("bert", {"pooling": "mean"}, {"query": "query: "}),
    "bert-cls-dense": ("bert", {"pooling": "cls", "embed_dim": 8, "normalize": False},
                       {"query": "query: ", "positive": "passage: "}),
    "qwen2-last-dense": ("llama", {"pooling": "last_token", "embed_dim": 8,
                                   "text": {**LLAMA, "attention_bias": True}},
                         {"query": "instruct: find "}),
    "llama-mean": ("llama", {"pooling": "mean"}, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_folder_encode_equals_jaxtrain(tmp_path, bpe_dir, case):
    tower, model, prefixes = CASES[case]
    tokenizer = "shapes-wordpiece" if tower == "bert" else bpe_dir
    cfg, params, rows = _embedder(tower, tokenizer, **model)
    written = write_folder(str(tmp_path), cfg, params, tokenizer, prefixes, model_type="llama")
    modules = json.load(open(tmp_path / "modules.json"))
    kinds = [m["type"].rsplit(".", 1)[1] for m in modules]
    assert kinds == ["Transformer", "Pooling"] + ["Dense"] * bool(cfg.embed_dim) + \
        ["Normalize"] * cfg.normalize
    assert json.load(open(tmp_path / "sentence_bert_config.json"))["max_seq_length"] == 16
    if tower == "llama":
        want = "Qwen2Model" if "attention_bias" in model.get("text", {}) else "LlamaModel"
        assert written["model"] == want
    tokenize = _tokenize(rows, cfg, prefixes)
    # the export's own check (tokenizer ids, then encode() vs the embeddings)...
    check = verify_folder(str(tmp_path), cfg, params, tokenize, prefixes)
    assert "encode()" in check["checked"]
    # ...and the same comparison written out here
    model_st = st.SentenceTransformer(str(tmp_path), device="cpu")
    for role, prompt in (("query", "query"), ("positive", "document")):
        kwargs = {"prompt_name": prompt} if prompt in model_st.prompts and \
            model_st.prompts[prompt] else {}
        theirs = model_st.encode(TEXTS, convert_to_numpy=True, **kwargs)
        ours = embeddings(cfg, params, tokenize(TEXTS, role))
        assert theirs.shape == (len(TEXTS), cfg.embed_dim or 32)
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    if prefixes.get("query"):
        assert model_st.prompts["query"] == prefixes["query"]


def test_refusals(bpe_dir):
    cfg, _, _ = _embedder("llama", bpe_dir, causal=False, pooling="mean")
    with pytest.raises(ExportError, match="bidirectional"):
        check_config(cfg, bpe_dir)
    cfg, _, _ = _embedder("bert", "shapes-wordpiece")
    with pytest.raises(ExportError, match="caption vocabulary"):
        check_config(cfg, "")
    clip = EmbedderConfig.from_dict({"text_tower": "clip", "text": {"vocab_size": 64},
                                     "text_max_len": 16})
    with pytest.raises(ExportError, match="'clip'"):
        check_config(clip, "shapes-wordpiece")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bert", "decoder"])
def test_cli_exports_a_trained_embedder(variant, tmp_path):
    """configs/embed.py (bert: WordPiece, mean pooling; decoder: GPT-2 BPE, LoRA merged,
    last-token pooling on an appended eos, a query prefix) trained 2 steps, exported through
    `python -m jaxtrain.export --format=sentence-transformers`: encode() equals the run's task
    embeddings of the same texts."""
    import subprocess
    import sys

    from absl import app

    from jaxtrain import Trainer
    from jaxtrain.export import cli, export_params, inference_task
    from jaxtrain.tasks import get_task
    from jaxtrain.weights import read_run
    from tests.test_lm_task import ROOT, load_config

    run, out = str(tmp_path / "run"), tmp_path / "st"
    c = load_config("embed", f"{variant},runlocal", train__steps=2, eval__every=0,
                    optim__warmup_steps=1,
                    data__train_examples=64, checkpoint__every=2)
    Trainer(c, run, devices=jax.devices()[:1]).train()
    if variant == "decoder":  # the command line
        proc = subprocess.run(
            [sys.executable, "-m", "jaxtrain.export", f"--workdir={run}",
             "--format=sentence-transformers", f"--out={out}"],
            capture_output=True, text=True, timeout=600, env=os.environ.copy(), cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:  # what it calls
        cli(run, formats="sentence-transformers", out=str(out))
    config, params = read_run(run)
    task = inference_task(config)
    model = st.SentenceTransformer(str(out), device="cpu")
    if variant == "decoder":
        assert model.prompts["query"] == c.contrastive.query_prefix
        assert json.load(open(out / "config.json"))["architectures"] == ["LlamaModel"]
    for role, kwargs in (("query", {"prompt_name": "query"} if variant == "decoder" else {}),
                         ("positive", {})):
        ours = np.asarray(task.encode(params, "text", task.tokenize_texts(TEXTS, role)))
        theirs = model.encode(TEXTS, convert_to_numpy=True, **kwargs)
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    if variant == "bert":  # a model this format cannot hold is refused, naming the format
        lm = load_config("lm", data__kind="synthetic", model__vocab_size=128)
        lm_params = nn.unbox(jax.jit(get_task("lm")(lm).init_params)(jax.random.key(0)))
        export_params(str(tmp_path / "lm"), jax.device_get(lm_params), lm.to_dict())
        with pytest.raises(SystemExit, match="'sentence-transformers' writes text embedding"):
            cli(str(tmp_path / "lm"), formats="sentence-transformers", out=str(tmp_path / "no"))
        with pytest.raises(app.UsageError, match="export it alone"):
            cli(run, formats="sentence-transformers,safetensors", out=str(tmp_path / "no"))
        assert not os.path.exists(tmp_path / "no")
