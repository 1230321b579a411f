"""Parity of jaxtrain's CLIP with Hugging Face transformers' ``CLIPModel`` (torch, CPU).

Random-init tiny ``CLIPModel``\\ s (no download) are saved with ``save_pretrained`` and loaded with
:func:`jaxtrain.hf.clip.load_hf`; jaxtrain parameters are exported with
:func:`jaxtrain.hf.clip.save_hf` and loaded with ``CLIPModel.from_pretrained``. Unnormalised image
and text features must agree to 1e-5 in float32.
"""

import dataclasses
import functools
import json
import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from jaxtrain.hf import load_clip_hf, save_clip_hf  # noqa: E402
from jaxtrain.hf.clip import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    image_preprocessing_from_hf,
    load_hf,
    params_from_hf,
    params_to_hf,
    save_hf,
)
from jaxtrain.models.clip import CLIP, ClipConfig, eos_positions, pooling_positions  # noqa: E402
from jaxtrain.tokenizer_files import load_pretrained_tokenizer as load_tokenizer  # noqa: E402

TOL = {"rtol": 0, "atol": 1e-5}
EOS = 7  # the non-legacy EOS id: not the highest id, so argmax pooling would be wrong
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 37, "vocab_size": 99, "max_position_embeddings": 16}
VISION = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 80, "image_size": 32, "patch_size": 8}


def _hf_config(act: str = "quick_gelu", eos: int = 2, eps: float = 1e-5) -> dict:
    return {"model_type": "clip", "projection_dim": 24, "logit_scale_init_value": 2.0,
            "text_config": {**TEXT, "hidden_act": act, "eos_token_id": eos,
                            "layer_norm_eps": eps},
            "vision_config": {**VISION, "hidden_act": act, "layer_norm_eps": eps}}


def _hf_model(act: str = "quick_gelu", eos: int = 2, eps: float = 1e-5, seed: int = 0):
    """A float32 CLIPModel whose LayerNorms and biases are perturbed away from 1 / 0 (so that
    misplaced ones change the features) and whose logit_scale is not the init value."""
    torch.manual_seed(seed)
    hf = _hf_config(act, eos, eps)
    config = transformers.CLIPConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
        model.logit_scale.fill_(3.1)
    return model


def _inputs(legacy: bool):
    """NHWC images; tokens [5, 12] (shorter than max_position_embeddings) with right padding,
    EOS in the middle of rows, tokens after it, and (non-legacy) padding with the EOS id."""
    rng = np.random.RandomState(0)
    images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    eos, pad = (98, 0) if legacy else (EOS, 0)  # legacy: EOS is the highest id (<|endoftext|>)
    rows = [
        ([5, 40, 17, eos], pad),
        ([5, eos, 40, 41, 42], pad),  # EOS in the middle, then more real tokens
        ([5, 61, 90, 33, eos, 12, 3, eos], pad),  # EOS twice: the first one is pooled
        ([9, 11, 8, eos], eos),  # padded with the EOS id (as OpenAI's tokenizer does)
        ([4, *range(20, 30), eos], pad),  # full length
    ]
    tokens = np.zeros((5, 12), np.int64)
    mask = np.zeros((5, 12), np.int64)
    for i, (ids, fill) in enumerate(rows):
        tokens[i] = fill
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return images, tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def _jax_features(cfg, params, images, tokens):
    model = CLIP(cfg)
    img = model.apply({"params": params}, images, method=CLIP.encode_image)
    txt = model.apply({"params": params}, tokens, method=CLIP.encode_text)
    return img, txt


