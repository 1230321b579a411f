"""The model registry (jaxtrain.models.registry) and the one pretrained-weights path
(jaxtrain.weights): families by name and kind, their config / init / inference / FLOPs, the
family of a Hugging Face directory, and loading weights from a workdir or an HF directory with
errors that name the config key."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtrain.errors import ConfigError
from jaxtrain.models import ModelFamily, get_model, model_names, register_model
from jaxtrain.models.clip import CLIP, ClipConfig
from jaxtrain.models.llama import Llama, LlamaConfig
from jaxtrain.models.registry import CAUSAL_LM, DUAL_ENCODER, family_for_hf_dir
from jaxtrain.weights import load_pretrained, read_run, run_family

TINY_LM = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
               intermediate_size=24)
TINY_CLIP = dict(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
                 vocab_size=32, text_max_len=8, text_width=16, text_layers=1, text_heads=2,
                 embed_dim=8)


def _params(family: ModelFamily, cfg, seed: int = 0):
    return jax.device_get(nn.unbox(jax.jit(family.init, static_argnums=0)(
        cfg, jax.random.PRNGKey(seed))))


def _workdir(path, params, config: dict, step: int = 3) -> str:
    """A jaxtrain checkpoint of `params` (as a run's, only what read_state reads)."""
    step_dir = os.path.join(path, "checkpoints", str(step))
    ocp.PyTreeCheckpointer().save(os.path.join(step_dir, "state"), {"params": params})
    os.makedirs(os.path.join(step_dir, "meta"))
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        json.dump({"step": step, "config": config}, f)
    return str(path)


def _leaves_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ the registry


def test_builtin_families_and_lookup_errors():
    assert {"llama", "clip"} <= set(model_names())
    llama, clip = get_model("llama"), get_model("clip")
    assert (llama.kind, llama.config_cls, llama.module) == (CAUSAL_LM, LlamaConfig, Llama)
    assert (clip.kind, clip.config_cls, clip.module) == (DUAL_ENCODER, ClipConfig, CLIP)
    assert get_model("llama", kind=CAUSAL_LM) is llama
    with pytest.raises(ConfigError, match=r"config.model.name 'lama'.*Did you mean 'llama'"):
        get_model("lama")
    with pytest.raises(ConfigError, match=r"'clip' is a dual_encoder model.*trains causal_lm "
                                          r"models: set model.name to one of \[.*'llama'"):
        get_model("clip", kind=CAUSAL_LM)
    with pytest.raises(TypeError, match="takes a ModelFamily"):
        register_model("llama")


def test_config_drops_the_name_and_names_a_bad_key():
    family = get_model("llama")
    d = family.default_config()
    assert d["name"] == "llama" and d["hidden_size"] == LlamaConfig().hidden_size
    assert family.config({**d, "hidden_size": 32}) == LlamaConfig(hidden_size=32)
    with pytest.raises(ConfigError, match=r"config.model: LlamaConfig.num_heads must be a "
                                          "positive int"):
        family.config({**d, "num_heads": 0})
    with pytest.raises(ConfigError, match=r"config.model: unknown LlamaConfig keys \['nope'\]"):
        family.config({**d, "nope": 1})
    # pretrained_config: the shape from the weights, how to run from the run's config
    shape = LlamaConfig(**TINY_LM, dtype="bfloat16")
    cfg = family.pretrained_config(shape, {**d, "dtype": "float32", "hidden_size": 999,
                                           "scan_layers": True})
    assert cfg == dataclasses.replace(shape, dtype="float32", scan_layers=True)


@pytest.mark.parametrize("name,cfg", [("llama", LlamaConfig(**TINY_LM)),
                                      ("clip", ClipConfig(**TINY_CLIP))])
def test_init_inference_and_inputs_are_the_modules(name, cfg):
    family = get_model(name)
    params = _params(family, cfg)
    specs = family.inference_inputs(cfg, 2, 8) if name == "llama" else \
        family.inference_inputs(cfg, 2)
    rng = np.random.default_rng(0)
    inputs = {k: (rng.integers(1, 30, s.shape) if s.dtype == jnp.int32
                  else rng.standard_normal(s.shape)).astype(s.dtype) for k, s in specs.items()}
    out = family.inference(cfg, params, inputs)
    if name == "llama":
        assert set(specs) == {"tokens"} and specs["tokens"].shape == (2, 8)
        want = {"logits": Llama(cfg).apply({"params": params}, inputs["tokens"])[0]}
        with pytest.raises(ValueError, match="need seq_len"):
            family.inference_inputs(cfg, 2)
    else:
        assert specs["image"].shape == (2, 16, 16, 3) and specs["text"].shape == (2, 8)
        full = CLIP(cfg).apply({"params": params}, inputs["image"], inputs["text"])
        want = {k: full[k] for k in ("image_embeds", "text_embeds")}
        with pytest.raises(ValueError, match="no sequence length to set"):
            family.inference_inputs(cfg, 2, 8)
    assert sorted(out) == sorted(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(want[k]), rtol=1e-6,
                                   atol=1e-6)


def test_flops_formula():
    cfg = LlamaConfig(**TINY_LM)
    assert get_model("llama").flops_per_token(cfg, 32) == cfg.flops_per_token(32)
    assert get_model("clip").flops_per_token is None  # the trainer counts XLA's FLOPs


def test_family_for_hf_dir(tmp_path):
    for model_type, name in [("llama", "llama"), ("qwen2", "llama"), ("mistral", "llama"),
                             ("clip", "clip")]:
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert family_for_hf_dir(str(tmp_path / model_type)) is get_model(name)
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match=r"no registered model family reads model_type 't5'"):
        family_for_hf_dir(str(tmp_path / "t5"))
    assert family_for_hf_dir(str(tmp_path / "t5"), default=get_model("clip")).name == "clip"
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        family_for_hf_dir(str(tmp_path))


