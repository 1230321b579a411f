"""SigLIP: parity with Hugging Face transformers' ``SiglipModel`` (torch, CPU) and training in the
contrastive task.

Random-init tiny ``SiglipModel``\\ s (no download, LayerNorms / biases / probe perturbed so that a
misplaced weight changes the outputs) are saved with ``save_pretrained`` and loaded with
:func:`jaxtrain.hf.siglip.load_hf`; jaxtrain parameters are exported with
:func:`jaxtrain.hf.siglip.save_hf` and loaded with ``SiglipModel.from_pretrained``. Embeddings,
logits and the sigmoid loss must agree to ~1e-5 in float32.
"""

import json
import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from jaxtrain import ConfigError, Trainer  # noqa: E402
from jaxtrain.data.images import ImagePreprocess  # noqa: E402
from jaxtrain.hf import siglip as hf_siglip  # noqa: E402
from jaxtrain.losses.contrastive import siglip_loss  # noqa: E402
from jaxtrain.mesh import shard_batch  # noqa: E402
from jaxtrain.models import get_model  # noqa: E402
from jaxtrain.models.registry import DUAL_ENCODER, family_for_hf_dir  # noqa: E402
from jaxtrain.models.siglip import Siglip, SiglipConfig, SiglipVision  # noqa: E402
from jaxtrain.tasks.clip import ClipTask  # noqa: E402

TOL = {"rtol": 0, "atol": 2e-5}
TEXT = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 12}
VISION = {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 16, "patch_size": 4}


def _hf_model(text=None, vision=None, seed=0):
    """A float32 SiglipModel with every parameter perturbed (LayerNorm scales off 1, biases off
    0, a non-default logit scale and bias)."""
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(text_config={**TEXT, "projection_size": 24, **(text or {})},
                                       vision_config={**VISION, **(vision or {})})
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-4.0)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    model = _hf_model()
    model.save_pretrained(path)
    return str(path), model


def _inputs(seed=0, b=3):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, 16, 16, 3)).astype(np.float32)
    tokens = rng.integers(0, TEXT["vocab_size"], (b, TEXT["max_position_embeddings"]))
    return images, tokens.astype(np.int32)


def _torch(images, tokens):
    """transformers' keyword inputs: NCHW ``pixel_values`` and int64 ``input_ids``."""
    return {"pixel_values": torch.as_tensor(images.transpose(0, 3, 1, 2)),
            "input_ids": torch.as_tensor(tokens, dtype=torch.long)}


def test_load_hf_matches_transformers(hf_dir):
    path, model = hf_dir
    cfg, params = hf_siglip.load_hf(path)
    assert (cfg.vision_width, cfg.text_width, cfg.vision_mlp_dim, cfg.text_max_len) == (
        24, 32, 40, 12)
    assert cfg.activation == "gelu_pytorch_tanh" and cfg.layer_norm_eps == 1e-6
    images, tokens = _inputs()
    out = jax.jit(Siglip(cfg).apply)({"params": params}, images, tokens)
    with torch.no_grad():
        ref = model(**_torch(images, tokens), return_loss=True)
    np.testing.assert_allclose(out["image_embeds"], ref.image_embeds.numpy(), **TOL)
    np.testing.assert_allclose(out["text_embeds"], ref.text_embeds.numpy(), **TOL)
    logits = (np.exp(out["logit_scale"]) * np.asarray(out["image_embeds"])
              @ np.asarray(out["text_embeds"]).T + out["logit_bias"])
    np.testing.assert_allclose(logits, ref.logits_per_image.numpy(), rtol=1e-5, atol=1e-4)
    # jaxtrain's SigLIP loss on the model's outputs is transformers' (unclipped scale)
    loss, _ = siglip_loss(out["text_embeds"], out["image_embeds"], out["logit_scale"],
                          out["logit_bias"], max_logit_scale=cfg.max_logit_scale)
    np.testing.assert_allclose(loss, ref.loss.item(), rtol=1e-5)
    # the vision tower alone, on the vision_model subtree, is SiglipVisionModel's pooler output
    pooled = SiglipVision(cfg).apply({"params": params["vision_model"]}, images)
    with torch.no_grad():
        ref_img = model.vision_model(pixel_values=_torch(images, tokens)["pixel_values"])
    np.testing.assert_allclose(pooled, ref_img.pooler_output.numpy(), **TOL)