def _torch_features(model, images, tokens, mask):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)))
        txt = model.get_text_features(input_ids=torch.as_tensor(tokens),
                                      attention_mask=torch.as_tensor(mask))
    # transformers 5 returns BaseModelOutputWithPooling (projection in pooler_output); v4 tensors.
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    return img.numpy(), txt.numpy()


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ HF <-> jaxtrain


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", EOS)])
def test_hf_parity_and_round_trip(act, eos, tmp_path):
    legacy = eos == 2
    model = _hf_model(act, eos, eps=1e-5 if legacy else 1e-6, seed=int(legacy))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, params = load_hf(tmp_path / "hf")

    assert cfg.activation == act and cfg.text_mlp_ratio * 32 == 37 and cfg.embed_dim == 24
    assert cfg.layer_norm_eps == (1e-5 if legacy else 1e-6)
    assert (cfg.text_pooling, cfg.eos_token_id) == (("argmax", None) if legacy else ("eos", EOS))
    assert cfg.init_temperature == pytest.approx(np.exp(-2.0))
    assert "logit_bias" not in params and float(params["logit_scale"]) == pytest.approx(3.1)
    # The tree is CLIP.init's, leaf for leaf.
    images, tokens, mask = _inputs(legacy)
    ref = jax.eval_shape(CLIP(cfg).init, jax.random.key(0), images, tokens)
    ref = nn.unbox(ref)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        assert got.shape == want.shape and got.dtype == np.float32

    # The inputs exercise the pooling rule: the last non-pad token is wrong for rows 1-3.
    pos = np.asarray(pooling_positions(jnp.asarray(tokens), cfg.text_pooling, cfg.eos_token_id))
    assert list(pos) == [3, 1, 4, 3, 11]
    assert list(np.asarray(eos_positions(jnp.asarray(tokens)))) != list(pos)

    want_img, want_txt = _torch_features(model, images, tokens, mask)
    img, txt = (np.asarray(x) for x in _jax_features(cfg, params, images, tokens))
    np.testing.assert_allclose(img, want_img, **TOL)
    np.testing.assert_allclose(txt, want_txt, **TOL)

    # params_to_hf inverts params_from_hf exactly; config_from_hf inverts config_to_hf.
    state = _state(model)
    back = params_to_hf(params, cfg)
    assert set(back) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    again = config_from_hf(config_to_hf(cfg))
    assert again == dataclasses.replace(cfg, init_temperature=again.init_temperature)

    # jaxtrain -> HF: transformers loads it with no missing / unexpected keys, same outputs.
    save_hf(tmp_path / "out", jax.tree.map(jnp.asarray, params), cfg)
    model2, info = transformers.CLIPModel.from_pretrained(tmp_path / "out",
                                                          output_loading_info=True)
    assert not any(info.values()), info
    assert model2.config.text_config.eos_token_id == eos
    got_img, got_txt = _torch_features(model2.eval(), images, tokens, mask)
    np.testing.assert_array_equal(got_img, want_img)
    np.testing.assert_array_equal(got_txt, want_txt)


