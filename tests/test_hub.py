"""Hugging Face Hub ids for init_from / distill.teacher / data.tokenizer (jaxtrain.hub), against a
fake Hub cache in huggingface_hub's layout (models--org--name/snapshots/<rev>, refs/main) under
the tests' temp HF_HOME; HF_HUB_OFFLINE=1 (conftest), so nothing touches the network."""

import os
import uuid

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxtrain.data.tokenizers import load_tokenizer
from jaxtrain.errors import ConfigError
from jaxtrain.generate.load import run_model_config
from jaxtrain.hf.llama import save_hf
from jaxtrain.hub import cache_dir, is_hub_id, resolve
from jaxtrain.models.llama import LlamaConfig, init_params
from jaxtrain.models.registry import get_model
from jaxtrain.weights import load_pretrained

TINY = LlamaConfig(vocab_size=128, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                   intermediate_size=32)


def fake_hub_repo(write) -> tuple[str, str]:
    """(repo id, snapshot dir) of a new model in the Hub cache, its files written by
    `write(snapshot_dir)`, as `hf download` leaves them (refs/main names the revision)."""
    repo_id = f"jaxtrain-test/tiny-{uuid.uuid4().hex[:8]}"
    repo = os.path.join(cache_dir(), "models--" + repo_id.replace("/", "--"))
    revision = uuid.uuid4().hex + "abcdefgh"
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    write(snapshot)
    return repo_id, snapshot


def random_params(cfg: LlamaConfig, seed: int = 0):
    shapes = nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_hub_id_or_path():
    assert is_hub_id("openai/clip-vit-base-patch32") and is_hub_id("gpt2")
    for path in ("./model", "/abs/model", "~/model", "a/b/c", "../x", "bad id/x", ""):
        assert not is_hub_id(path), path


def test_local_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve("org/name", "init_from") == "org/name"  # it exists here: a local directory
    (tmp_path / "runs").mkdir()
    assert not is_hub_id("runs/lm")  # its parent is a local directory: a path, missing
    assert resolve("runs/lm", "init_from") == "runs/lm"


def test_init_from_and_teacher_take_a_cached_hub_id(tmp_path):
    params = random_params(TINY)
    repo_id, snapshot = fake_hub_repo(lambda d: save_hf(d, params, TINY))
    llama = get_model("llama")
    assert resolve(repo_id, "init_from") == snapshot
    for what in ("init_from", "distill.teacher"):
        cfg, loaded, _ = load_pretrained(repo_id, llama, what)
        assert cfg == TINY
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)
    # a run that started from the id: its model shape is read back the same way (generate)
    saved = {"task": "lm", "init_from": repo_id, "model": {"name": "llama", "dtype": "float32"}}
    shape = run_model_config(saved, llama)
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (16, 1, 128)


def test_tokenizer_takes_a_cached_hub_id():
    repo_id, _ = fake_hub_repo(lambda d: load_tokenizer("gpt2").save_pretrained(d))
    tok = load_tokenizer(repo_id)
    assert tok(" Hello world")["input_ids"] == [18435, 995]  # GPT-2's ids
    assert tok.eos_token == "<|endoftext|>"


def test_offline_and_not_cached_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = f"jaxtrain-test/absent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError) as e:
        load_pretrained(missing, get_model("clip"), "init_from")
    message = str(e.value)
    for text in (f"init_from {missing!r}", "not in the Hub cache", cache_dir(), "HF_HUB_OFFLINE=1",
                 f"`hf download {missing}`", f"`huggingface-cli download {missing}`",
                 "jaxtrain CLIP workdir"):
        assert text in message, (text, message)
    with pytest.raises(ConfigError, match=r"data.tokenizer .* is neither the built-in 'gpt2' "
                                          r"nor a local directory.*hf download"):
        load_tokenizer(missing)