def test_text_padding_mask_matches_transformers_attention_mask(hf_dir):
    path, model = hf_dir
    cfg, params = hf_siglip.load_hf(path)
    images, tokens = _inputs(seed=1)
    mask = np.ones_like(tokens, bool)
    mask[0, 5:] = False  # right padding
    mask[1, :4] = False  # left padding
    ours = Siglip(cfg).apply({"params": params}, tokens, mask, method="encode_text")
    with torch.no_grad():
        ref = model.get_text_features(input_ids=_torch(images, tokens)["input_ids"],
                                      attention_mask=torch.as_tensor(mask, dtype=torch.long))
    np.testing.assert_allclose(ours, ref.pooler_output.numpy(), **TOL)
    hidden = Siglip(cfg).apply({"params": params}, tokens,
                               method=lambda m, t: m.text_model.hidden(t))
    with torch.no_grad():
        ref_hidden = model.text_model(input_ids=_torch(images, tokens)["input_ids"])
    np.testing.assert_allclose(hidden, ref_hidden.last_hidden_state.numpy(), **TOL)


def test_save_hf_round_trip_loads_in_transformers(hf_dir, tmp_path):
    path, model = hf_dir
    cfg, params = hf_siglip.load_hf(path)
    prep = {"image_resize": 16, "image_crop": 16, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "image_interpolation": "bicubic"}
    hf_siglip.save_hf(tmp_path, params, cfg, image_preprocessing=prep)
    # the state dict written is the original one, tensor for tensor
    reloaded = transformers.SiglipModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    theirs, ours = model.state_dict(), reloaded.state_dict()
    assert sorted(theirs) == sorted(ours)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name].numpy(), value.numpy(), err_msg=name)
    mine, ref = hf_siglip.transformers_outputs(tmp_path, cfg, params)
    for key in ("image_embeds", "text_embeds", "logits_per_image"):
        np.testing.assert_allclose(mine[key], ref[key], rtol=1e-5, atol=1e-4, err_msg=key)
    # the preprocessor it wrote is SiglipImageProcessor's, and jaxtrain's data side reproduces
    # it on a square image from the settings data_settings reads back
    settings = hf_siglip.data_settings(tmp_path)
    assert settings == {**prep, "image_resize_mode": "squash"}
    processor = transformers.SiglipImageProcessor.from_pretrained(str(tmp_path))
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    theirs_px = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours_px = ImagePreprocess(crop=settings["image_crop"], resize=settings["image_resize"],
                              mean=tuple(settings["image_mean"]),
                              std=tuple(settings["image_std"]))(image)
    np.testing.assert_allclose(ours_px, theirs_px, atol=2 / 255 / 0.5)
    assert family_for_hf_dir(str(tmp_path)).name == "siglip"
    # the export path (python -m jaxtrain.export --format=hf) checks its directory this way
    from jaxtrain.export.hf import export_hf

    report = export_hf(str(tmp_path / "export"), get_model("siglip"), cfg, params)
    assert report["checked"] == "outputs (transformers, torch)" and report["max_abs_diff"] < 1e-4


def _init(cfg):
    """Unboxed host params of a fresh model (init jitted: eager init is slow on CPU)."""
    boxed = jax.jit(get_model("siglip").init, static_argnums=0)(cfg, jax.random.key(0))
    return jax.tree.map(np.asarray, jax.device_get(nn.unbox(boxed)))


def test_conversion_errors(tmp_path):
    base = hf_siglip.config_to_hf(SiglipConfig())
    with pytest.raises(ValueError, match="SigLIP 2"):
        hf_siglip.config_from_hf({**base, "model_type": "siglip2"})
    with pytest.raises(ValueError, match="vision_use_head"):
        hf_siglip.config_from_hf({**base, "vision_config": {**base["vision_config"],
                                                            "vision_use_head": False}})
    with pytest.raises(ValueError, match="projection_size"):
        hf_siglip.config_from_hf({**base, "text_config": {**base["text_config"],
                                                          "projection_size": 7}})
    with pytest.raises(ValueError, match="one activation"):
        hf_siglip.config_from_hf({**base, "vision_config": {**base["vision_config"],
                                                            "hidden_act": "gelu"}})
    cfg = SiglipConfig(vision_layers=1, text_layers=1)
    params = _init(cfg)
    with pytest.raises(ValueError, match="resizes to 32x32 with no crop"):
        hf_siglip.save_hf(tmp_path, params, cfg, image_preprocessing={
            "image_resize": 36, "image_crop": 32, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "image_interpolation": "bicubic"})
    assert not os.listdir(tmp_path)  # validated before anything is written
    state = hf_siglip.params_to_hf(params, cfg)
    del state["vision_model.head.probe"]
    with pytest.raises(ValueError, match="missing keys.*head.probe"):
        hf_siglip.params_from_hf(state, cfg)


