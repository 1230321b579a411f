"""Tests for jaxtrain.models.clip (and the layers it is built from)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.models.clip import CLIP, ClipConfig, eos_positions

ALLOWED_AXES = {"embed", "mlp", "heads", "kv", "vocab", "norm", "patch", "pos", None}

TINY = ClipConfig(
    image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2,
    vocab_size=50, text_max_len=12, text_width=32, text_layers=2, text_heads=2, embed_dim=24,
)  # fmt: skip

# XLA:CPU spends most of this file's time in backend optimisation; tests only need correct
# numerics, so compile at optimisation level 0.
_FAST = {"xla_backend_optimization_level": 0}


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(_FAST)


def _inputs(cfg: ClipConfig = TINY, batch: int = 3):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, cfg.channels))
    tokens = np.zeros((batch, cfg.text_max_len), np.int32)
    for i, n in enumerate([4, 7, cfg.text_max_len][:batch]):
        tokens[i, :n] = rng.integers(1, cfg.vocab_size, size=n)
    return jnp.asarray(images, jnp.float32), jnp.asarray(tokens)


@pytest.fixture(scope="module")
def params():
    images, tokens = _inputs()
    key = jax.random.key(0)
    return nn.unbox(_compile(CLIP(TINY).init, key, images, tokens)(key, images, tokens)["params"])


def _encode_text_fn(cfg: ClipConfig, params, tokens, eos):
    model = CLIP(cfg)
    fn = lambda p, t, e: model.apply({"params": p}, t, e, method=CLIP.encode_text)
    return _compile(fn, params, tokens, eos)


def test_output_shapes_dtypes_and_unit_norm(params) -> None:
    model = CLIP(TINY)
    images, tokens = _inputs()

    def fn(p, x, t):
        out = model.apply({"params": p}, x, t)
        return out, model.apply({"params": p}, x, method=CLIP.encode_image)

    out, img = _compile(fn, params, images, tokens)(params, images, tokens)
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale"}
    assert out["image_embeds"].shape == (3, TINY.embed_dim)
    assert out["text_embeds"].shape == (3, TINY.embed_dim)
    assert out["logit_scale"].shape == ()
    for v in out.values():
        assert v.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(out["logit_scale"]), np.log(1 / 0.07), rtol=1e-6)
    assert img.shape == (3, TINY.embed_dim) and img.dtype == jnp.float32
    np.testing.assert_allclose(
        img / np.linalg.norm(img, axis=-1, keepdims=True), out["image_embeds"], atol=1e-6
    )


def test_param_tree_has_logical_partition_specs() -> None:
    images, tokens = _inputs()
    abstract = jax.eval_shape(CLIP(TINY).init, jax.random.key(0), images, tokens)
    assert set(abstract["params"]) == {
        "vision_model", "text_model", "visual_projection", "text_projection", "logit_scale",
    }  # fmt: skip
    is_box = lambda x: isinstance(x, nn.Partitioned)
    leaves = jax.tree_util.tree_leaves(abstract, is_leaf=is_box)
    assert leaves and all(is_box(x) for x in leaves), "a parameter has no logical axis names"
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


def test_text_pooling_uses_eos_position(params) -> None:
    t = TINY.text_max_len
    base = np.zeros(t, np.int32)
    base[:5] = [3, 9, 17, 4, 2]  # EOS (last non-pad token) at index 4
    before = base.copy()
    before[1] = 11  # a token before the EOS
    last = base.copy()
    last[4] = 5  # the EOS token itself (last real token)
    after = base.copy()
    after[5:] = np.arange(5, t) % (TINY.vocab_size - 1) + 1  # junk after the EOS
    tokens = jnp.asarray(np.stack([base, before, last, after, after]))
    assert list(eos_positions(tokens)) == [4, 4, 4, t - 1, t - 1]
    # Rows 0-3 pooled at index 4 (explicit; for rows 0-2 this equals the default), row 4 at its
    # own last token.
    eos = jnp.asarray([4, 4, 4, 4, t - 1], jnp.int32)
    out = np.asarray(_encode_text_fn(TINY, params, tokens, eos)(params, tokens, eos))

    # Tokens after the EOS are invisible to it (causal mask) -> identical embedding.
    np.testing.assert_allclose(out[3], out[0], atol=1e-5)
    # Changing a token before the EOS, or the EOS token itself, changes the embedding.
    assert not np.allclose(out[1], out[0], atol=1e-4)
    assert not np.allclose(out[2], out[0], atol=1e-4)
    # Pooling somewhere else gives something else.
    assert not np.allclose(out[4], out[3], atol=1e-4)

    # Default pooling (no eos_index) and trimming the pad region both leave row 0 unchanged.
    model = CLIP(TINY)
    short = jnp.asarray(base[None, :6])
    default = _compile(
        lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_text), params, short
    )(params, short)
    np.testing.assert_allclose(np.asarray(default)[0], out[0], atol=1e-5)


def test_image_embeddings_depend_on_pixels(params) -> None:
    model = CLIP(TINY)
    images, _ = _inputs()
    changed = images.at[0, :4, :4, :].add(1.0)  # one corner patch of image 0
    both = jnp.concatenate([images, changed])
    enc = lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image)
    out = np.asarray(_compile(enc, params, both)(params, both))
    base, new = out[:3], out[3:]
    assert not np.allclose(new[0], base[0], atol=1e-4)
    np.testing.assert_allclose(new[1:], base[1:], atol=1e-5)


def test_bfloat16_runs(params) -> None:
    # Parameters do not depend on the compute dtype: the float32 tree is reused.
    cfg = dataclasses.replace(TINY, dtype="bfloat16", activation="quick_gelu")
    model = CLIP(cfg)
    images, tokens = _inputs(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.unbox(abstract)))
    apply = lambda p, x, t: model.apply({"params": p}, x, t)
    out = _compile(apply, params, images, tokens)(params, images, tokens)
    for v in out.values():
        assert v.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(v)))
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)


def test_remat_matches_no_remat(params) -> None:
    # The text tower is enough: both towers use the same Encoder, and the text tower also
    # exercises the static ``causal`` argument through nn.remat.
    _, tokens = _inputs()
    remat_cfg = dataclasses.replace(TINY, remat=True)
    remat_abstract = jax.eval_shape(CLIP(remat_cfg).init, jax.random.key(0), *_inputs(remat_cfg))
    assert jax.tree_util.tree_structure(
        nn.unbox(remat_abstract)["params"]
    ) == jax.tree_util.tree_structure(params)

    def value_and_grad(cfg):
        model = CLIP(cfg)

        def f(p, t):
            emb = model.apply({"params": p}, t, method=CLIP.encode_text)
            return jnp.sum(jnp.sin(emb))

        vg = jax.value_and_grad(f)
        return _compile(vg, params, tokens)(params, tokens)

    v0, g0 = value_and_grad(TINY)
    v1, g1 = value_and_grad(remat_cfg)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)

    # Recomputation reorders float ops; compare against the overall gradient scale.
    scale = max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(g0))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), g1, g0
    )


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
        ClipConfig.from_dict({"dtype": "float64"})  # float16 is valid (with loss scaling)
    with pytest.raises(ValueError, match="activation"):
        ClipConfig.from_dict({"activation": "relu"})


def test_input_shape_errors(params) -> None:
    model = CLIP(TINY)
    with pytest.raises(ValueError, match="images must have shape"):
        jax.eval_shape(
            lambda p: model.apply({"params": p}, jnp.zeros((1, 8, 8, 3)), method=CLIP.encode_image),
            params,
        )
    too_long = jnp.ones((1, TINY.text_max_len + 1), jnp.int32)
    with pytest.raises(ValueError, match="exceeds text_max_len"):
        jax.eval_shape(
            lambda p: model.apply({"params": p}, too_long, method=CLIP.encode_text), params
        )
