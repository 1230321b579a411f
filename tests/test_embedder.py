"""The embedder family (towers from the registry), pooling, token rows with prefixes, 'auto'
towers from Hugging Face directories, the decoder recipe (LoRA + gradient cache + hard negatives,
8 devices = 1) and configs/embed.py end to end."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain.data.tokenizers import TextTokenizer
from jaxtrain.models.embedder import Embedder, tower_defaults
from jaxtrain.models.pooling import pool
from jaxtrain.models.registry import get_model
from jaxtrain.tasks.clip import ClipTask

from .test_clip_task import _assert_same_step, _batches, _step
from .test_lm_task import load_config

TINY_TEXT = {
    "bert": dict(vocab_size=60, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                 max_position_embeddings=16),
    "llama": dict(vocab_size=60, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  intermediate_size=32, tie_embeddings=True),
    "clip": dict(vocab_size=60, text_width=16, text_layers=1, text_heads=2, text_max_len=16),
}


# ------------------------------------------------------------------------------ pooling

def _numpy_pool(h, m, how):
    out = []
    for row, mask in zip(h, m, strict=True):
        idx = np.flatnonzero(mask)
        if how == "mean":
            out.append(row[idx].mean(0))
        else:
            out.append(row[idx[0] if how == "cls" else idx[-1]])
    return np.stack(out)


@pytest.mark.parametrize("how", ["cls", "mean", "last_token"])
def test_pool_against_numpy_left_and_right_padding(how):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 7, 5)).astype(np.float32)
    lengths = [7, 3, 1, 5]
    right = np.arange(7)[None] < np.array(lengths)[:, None]
    left = right[:, ::-1]
    for m in (right, left):
        np.testing.assert_allclose(pool(jnp.asarray(h), jnp.asarray(m), how),
                                   _numpy_pool(h, m, how), rtol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(jnp.asarray(h), jnp.asarray(right), "max")


# ------------------------------------------------------------------------------ the model

def _embedder(tower, pooling, **fields):
    return get_model("embedder").config(dict(
        text_tower=tower, text={**tower_defaults(tower), **TINY_TEXT[tower]}, pooling=pooling,
        text_max_len=16, **fields))


def _encode(cfg, tokens, params=None):
    model = Embedder(cfg)
    if params is None:
        params = nn.unbox(get_model("embedder").init(cfg, jax.random.key(0)))
    return model.apply({"params": params}, jnp.asarray(tokens), method="encode_text"), params


@pytest.mark.parametrize("tower,pooling", [("bert", "mean"), ("bert", "cls"),
                                           ("llama", "last_token"), ("clip", "last_token")])
def test_padding_is_masked(tower, pooling):
    """-1 padding is invisible: a row padded further gives the same embedding; decoders also
    left-padded (RoPE sees position differences only)."""
    cfg = _embedder(tower, pooling)
    ids = np.array([[5, 7, 9, 11, 2], [4, 8, 2, -1, -1]])
    short, params = _encode(cfg, np.pad(ids, ((0, 0), (0, 3)), constant_values=-1))
    long, _ = _encode(cfg, np.pad(ids, ((0, 0), (0, 11)), constant_values=-1), params)
    np.testing.assert_allclose(short, long, rtol=1e-5, atol=1e-6)
    if tower == "llama":
        left = np.array([[5, 7, 9, 11, 2], [-1, -1, 4, 8, 2]])
        out, _ = _encode(cfg, left, params)
        np.testing.assert_allclose(out, short, rtol=1e-4, atol=1e-5)


def test_llama_tower_is_the_llama_encoder_and_projects():
    """The llama tower's params are LlamaEncoder's (no lm_head); last-token pooling of its hidden
    states, then the projection, is the embedding."""
    from jaxtrain.models.llama import hidden_states

    cfg = _embedder("llama", "last_token", embed_dim=8, causal=False)
    tokens = np.array([[5, 7, 9, 2, -1], [4, 8, 2, -1, -1]])
    out, params = _encode(cfg, tokens)
    assert "lm_head" not in params["text"] and out.shape == (2, 8)
    hidden = hidden_states(cfg.text_config, params["text"], jnp.maximum(tokens, 0), tokens >= 0)
    want = np.stack([hidden[0, 3], hidden[1, 2]]) @ params["text_projection"]["kernel"]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match="pooling='cls' with a causal llama tower"):
        _embedder("llama", "cls")
    with pytest.raises(ConfigError, match="text_tower='auto' picks the tower"):
        get_model("embedder").config(dict(text_tower="auto"))
    with pytest.raises(ConfigError, match=r"EmbedderConfig.text \(the bert tower\).*hidden_siz"):
        get_model("embedder").config(dict(text_tower="bert", text=dict(hidden_siz=3)))
    c = load_config("embed", "bert,runlocal")
    c.contrastive.mode = "i2t"
    with pytest.raises(ConfigError, match="has no image tower"):
        ClipTask(c)


# ------------------------------------------------------------------------------ token rows

def test_training_rows_and_tokenize_texts_agree(tmp_path):
    """Queries get contrastive.query_prefix, positives and negatives positive_prefix, rows are
    -1 padded and end with the eos for last-token pooling: the training rows equal
    task.tokenize_texts (what the retrieval evaluator embeds)."""
    rows = [{"query": f"q{i} red", "positive": f"p{i} blue", "negatives": [f"n{i}", f"m{i}"]}
            for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = load_config("embed", "decoder,runlocal", data__name=str(path), data__tokenizer="gpt2",
                    data__eval_fraction=0.25, contrastive__query_prefix="query: ",
                    contrastive__positive_prefix="passage: ")
    task = ClipTask(c)
    batch = next(task.train_iterator(seed=0, batch_size=4, process_index=0, process_count=1))
    tok = TextTokenizer("gpt2")
    for k in range(4):
        q = batch["query"][k]
        text = tok.hf.decode(q[q >= 0])
        assert text.startswith("query: q") and text.endswith("<|endoftext|>")
        i = int(text.split()[1][1:])
        np.testing.assert_array_equal(task.tokenize_texts([rows[i]["query"]], "query")[0], q)
        np.testing.assert_array_equal(
            task.tokenize_texts([rows[i]["positive"]], "positive")[0], batch["positive"][k])
        np.testing.assert_array_equal(  # negatives: the positive prefix, subset in any order
            np.sort(np.stack([task.tokenize_texts([n], "positive")[0]
                              for n in rows[i]["negatives"]]), axis=0),
            np.sort(batch["negatives"][k], axis=0))
    assert (q == -1).any() and q.shape == (40,)
    with pytest.raises(ValueError, match="role must be 'query' or 'positive'"):
        task.tokenize_texts(["x"], "document")


def test_builtin_tokenizers_per_tower():
    assert ClipTask(load_config("embed", "bert,runlocal")).data_config.tokenizer == \
        "shapes-wordpiece"
    assert ClipTask(load_config("embed", "decoder,runlocal")).data_config.tokenizer == "gpt2"
    t = TextTokenizer("shapes-wordpiece", pad_with=-1)
    ids = t.encode("query: a small red circle", 16)
    assert t.hf.decode(ids[ids >= 0]) == "[CLS] query : a small red circle [SEP]"
    assert t.hf.unk_token_id not in ids.tolist()


# ------------------------------------------------------------------------------ 'auto'

def test_auto_picks_the_tower_family_from_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    from jaxtrain.hf.embedder import tower_family

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, vocab_size=60)
    configs = {
        "bert": (transformers.BertConfig(**small), "bert"),
        "llama": (transformers.LlamaConfig(**small), "llama"),
        "qwen2": (transformers.Qwen2Config(**small), "llama"),
        "mistral": (transformers.MistralConfig(**small), "llama"),
        "clip": (transformers.CLIPConfig(text_config=small, vision_config=small), "clip"),
        "siglip": (transformers.SiglipConfig(text_config=small, vision_config=small), "siglip"),
    }
    for name, (config, family) in configs.items():
        config.save_pretrained(tmp_path / name)
        assert tower_family(tmp_path / name) == family, name
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="no registered model family reads model_type 'gpt2'"):
        tower_family(tmp_path / "gpt2")


def test_auto_bert_directory_trains_from_its_weights(tmp_path):
    """init_from a saved BertModel with text_tower='auto': the tower is bert, its weights are the
    directory's, its tokenizer the run's, and a step runs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxtrain.data.wordpiece import shapes_wordpiece
    from jaxtrain.hf import bert as hf_bert

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        vocab_size=len(shapes_wordpiece()), max_position_embeddings=64))
    model.save_pretrained(tmp_path / "bert")
    shapes_wordpiece().save_pretrained(tmp_path / "bert")
    c = load_config("embed", f"bert,runlocal,hf={tmp_path / 'bert'}")
    c.model.text_max_len = 32
    trainer = Trainer(c, devices=jax.devices()[:1])
    assert trainer.task.model_config.text_tower == "bert"
    assert trainer.task.data_config.tokenizer == str(tmp_path / "bert")
    _, want = hf_bert.load_hf(tmp_path / "bert")
    state, metrics = _step(trainer, _batches(trainer, batch_size=8)[0])
    assert np.isfinite(metrics["loss"])
    got = trainer.init_state().params["text"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(np.asarray(got),
                                  want["embeddings"]["word_embeddings"]["embedding"])


# ------------------------------------------------------------------------------ the recipe

def test_decoder_recipe_on_8_devices_equals_plain_step_on_1():
    """LoRA + gradient cache (chunks of 8) + 2 hard negatives + last-token pooling + prefixes on
    a llama tower, sharded over 8 devices (data 4 x fsdp 2), equals the plain step (no cache)
    on 1 device: loss, gradient norm and the parameters after two steps."""
    cached = load_config("embed", "decoder,runlocal", train__batch_size=16,
                         train__gradient_cache_chunk_size=8)
    cached.mesh.update(data=4, fsdp=2)
    plain = load_config("embed", "decoder,runlocal", train__batch_size=16,
                        train__use_gradient_cache=False)
    t_plain = Trainer(plain, devices=jax.devices()[:1])
    assert t_plain.task.config.contrastive.num_negatives == 2
    batches = _batches(t_plain, n=2, batch_size=16)
    t_cached = Trainer(cached)
    assert len(t_cached.mesh.devices.flat) == 8

    def two_steps(trainer):
        from jaxtrain.mesh import shard_batch

        state = trainer.init_state()
        for b in batches:
            state, metrics = trainer.train_step(state, shard_batch(b, trainer.mesh))
        return jax.device_get(state), jax.device_get(metrics)

    _assert_same_step(two_steps(t_cached), two_steps(t_plain), rtol=5e-5)


# ------------------------------------------------------------------------------ configs

@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bert", "decoder", "siglip"])
def test_embed_config_trains_and_ndcg_rises(variant, tmp_path):
    from jaxtrain import train

    c = load_config("embed", f"{variant},runlocal")
    c.train.steps = 20
    c.eval.every = 10
    c.data.train_examples = 640
    # decoder and siglip on 1 device (about half the CPU time; their 8-device steps equal the
    # 1-device ones in test_decoder_recipe_on_8_devices_... and test_clip_task.py); bert on 8
    train(c, str(tmp_path), devices=None if variant == "bert" else jax.devices()[:1])
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    ndcg = [m["eval/ir/ndcg@10"] for m in evals if "eval/ir/ndcg@10" in m]
    assert len(ndcg) == 2 and ndcg[-1] > ndcg[0], ndcg