def test_export_fresh_jaxtrain_params_and_shards(tmp_path):
    cfg = ClipConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                     vision_heads=2, vocab_size=50, text_max_len=8, text_width=32,
                     text_layers=1, text_heads=4, embed_dim=16, activation="quick_gelu",
                     text_pooling="eos", eos_token_id=3, logit_bias_init=-10.0)
    rng = np.random.RandomState(1)
    shapes = nn.unbox(jax.eval_shape(CLIP(cfg).init, jax.random.key(0),
                                     jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32)))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1,
                          shapes["params"])
    assert "logit_bias" in params
    with pytest.raises(ValueError, match=r"'logit_bias'.*drop_logit_bias=True"):
        save_hf(tmp_path, params, cfg)
    assert not os.listdir(tmp_path)  # validated before writing anything
    save_clip_hf(tmp_path, params, cfg, drop_logit_bias=True, max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len([f for f in files if f.startswith("model-")]) > 2

    cfg2, back = load_clip_hf(tmp_path)
    assert cfg2 == dataclasses.replace(cfg, logit_bias_init=None,
                                       init_temperature=cfg2.init_temperature)
    assert "logit_bias" not in back
    params.pop("logit_bias")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    model, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    np.testing.assert_array_equal(
        model.vision_model.embeddings.patch_embedding.weight.detach().numpy(),
        params["vision_model"]["embeddings"]["patch_embedding"]["kernel"].transpose(3, 2, 0, 1))


# ------------------------------------------------------------------ preprocessing, tokenizer


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "<bos>", "a", "photo", "of", "cat", "<eos>", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def test_image_preprocessing_and_tokenizer(tmp_path):
    src = tmp_path / "src"
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 36}, crop_size=32, resample=2, image_mean=[0.5, 0.25, 0.125],
        image_std=[0.2, 0.3, 0.4]).save_pretrained(src)
    prep = image_preprocessing_from_hf(src)
    assert prep == {"image_resize": 36, "image_crop": 32, "image_mean": [0.5, 0.25, 0.125],
                    "image_std": [0.2, 0.3, 0.4], "image_interpolation": "bilinear"}
    default = tmp_path / "default"
    transformers.CLIPImageProcessor().save_pretrained(default)
    assert image_preprocessing_from_hf(default)["image_interpolation"] == "bicubic"
    assert image_preprocessing_from_hf(default)["image_resize"] == 224

    cfg = config_from_hf(_hf_config("gelu", EOS))
    params = params_from_hf(_state(_hf_model("gelu", EOS)), cfg)
    tok = _tokenizer()
    out = tmp_path / "out"
    save_hf(out, params, cfg, image_preprocessing=prep, tokenizer=tok)
    assert image_preprocessing_from_hf(out) == prep
    proc = transformers.CLIPImageProcessor.from_pretrained(out)
    assert proc.size["shortest_edge"] == 36 and proc.crop_size["height"] == 32
    loaded = load_tokenizer(out)
    assert loaded("a photo of a dog")["input_ids"] == tok("a photo of a dog")["input_ids"]
    assert loaded.eos_token_id == EOS

    with pytest.raises(ValueError, match=r"image_crop'\]=36 must equal the model's image_size"):
        save_hf(tmp_path / "x", params, cfg, image_preprocessing={**prep, "image_crop": 36})
    with pytest.raises(ValueError, match=r"exactly the keys.*missing \['image_std'\]"):
        save_hf(tmp_path / "x", params, cfg,
                image_preprocessing={k: v for k, v in prep.items() if k != "image_std"})
    with pytest.raises(ValueError, match=r"eos_token_id \(7\) differs.*\(5\)"):
        save_hf(tmp_path / "x", params, dataclasses.replace(cfg, eos_token_id=5), tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*src"):
        load_tokenizer(src)
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config.json does not exist"):
        image_preprocessing_from_hf(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 8, "width": 8}}))
    with pytest.raises(ValueError, match=r"unsupported size=.*shortest_edge"):
        image_preprocessing_from_hf(bad)


# ------------------------------------------------------------------ errors


def test_config_errors():
    base = _hf_config()
    for model_type, what in [("siglip", "SigLIP"), ("chinese_clip", "Chinese-CLIP"),
                             ("clip_vision_model", "vision-tower-only"), ("bert", "")]:
        with pytest.raises(ValueError, match=rf"model_type='{model_type}'.*{what}.*'clip'"):
            config_from_hf({**base, "model_type": model_type})
    with pytest.raises(ValueError, match=r"text_config.hidden_act='relu'"):
        config_from_hf({**base, "text_config": {**base["text_config"], "hidden_act": "relu"}})
    with pytest.raises(ValueError, match=r"hidden_act='gelu'.*differs from vision_config"):
        config_from_hf({**base, "text_config": {**base["text_config"], "hidden_act": "gelu"}})
    with pytest.raises(ValueError, match=r"eos_token_id=\[2, 3\]"):
        config_from_hf({**base, "text_config": {**base["text_config"], "eos_token_id": [2, 3]}})
    with pytest.raises(ValueError, match=r"image_size=\[32, 16\].*square"):
        config_from_hf({**base, "vision_config": {**base["vision_config"],
                                                  "image_size": [32, 16]}})
    # Keys a config leaves out take transformers' defaults.
    cfg = config_from_hf({"model_type": "clip"}, dtype="bfloat16")
    assert (cfg.text_width, cfg.vision_width, cfg.vocab_size, cfg.text_max_len) == \
        (512, 768, 49408, 77)
    assert (cfg.text_pooling, cfg.eos_token_id, cfg.dtype) == ("eos", 49407, "bfloat16")

    with pytest.raises(ValueError, match=r"text_pooling='last'.*no Hugging Face CLIP equivalent"):
        config_to_hf(ClipConfig())
    with pytest.raises(ValueError, match=r"eos_token_id=2 cannot be exported.*'argmax'"):
        config_to_hf(ClipConfig(text_pooling="eos", eos_token_id=2))
    assert config_to_hf(ClipConfig(text_pooling="argmax"))["text_config"]["eos_token_id"] == 2
    with pytest.raises(ValueError, match=r"text_pooling='eos' needs eos_token_id"):
        ClipConfig(text_pooling="eos")
    with pytest.raises(ValueError, match=r"text_pooling must be one of"):
        ClipConfig(text_pooling="mean")