def test_a_registered_family_is_found_by_name():
    toy = dataclasses.replace(get_model("llama"), name="toy_lm", title="toy language model",
                              hf_module="", hf_model_types=())
    assert register_model(toy) is toy
    assert get_model("toy_lm", kind=CAUSAL_LM) is toy and "toy_lm" in model_names()
    with pytest.raises(ConfigError, match="'toy_lm' model family has no Hugging Face"):
        toy.load_hf("anywhere")


# ------------------------------------------------------------------ pretrained weights


def test_load_pretrained_from_a_workdir(tmp_path):
    clip = get_model("clip")
    cfg = ClipConfig(**TINY_CLIP)
    params = _params(clip, cfg)
    data = {"tokenizer": "", "image_mean": [0.1, 0.2, 0.3], "image_std": [1.0, 1.0, 1.0],
            "name": "shapes"}
    run = _workdir(tmp_path / "run", params, {"task": "clip", "model": {
        "name": "clip", **dataclasses.asdict(cfg)}, "data": data, "lora": {"rank": 0}})
    loaded = load_pretrained(run, clip, "init_from")
    assert loaded.config == cfg
    _leaves_equal(loaded.params, params)
    # the data settings the family says its weights imply, and only those
    assert loaded.data == {k: data[k] for k in ("tokenizer", "image_mean", "image_std")}
    assert read_run(run)[0]["task"] == "clip"

    with pytest.raises(ConfigError, match=r"distill.teacher '.*run' holds a 'clip' run of a CLIP "
                                          r"\(model.name 'clip'\), not a language model"):
        load_pretrained(run, get_model("llama"), "distill.teacher")
    with pytest.raises(ConfigError, match=r"init_from '.*nowhere' does not exist: give a jaxtrain "
                                          "CLIP workdir"):
        load_pretrained(str(tmp_path / "nowhere"), clip, "init_from")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"init_from '.*empty': No jaxtrain checkpoint"):
        load_pretrained(str(tmp_path / "empty"), clip, "init_from")


def test_a_run_saved_before_model_name_has_its_tasks_model(tmp_path):
    llama = get_model("llama")
    cfg = LlamaConfig(**TINY_LM)
    params = _params(llama, cfg)
    old = {"task": "dpo", "model": dataclasses.asdict(cfg), "data": {"tokenizer": "gpt2"}}
    run = _workdir(tmp_path / "run", params, old)
    assert run_family(old) is llama
    loaded = load_pretrained(run, llama, "init_from")
    assert loaded.config == cfg and loaded.data == {"tokenizer": "gpt2"}
    _leaves_equal(loaded.params, params)


def test_load_pretrained_from_a_hugging_face_directory(tmp_path):
    from jaxtrain.hf import llama as hf_llama

    llama = get_model("llama")
    cfg = LlamaConfig(**TINY_LM)
    params = _params(llama, cfg)
    hf = tmp_path / "hf"
    llama.save_hf(str(hf), params, cfg, model_type="mistral")
    loaded = load_pretrained(str(hf), llama, "init_from")
    assert loaded.config == hf_llama.load_hf(str(hf))[0] and loaded.data == {}
    _leaves_equal(loaded.params, params)
    (hf / "tokenizer.json").write_text("{}")  # a tokenizer beside the weights: the data's
    assert load_pretrained(str(hf), llama, "init_from").data == {"tokenizer": str(hf)}

    with pytest.raises(ConfigError, match=r"init_from '.*hf' is a Hugging Face language model "
                                          r"\(model family 'llama'\), not a CLIP"):
        load_pretrained(str(hf), get_model("clip"), "init_from")
    # A model_type no family reads: the expected family's converter says why it cannot.
    (tmp_path / "xclip").mkdir()
    (tmp_path / "xclip" / "config.json").write_text(json.dumps({"model_type": "x_clip"}))
    with pytest.raises(ValueError, match=r"model_type='x_clip': X-CLIP"):
        load_pretrained(str(tmp_path / "xclip"), get_model("clip"), "init_from")
    # SigLIP has its own family: asking a CLIP to start from it names that family.
    (tmp_path / "siglip").mkdir()
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ConfigError, match=r"is a Hugging Face SigLIP \(model family 'siglip'\)"):
        load_pretrained(str(tmp_path / "siglip"), get_model("clip"), "init_from")
