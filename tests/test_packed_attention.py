"""jaxtrain.models.attention: the flash kernels (Pallas GPU, TPU Splash; in Pallas interpret mode
on CPU) against the masked XLA path, forward and gradients, on packed rows with grouped-query
heads; padding to the block size; sharding under a mesh; the choice of implementation and its
errors; no T×T array in the kernels' compiled gradient."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxtrain.errors import ConfigError
from jaxtrain.mesh import DEFAULT_RULES
from jaxtrain.models.attention import ATTENTION_IMPLS, attention, resolve_impl
from jaxtrain.models.llama import Llama, LlamaConfig

B, T, H, K, D = 2, 40, 4, 2, 16  # T = 40: not a multiple of any block size (padding tested)


def _inputs(t=T, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, t, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, t, K, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, t, K, D)), jnp.float32)
    # packed rows: several documents of uneven length, then padding (segment 0)
    seg = np.zeros((B, t), np.int32)
    seg[0, :11], seg[0, 11:30], seg[0, 30:] = 1, 2, 3
    seg[1, :5], seg[1, 5:33] = 1, 2
    return q, k, v, jnp.asarray(seg)


def _numpy_reference(q, k, v, seg, causal):
    """The formula of jaxtrain.models.attention's docstring, in NumPy (float64)."""
    q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, seg))
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    allowed = (seg[:, :, None] == seg[:, None, :])[:, None]
    if causal:
        allowed = allowed & np.tril(np.ones((q.shape[1],) * 2, bool))
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, v)


def _loss_and_grads(impl, causal, window=None, t=T):
    q, k, v, seg = _inputs(t)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((B, t, H, D)), jnp.float32)

    def loss(q, k, v):
        out = attention(q, k, v, segment_ids=seg, causal=causal, window=window, impl=impl)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("impl", ["pallas", "splash"])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_equals_masked_xla_forward_and_gradient(impl, causal):
    out, grads = _loss_and_grads(impl, causal)
    ref_out, ref_grads = _loss_and_grads("xla", causal)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for g, r, name in zip(grads, ref_grads, "qkv", strict=True):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")
    q, k, v, seg = _inputs()
    np.testing.assert_allclose(out, _numpy_reference(q, k, v, seg, causal), atol=2e-5)


def test_splash_sliding_window_equals_xla():
    window = (6, 0)  # Mistral's sliding_window = 7
    out, grads = _loss_and_grads("splash", True, window)
    ref_out, ref_grads = _loss_and_grads("xla", True, window)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)


def test_kernels_without_segment_ids_pad_correctly():
    """No segment ids, T = 40 padded to the block: the padding must stay invisible."""
    q, k, v, _ = _inputs()
    for causal in (True, False):
        ref = attention(q, k, v, causal=causal, impl="xla")
        for impl in ("pallas", "splash"):
            out = attention(q, k, v, causal=causal, impl=impl)
            np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=f"{impl} causal={causal}")


def test_sharded_kernel_on_8_devices_equals_one_device():
    """Under a 2x2x2 mesh with the logical rules, the kernel runs in shard_map over the batch
    ('data', 'fsdp') and head ('tensor') axes; the result equals the unsharded XLA path."""
    q, k, v, seg = _inputs()
    q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # batch 4 over data x fsdp
    seg = jnp.concatenate([seg, seg[::-1]])
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    shard = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = jax.jit(lambda q, k, v, s: attention(q, k, v, segment_ids=s, impl="pallas"))(
            *(jax.device_put(x, shard) for x in (q, k, v)), seg)
        hlo = jax.jit(lambda q, k, v, s: attention(q, k, v, segment_ids=s, impl="pallas")).lower(
            q, k, v, seg).as_text()
    manual = [line for line in hlo.splitlines() if "manual_computation" in line]
    assert manual and '"data", "fsdp"' in manual[0] and '"tensor"' in manual[0], hlo[:2000]
    ref = attention(q, k, v, segment_ids=seg, impl="xla")
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_llama_packed_rows_pallas_equals_xla():
    """The model with attention_impl='pallas' (scan over layers) equals 'xla' on packed rows."""
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=64, scan_layers=True)
    _, _, _, seg = _inputs()
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (B, T)), jnp.int32)
    params = Llama(LlamaConfig(**base)).init(jax.random.key(0), tokens)["params"]
    outs = {impl: Llama(LlamaConfig(**base, attention_impl=impl)).apply(
        {"params": params}, tokens, None, seg)[0] for impl in ("xla", "pallas")}
    np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=1e-4, rtol=1e-4)


def test_pallas_gradient_holds_no_txt_array():
    """The compiled gradient of the Pallas kernel (interpret mode: its blocks run as XLA loops)
    has no array with two T-sized axes; the masked XLA path has [B, H, T, T] ones."""
    t = 256
    q, k, v, _ = _inputs(t)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4]], B, 0).repeat(t // 4, 1), jnp.int32)

    def hlo(impl):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, segment_ids=seg, impl=impl))  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()

    txt = re.compile(rf"\[[0-9,]*\b{t},{t}\]")
    assert txt.search(hlo("xla"))
    assert not txt.search(hlo("pallas"))


def test_choice_of_implementation_and_errors():
    assert resolve_impl(None, "cpu", True, False) == "xla"
    assert resolve_impl("auto", "tpu", False, True) == "splash"
    assert resolve_impl("auto", "gpu", True, False) == "pallas"
    assert resolve_impl("auto", "gpu", True, True) is None  # window: jax's cuDNN / XLA choice
    assert resolve_impl("auto", "gpu", False, False) is None
    assert resolve_impl("cudnn", "cpu", True, False) == "cudnn"
    with pytest.raises(ConfigError, match="model.attention_impl must be one of.*'splash'"):
        LlamaConfig(attention_impl="flash")
    with pytest.raises(ConfigError, match="no sliding window.*'splash' on TPU"):
        LlamaConfig(attention_impl="pallas", sliding_window=8)
    q, k, v, _ = _inputs()
    with pytest.raises(ConfigError, match="no sliding window"):
        attention(q, k, v, window=(4, 0), impl="pallas")
    assert set(ATTENTION_IMPLS) == {"auto", "xla", "cudnn", "pallas", "splash"}
