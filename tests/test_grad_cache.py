"""The gradient cache equals plain back-propagation through the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain import mesh as mesh_lib
from jaxtrain.grad_cache import gradient_cache, merge_chunks, split_chunks
from jaxtrain.losses.contrastive import clip_loss

B, DIN, D = 32, 12, 8


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    return {
        "img": {"w1": jax.random.normal(k[0], (DIN, 16)) * 0.3,
                "w2": jax.random.normal(k[1], (16, D)) * 0.3},
        "txt": {"w1": jax.random.normal(k[2], (DIN, 16)) * 0.3,
                "w2": jax.random.normal(k[3], (16, D)) * 0.3},
        "logit_scale": jnp.asarray(np.log(10.0), jnp.float32),
    }


def _tower(p, x, rng=None, rate=0.0):
    h = jnp.tanh(x @ p["w1"])
    if rate:
        h = h * jax.random.bernoulli(rng, 1 - rate, h.shape) / (1 - rate)
    e = h @ p["w2"]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def _embed(rate=0.0):
    def embed(params, batch, rng, frozen):
        r1, r2 = jax.random.split(rng)
        return {"a": _tower(params["img"], batch["x"], r1, rate),
                "b": _tower(params["txt"], batch["y"], r2, rate)}
    return embed


def _loss(params, embeds, aux, rng, frozen):
    loss, metrics = clip_loss(embeds["a"], embeds["b"], params["logit_scale"])
    if aux is not None:  # a frozen "teacher" term: pulls a towards the aux embeddings
        loss = loss + jnp.mean(jnp.sum((embeds["a"] - aux["t"]) ** 2, -1))
    return loss, metrics


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(B, DIN)).astype(np.float32),
            "y": rng.normal(size=(B, DIN)).astype(np.float32)}


def _reference(params, batch, aux=None):
    def total(p):
        embeds = _embed()(p, batch, jax.random.PRNGKey(0), {})
        return _loss(p, embeds, aux, None, {})
    (loss, _), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss, grads


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_split_and_merge_are_inverse_and_strided():
    x = jnp.arange(12 * 2).reshape(12, 2)
    chunks = split_chunks({"x": x}, 3)["x"]
    assert chunks.shape == (3, 4, 2)
    np.testing.assert_array_equal(chunks[1, :, 0], x[1::3, 0])  # chunk k = rows k, k+K, ...
    np.testing.assert_array_equal(merge_chunks({"x": chunks})["x"], x)


@pytest.mark.parametrize("chunk", [4, 8, 32])
def test_equals_plain_gradient_one_device(chunk):
    params, batch = _params(), _batch()
    want_loss, want = _reference(params, batch)
    fn = jax.jit(gradient_cache(_embed(), _loss, chunk))
    loss, metrics, grads = fn(params, batch, jax.random.PRNGKey(0), {})
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    _close(grads, want)
    assert set(metrics) >= {"loss", "i2t_acc"}
    assert float(np.abs(grads["logit_scale"])) > 0  # the direct (loss -> param) path counts


def test_equals_plain_gradient_on_8_devices():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1, "expert": 1})
    params, batch = _params(), _batch()
    want_loss, want = _reference(params, batch)
    sharded = {k: jax.device_put(v, NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES)))
               for k, v in batch.items()}
    fn = jax.jit(gradient_cache(_embed(), _loss, 16, mesh=mesh))
    loss, _, grads = fn(params, sharded, jax.random.PRNGKey(0), {})
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    _close(grads, want)


def test_aux_embeddings_get_no_gradient_and_count_in_the_loss():
    params, batch = _params(), _batch()
    teacher = _params(seed=7)["img"]
    aux = {"t": _tower(teacher, batch["x"])}
    want_loss, want = _reference(params, batch, aux)
    aux_fn = lambda chunk, frozen: {"t": _tower(frozen["teacher"], chunk["x"])}  # noqa: E731
    fn = jax.jit(gradient_cache(_embed(), _loss, 8, aux_fn=aux_fn))
    loss, _, grads = fn(params, batch, jax.random.PRNGKey(0), {"teacher": teacher})
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    _close(grads, want)


def test_dropout_masks_agree_between_the_two_passes():
    """With dropout, chunk k uses fold_in(rng, k) in both passes: the result equals plain
    back-propagation through the same chunk-wise forward."""
    params, batch, rng, chunk = _params(), _batch(), jax.random.PRNGKey(3), 8
    embed = _embed(rate=0.3)

    def total(p):
        parts = [embed(p, {k: v[i::B // chunk] for k, v in batch.items()},
                       jax.random.fold_in(rng, i), {}) for i in range(B // chunk)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
        return _loss(p, merge_chunks(stacked), None, rng, {})

    (want_loss, _), want = jax.value_and_grad(total, has_aux=True)(params)
    loss, _, grads = jax.jit(gradient_cache(embed, _loss, chunk))(params, batch, rng, {})
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    _close(grads, want)


def test_chunk_must_divide_the_batch():
    fn = gradient_cache(_embed(), _loss, 5)
    with pytest.raises(ValueError, match="not a multiple of train.gradient_cache_chunk_size"):
        fn(_params(), _batch(), jax.random.PRNGKey(0), {})
    with pytest.raises(ValueError, match="must be > 0"):
        gradient_cache(_embed(), _loss, 0)


def test_peak_memory_follows_the_chunk_not_the_batch():
    """Compiled temporaries: the plain step's activations grow with the batch, the cached
    step's with the chunk. (Both hold the loss's [B, B] logits: small next to a wide tower.)"""
    wide = {"img": {"w1": jnp.zeros((DIN, 8192)), "w2": jnp.zeros((8192, D))},
            "txt": {"w1": jnp.zeros((DIN, 8192)), "w2": jnp.zeros((8192, D))},
            "logit_scale": jnp.zeros(())}

    def temp_bytes(fn, rows):
        batch = {"x": jnp.zeros((rows, DIN)), "y": jnp.zeros((rows, DIN))}
        compiled = jax.jit(fn).lower(wide, batch, jax.random.PRNGKey(0), {}).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def plain(params, batch, rng, frozen):
        def total(p):
            return _loss(p, _embed()(p, batch, rng, frozen), None, rng, frozen)
        return jax.value_and_grad(total, has_aux=True)(params)

    cached = gradient_cache(_embed(), _loss, 32)
    plain_growth = temp_bytes(plain, 512) - temp_bytes(plain, 128)
    cached_growth = temp_bytes(cached, 512) - temp_bytes(cached, 128)
    activations = (512 - 128) * 8192 * 4  # one tower's hidden layer, f32
    assert plain_growth > 2 * activations
    assert cached_growth < activations / 2