def test_state_dict_errors():
    cfg = config_from_hf(_hf_config())
    state = _state(_hf_model())
    state["text_model.embeddings.position_ids"] = np.arange(16)[None]  # old checkpoints: ignored
    params = params_from_hf(state, cfg)

    bad = dict(state, **{"visual_projection.bias": np.zeros(24, np.float32)})
    with pytest.raises(ValueError, match=r"projection biases \(visual_projection.bias\)"):
        params_from_hf(bad, cfg)
    bad = dict(state)
    del bad["text_model.encoder.layers.1.mlp.fc2.bias"]
    bad["text_model.encoder.layers.2.mlp.fc2.bias"] = np.zeros(32, np.float32)
    bad["visual_projection.weight"] = np.zeros((24, 32), np.float32)
    with pytest.raises(ValueError) as err:
        params_from_hf(bad, cfg)
    msg = str(err.value)
    assert "missing keys (1): text_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): text_model.encoder.layers.2.mlp.fc2.bias" in msg
    assert "visual_projection.weight: got [24, 32], expected [24, 48]" in msg

    params["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"] = np.zeros((32, 36))
    with pytest.raises(ValueError, match=r"layers_0/mlp/fc1/kernel: got \[32, 36\], "
                                         r"expected \[32, 37\]"):
        params_to_hf(params, cfg)


def test_load_hf_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json does not exist"):
        load_hf(tmp_path / "empty")
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_hf_config()))
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or .*noweights"):
        load_hf(d)
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*never unpickles.*safetensors"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({**_hf_config(), "model_type": "siglip"}))
    with pytest.raises(ValueError, match=r"noweights/config.json.*'siglip'.*not supported"):
        load_hf(d)


# ------------------------------------------------------------------ the model registry


def test_clip_family_converts_through_this_module(tmp_path):
    """The registry's 'clip' family reads model_type 'clip' with this module; a directory's
    data settings are its tokenizer and its image preprocessing; its inference function gives
    transformers' embeddings (normalised)."""
    from jaxtrain.hf import clip as hf_clip
    from jaxtrain.models import get_model
    from jaxtrain.models.registry import family_for_hf_dir

    family = get_model("clip")
    assert family.hf_model_types == (hf_clip.MODEL_TYPE,) and family.hf() is hf_clip
    model = _hf_model("gelu", EOS)
    cfg = config_from_hf(_hf_config("gelu", EOS))
    params = params_from_hf(_state(model), cfg)
    prep = {"image_resize": 36, "image_crop": 32, "image_mean": [0.5, 0.25, 0.125],
            "image_std": [0.2, 0.3, 0.4], "image_interpolation": "bilinear"}
    out = tmp_path / "out"
    family.save_hf(str(out), params, cfg, image_preprocessing=prep, tokenizer=_tokenizer())
    assert family_for_hf_dir(str(out)) is family
    cfg2, params2 = family.load_hf(str(out))
    assert cfg2 == load_hf(out)[0]
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert family.hf_data_settings(str(out)) == {"tokenizer": str(out), **prep}
    save_hf(tmp_path / "bare", params, cfg)
    assert family.hf_data_settings(str(tmp_path / "bare")) == {}

    images, tokens, mask = _inputs(legacy=False)
    got = family.inference(cfg, params, {"image": jnp.asarray(images[:3]),
                                         "text": jnp.asarray(tokens[:3], jnp.int32)})
    img, txt = _torch_features(model, images[:3], tokens[:3], mask[:3])
    normalise = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(np.asarray(got["image_embeds"]), normalise(img), **TOL)
    np.testing.assert_allclose(np.asarray(got["text_embeds"]), normalise(txt), **TOL)