def test_config_validation():
    family = get_model("siglip", kind=DUAL_ENCODER)
    assert family.config({"name": "siglip"}) == SiglipConfig()
    with pytest.raises(ConfigError, match="unknown SiglipConfig keys.*embed_dim"):
        family.config({"name": "siglip", "embed_dim": 32})
    with pytest.raises(ConfigError, match="vision_width .* divisible by vision_heads"):
        family.config({"vision_width": 30, "vision_heads": 4})
    with pytest.raises(ConfigError, match="activation"):
        family.config({"activation": "relu6"})
    with pytest.raises(ValueError, match="max_logit_scale"):
        SiglipConfig(max_logit_scale=0)
    cfg = SiglipConfig(dtype="bfloat16", remat=True, vision_layers=1, text_layers=1)
    out = jax.jit(Siglip(cfg).apply)({"params": _init(cfg)}, jnp.zeros((2, 32, 32, 3)),
                                     jnp.zeros((2, 16), jnp.int32))
    assert out["image_embeds"].dtype == jnp.float32 and out["image_embeds"].shape == (2, 64)


def _siglip_run_config(steps):
    c = ClipTask.default_config()
    model = get_model("siglip").default_config()
    model.update(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                 vision_mlp_dim=64, text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64)
    c.model = ml_collections.ConfigDict(model)
    c.contrastive.loss = "siglip"
    # SigLIP's bias -10 is for batches of thousands; at 64 rows -5 learns in ~60 steps (the
    # task keeps a configured bias)
    c.model.logit_bias_init = -5.0
    c.data.train_examples = 1024
    c.train.batch_size = 64
    c.train.steps = steps
    c.train.log_every = 10
    c.train.progress_bar = False
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.eval.every = 0
    c.checkpoint.every = 0
    c.evals = ml_collections.ConfigDict()
    return c


@pytest.mark.slow
def test_contrastive_task_trains_siglip(tmp_path):
    # on 1 device: learning is tested here (the sharded SigLIP loss: test_clip_task.py)
    trainer = Trainer(_siglip_run_config(60), str(tmp_path), devices=jax.devices()[:1])
    assert isinstance(trainer.task.model, Siglip)
    result = trainer.train()
    train = [r for r in result.metrics if "train/loss" in r]
    assert train[-1]["train/loss"] < 0.75 * train[0]["train/loss"], train
    # the towers learn to tell pairs apart: in-batch top-1 accuracy well above chance (1/64)
    assert train[-1]["train/q2k_acc"] > 4 / 64, train
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["model"]["name"] == "siglip"


@pytest.mark.slow
def test_contrastive_task_starts_from_a_hugging_face_siglip(tmp_path):
    """init_from a SiglipModel directory: the run takes its shape and weights (the config says
    only how to run it), SigLIP's image normalisation, and a train step runs from them."""
    model = _hf_model(text={"vocab_size": 40, "max_position_embeddings": 16})
    model.save_pretrained(tmp_path / "hf")
    c = _siglip_run_config(2)
    c.optim.warmup_steps = 1
    c.train.batch_size = 8
    c.init_from = str(tmp_path / "hf")
    c.model.attention_impl = "xla"
    trainer = Trainer(c, devices=jax.devices()[:1])
    cfg = trainer.task.model_config
    assert (cfg.vision_width, cfg.text_max_len, cfg.vocab_size, cfg.attention_impl) == (
        24, 16, 40, "xla")
    assert list(trainer.task.data_config.image_mean) == [0.5] * 3
    state = trainer.init_state()
    np.testing.assert_allclose(state.params["logit_bias"], -4.0)
    probe = model.vision_model.head.probe.detach().numpy()
    np.testing.assert_array_equal(state.params["vision_model"]["head"]["probe"], probe)
    batch = next(trainer.task.train_iterator(seed=0, batch_size=8, process_index=0,
                                             process_count=1))
    _, metrics = trainer.train_step(state, shard_batch(batch, trainer.mesh))
    assert np.isfinite(metrics["loss"])
