"""Tests for jaxtrain.models.clip (and the layers it is built from)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.models.clip import CLIP, ClipConfig

ALLOWED_AXES = {"embed", "mlp", "heads", "kv", "vocab", "norm", "patch", "pos", None}

TINY = ClipConfig(
    image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2,
    vocab_size=50, text_max_len=12, text_width=32, text_layers=2, text_heads=2, embed_dim=24,
)  # fmt: skip


def _inputs(cfg: ClipConfig = TINY, batch: int = 3):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, cfg.channels))
    tokens = np.zeros((batch, cfg.text_max_len), np.int32)
    lengths = [4, 7, cfg.text_max_len][:batch]
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(1, cfg.vocab_size, size=n)
    return jnp.asarray(images, jnp.float32), jnp.asarray(tokens)


@pytest.fixture(scope="module")
def model_and_params():
    model = CLIP(TINY)
    images, tokens = _inputs()
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]
    return model, nn.unbox(params)


@pytest.fixture(scope="module")
def encode_text(model_and_params):
    model, params = model_and_params
    return jax.jit(lambda t: model.apply({"params": params}, t, method=CLIP.encode_text))


def test_output_shapes_dtypes_and_unit_norm(model_and_params) -> None:
    model, params = model_and_params
    images, tokens = _inputs()
    out = model.apply({"params": params}, images, tokens)
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale"}
    assert out["image_embeds"].shape == (3, TINY.embed_dim)
    assert out["text_embeds"].shape == (3, TINY.embed_dim)
    assert out["logit_scale"].shape == ()
    for v in out.values():
        assert v.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(out["logit_scale"]), np.log(1 / 0.07), rtol=1e-6)
    img = model.apply({"params": params}, images, method=CLIP.encode_image)
    assert img.shape == (3, TINY.embed_dim) and img.dtype == jnp.float32
    np.testing.assert_allclose(
        img / np.linalg.norm(img, axis=-1, keepdims=True), out["image_embeds"], atol=1e-6
    )


def test_param_tree_has_logical_partition_specs() -> None:
    model = CLIP(TINY)
    images, tokens = _inputs()
    abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    assert set(abstract["params"]) == {
        "vision_model", "text_model", "visual_projection", "text_projection", "logit_scale",
    }  # fmt: skip
    leaves = jax.tree_util.tree_leaves(
        abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves), "unboxed param found"
    for box in leaves:
        assert len(box.names) == box.value.ndim
        assert box.value.dtype == jnp.float32
    specs = jax.tree_util.tree_leaves(
        nn.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert len(specs) == len(leaves)
    used = {name for spec in specs for name in spec}
    assert used <= ALLOWED_AXES, used - ALLOWED_AXES
    assert {"embed", "mlp", "heads", "kv", "vocab", "norm", "patch", "pos"} <= used


def test_text_pooling_uses_eos_position(encode_text) -> None:
    tokens = np.zeros((1, TINY.text_max_len), np.int32)
    tokens[0, :5] = [3, 9, 17, 4, 2]  # EOS (last non-pad) at index 4
    base = np.asarray(encode_text(jnp.asarray(tokens)))

    # Fewer trailing pads (shorter T): the same EOS features -> same embedding.
    short = np.asarray(encode_text(jnp.asarray(tokens[:, :6])))
    np.testing.assert_allclose(short, base, atol=1e-5)

    # Changing a token before the EOS changes the embedding ...
    changed = tokens.copy()
    changed[0, 1] = 11
    assert not np.allclose(np.asarray(encode_text(jnp.asarray(changed))), base, atol=1e-4)
    # ... and so does changing the EOS token itself (the last real token).
    changed = tokens.copy()
    changed[0, 4] = 5
    assert not np.allclose(np.asarray(encode_text(jnp.asarray(changed))), base, atol=1e-4)


def test_tokens_after_eos_do_not_matter(model_and_params) -> None:
    # With the pooling position held at the EOS, filling the region after it with arbitrary
    # (non-pad) tokens changes nothing: the causal mask hides later positions.
    model, params = model_and_params
    tokens = np.zeros((2, TINY.text_max_len), np.int32)
    tokens[:, :5] = [3, 9, 17, 4, 2]
    tokens[1, 5:] = np.arange(5, TINY.text_max_len) % (TINY.vocab_size - 1) + 1
    eos = jnp.array([4, 4], jnp.int32)
    out = model.apply({"params": params}, jnp.asarray(tokens), eos, method=CLIP.encode_text)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    # Default pooling (last non-pad) of row 0 agrees with the explicit EOS index.
    default = model.apply({"params": params}, jnp.asarray(tokens[:1]), method=CLIP.encode_text)
    np.testing.assert_allclose(default[0], out[0], atol=1e-5)
    # Sanity: the filled row pooled at its own last token differs.
    last = model.apply({"params": params}, jnp.asarray(tokens[1:]), method=CLIP.encode_text)
    assert not np.allclose(last[0], out[1], atol=1e-4)


def test_image_embeddings_depend_on_pixels(model_and_params) -> None:
    model, params = model_and_params
    images, _ = _inputs()
    enc = jax.jit(lambda x: model.apply({"params": params}, x, method=CLIP.encode_image))
    base = np.asarray(enc(images))
    # A change in one corner patch of image 0 changes image 0 only.
    changed = images.at[0, :4, :4, :].add(1.0)
    out = np.asarray(enc(changed))
    assert not np.allclose(out[0], base[0], atol=1e-4)
    np.testing.assert_allclose(out[1:], base[1:], atol=1e-5)


def test_bfloat16_runs() -> None:
    cfg = dataclasses.replace(TINY, dtype="bfloat16", activation="quick_gelu")
    model = CLIP(cfg)
    images, tokens = _inputs(cfg)
    variables = model.init(jax.random.key(0), images, tokens)
    params = nn.unbox(variables)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    out = jax.jit(model.apply)({"params": params}, images, tokens)
    for v in out.values():
        assert v.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(v)))
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)


def test_remat_matches_no_remat(model_and_params) -> None:
    model, params = model_and_params
    remat_model = CLIP(dataclasses.replace(TINY, remat=True))
    images, tokens = _inputs()
    remat_params = nn.unbox(remat_model.init(jax.random.key(0), images, tokens)["params"])
    assert jax.tree_util.tree_structure(remat_params) == jax.tree_util.tree_structure(params)

    def loss_fn(m):
        def f(p):
            out = m.apply({"params": p}, images, tokens)
            sim = out["image_embeds"] @ out["text_embeds"].T
            return jnp.sum(sim * jnp.exp(out["logit_scale"]))

        return jax.jit(jax.value_and_grad(f))

    v0, g0 = loss_fn(model)(params)
    v1, g1 = loss_fn(remat_model)(params)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-6), g1, g0)


def test_from_dict_and_validation() -> None:
    cfg = ClipConfig.from_dict({"vision_width": 64, "vision_heads": 8, "dtype": "bfloat16"})
    assert cfg.vision_width == 64 and cfg.dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown ClipConfig keys.*bogus.*valid keys"):
        ClipConfig.from_dict({"bogus": 1, "image_size": 32})
    with pytest.raises(ValueError, match=r"image_size \(30\).*patch_size \(4\)"):
        ClipConfig.from_dict({"image_size": 30})
    with pytest.raises(ValueError, match=r"text_width \(130\).*text_heads \(4\)"):
        ClipConfig.from_dict({"text_width": 130})
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        ClipConfig.from_dict({"embed_dim": 0})
    with pytest.raises(ValueError, match="dtype"):
        ClipConfig.from_dict({"dtype": "float16"})
    with pytest.raises(ValueError, match="activation"):
        ClipConfig.from_dict({"activation": "relu"})


def test_input_shape_errors(model_and_params) -> None:
    model, params = model_and_params
    with pytest.raises(ValueError, match="images must have shape"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), method=CLIP.encode_image)
    with pytest.raises(ValueError, match="exceeds text_max_len"):
        model.apply(
            {"params": params}, jnp.ones((1, TINY.text_max_len + 1), jnp.int32),
            method=CLIP.encode_text,
        )
