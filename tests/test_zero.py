"""Optimizer-only sharding (`mesh.shard_optimizer`, ZeRO-1/2) and save precision
(`checkpoint.save_dtype`, `python -m jaxtrain.export --dtype`)."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain import ConfigError, Trainer
from jaxtrain.checkpoint import read_state
from jaxtrain.mesh import make_mesh, mesh_shape, shard_batch, split_over
from tests.test_lm_task import leaves, load_config, two_steps

# a tiny LM on random tokens: vocab 512, 2 layers of width 32
LM = dict(data__kind="synthetic", model__vocab_size=512, data__train_examples=64,
          data__eval_examples=8, eval__every=0)


def device0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)


def split_bytes(tree, n: int) -> int:
    """Bytes one device holds when every leaf with a dimension divisible by n is split n ways
    (computed from the shapes alone: the reference for the sharded state)."""
    return sum(x.nbytes // n if any(d % n == 0 for d in x.shape) else x.nbytes
               for x in jax.tree.leaves(tree))


def test_split_over_picks_the_largest_divisible_dimension():
    mesh = make_mesh({"data": 4, "fsdp": 2})
    sh = lambda *spec: NamedSharding(mesh, PartitionSpec(*spec))
    assert split_over(sh(), (6, 16, 8), "data").spec == PartitionSpec(None, "data", None)
    assert split_over(sh(), (8, 8), "data").spec == PartitionSpec("data", None)  # leftmost
    # joins the axes already on a dimension when their product divides it
    assert split_over(sh("fsdp"), (16, 3), "data").spec == PartitionSpec(("fsdp", "data"), None)
    assert split_over(sh("fsdp"), (4, 12), "data").spec == PartitionSpec("fsdp", "data")
    for shape in [(), (6,), (3, 5)]:  # nothing divides by 4: replicated over data
        assert split_over(sh(), shape, "data").spec == PartitionSpec()
    one = make_mesh({"data": 1, "fsdp": -1})
    assert split_over(NamedSharding(one, PartitionSpec()), (8,), "data").spec == PartitionSpec()


def test_shard_optimizer_is_a_setting_not_an_axis():
    assert mesh_shape({"data": -1, "fsdp": 2, "shard_optimizer": True}, 8) == (4, 2, 1, 1)
    c = load_config("lm", **LM, mesh__shard_optimizer=False)
    assert Trainer(c).mesh.shape["data"] == 8  # validated: False is no axis of size 0
    with pytest.raises(ConfigError, match="Unknown mesh axes"):
        mesh_shape({"data": -1, "pipeline": 2}, 8)  # other unknown keys stay errors


def test_shard_optimizer_8_devices_equal_1_and_hold_an_eighth():
    c8 = load_config("lm", **LM, mesh__shard_optimizer=True)
    t8, t1 = Trainer(c8), Trainer(load_config("lm", **LM), devices=jax.devices()[:1])
    dp = Trainer(load_config("lm", **LM))  # plain data parallel on 8 devices
    it = t1.task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1)
    batches = [next(it), next(it), next(it)]
    s8, m8 = two_steps(t8, batches)
    s1, m1 = two_steps(t1, batches)
    for a, b in zip(m8, m1, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    for x, y in zip(leaves(s8.params), leaves(s1.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    for x, y in zip(leaves(s8.opt_state), leaves(s1.opt_state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)

    # after the steps: params replicated (every device holds all of them), the optimizer state
    # split over the 8 `data` devices (an eighth of each leaf that 8 divides)
    params_total = sum(x.nbytes for x in jax.tree.leaves(s1.params))
    opt_total = sum(x.nbytes for x in jax.tree.leaves(s1.opt_state))
    assert device0_bytes(s8.params) == params_total
    assert device0_bytes(s8.opt_state) == split_bytes(s1.opt_state, 8)
    assert device0_bytes(s8.opt_state) <= 1.01 * opt_total / 8
    for x in jax.tree.leaves(s8.params):
        assert all(s.data.shape == x.shape for s in x.addressable_shards)
    moments = [x for x in jax.tree.leaves(s8.opt_state) if x.ndim]
    assert moments and all(x.addressable_shards[0].data.size * 8 == x.size for x in moments)
    # plain data parallel keeps all of it on every device
    s_dp = dp.init_state()
    assert device0_bytes(s_dp.opt_state) == opt_total
    # the compiled step's arguments shrink by 7/8 of the optimizer state
    args8 = t8.compiled_step(s8, shard_batch(batches[0], t8.mesh)).fn.memory_analysis()
    args_dp = dp.compiled_step(s_dp, shard_batch(batches[0], dp.mesh)).fn.memory_analysis()
    saved = args_dp.argument_size_in_bytes - args8.argument_size_in_bytes
    assert saved == opt_total - split_bytes(s1.opt_state, 8)


# ------------------------------------------------------------------ save precision


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A tiny LM trained 2 steps with checkpoint.save_dtype='bfloat16'."""
    run = str(tmp_path_factory.mktemp("bf16") / "run")
    c = load_config("lm", **LM, train__steps=2, optim__warmup_steps=1,
                    checkpoint__save_dtype="bfloat16")
    Trainer(c, run, devices=jax.devices()[:1]).train()
    return run


def floating_dtypes(tree) -> set[str]:
    return {np.dtype(x.dtype).name for x in jax.tree.leaves(tree)
            if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)}


def test_training_checkpoint_keeps_full_precision(bf16_run):
    config, state = read_state(bf16_run)
    assert config["checkpoint"]["save_dtype"] == "bfloat16"
    assert floating_dtypes(state["params"]) == {"float32"}
    assert floating_dtypes(state["opt_state"]) == {"float32"}


def test_save_dtype_is_validated():
    with pytest.raises(ConfigError, match="checkpoint.save_dtype"):
        Trainer(load_config("lm", **LM, checkpoint__save_dtype="int8"))


def hf_logits(path, tokens, dtype=None):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long)).logits
    return model.dtype, out.float().numpy()


def test_export_dtype_bf16_hf_and_params_out(bf16_run, tmp_path):
    """No --dtype: the run's checkpoint.save_dtype (bfloat16) for --hf_out and --params_out;
    --dtype=fp32 overrides it. transformers loads the bf16 directory as bf16, and its logits
    (computed in float32 from the bf16 weights) are close to the fp32 export's."""
    pytest.importorskip("torch")
    from safetensors import safe_open

    from jaxtrain.export import cli

    _, want = read_state(bf16_run)
    cli(bf16_run, hf_out=str(tmp_path / "hf16"), params_out=str(tmp_path / "p16"))
    cli(bf16_run, hf_out=str(tmp_path / "hf32"), dtype="fp32")
    for name, dtype in (("hf16", "bfloat16"), ("hf32", "float32")):
        hf_config = json.loads((tmp_path / name / "config.json").read_text())
        assert hf_config["torch_dtype"] == hf_config["dtype"] == dtype
        with safe_open(str(tmp_path / name / "model.safetensors"), framework="pt") as f:
            got = {str(f.get_tensor(k).dtype) for k in f.keys()}
        assert got == {f"torch.{dtype}"}
    # the bf16 file is half the size of the fp32 one
    size = lambda name: os.path.getsize(tmp_path / name / "model.safetensors")
    assert size("hf16") < 0.55 * size("hf32")

    tokens = np.random.default_rng(0).integers(0, 512, (2, 12))
    dtype16, logits16 = hf_logits(str(tmp_path / "hf16"), tokens)
    dtype32, logits32 = hf_logits(str(tmp_path / "hf32"), tokens)
    import torch

    assert dtype16 == torch.bfloat16 and dtype32 == torch.float32
    _, up16 = hf_logits(str(tmp_path / "hf16"), tokens, torch.float32)  # bf16 weights, fp32 math
    scale = np.max(np.abs(logits32))
    for got in (logits16, up16):
        assert not np.array_equal(got, logits32)  # the weights were rounded
        assert np.max(np.abs(got - logits32)) < 0.02 * scale  # measured: 0.0025 * scale
    # ours on the original fp32 params equals the fp32 export (transformers' reference)
    from jaxtrain.export import inference_task

    config, _ = read_state(bf16_run)
    task = inference_task(config)
    ours = jax.jit(task.inference)(want["params"], {}, {"tokens": tokens.astype(np.int32)})
    np.testing.assert_allclose(np.asarray(ours["logits"]), logits32, rtol=1e-4, atol=1e-4 * scale)

    # --params_out: a params-only checkpoint in bf16, the rounded params
    _, saved = read_state(str(tmp_path / "p16"))
    assert floating_dtypes(saved["params"]) == {"bfloat16"}
    for x, y in zip(leaves(saved["params"]), leaves(want["params"]), strict=True):
        np.testing.assert_array_equal(x, y.astype(x.dtype))


def test_export_bundle_dtype_and_overflow(bf16_run, tmp_path):
    """--dtype=fp16 for a bundle: params.safetensors holds float16 (checked against the cast
    params), and the StableHLO module takes them (verified against the in-memory model on the
    same params); values beyond float16's range are an error naming the parameter."""
    from safetensors.numpy import load_file

    from jaxtrain.export import ExportError, export_bundle
    from jaxtrain.export.params import cast_params

    manifest = export_bundle(bf16_run, str(tmp_path / "b"), "safetensors,stablehlo",
                             batch_size=2, seq_len=8, dtype="fp16")
    assert manifest["dtype"] == "float16" and manifest["checks"]["stablehlo"]["checked"]
    bundle = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert bundle["outputs"]["logits"]["dtype"] == "float32"
    flat = load_file(str(tmp_path / "b" / "params.safetensors"))
    assert {np.dtype(v.dtype).name for v in flat.values()} == {"float16"}
    _, want = read_state(bf16_run)
    np.testing.assert_array_equal(flat["norm/scale"], want["params"]["norm"]["scale"]
                                  .astype(np.float16))
    with pytest.raises(ExportError, match=r"param a/b has values beyond float16's range"):
        cast_params({"a": {"b": np.array([1.0, 7e4], np.float32)}, "n": np.arange(3)}, "float16")
    ints = cast_params({"n": np.arange(3)}, "bfloat16")["n"]
    assert ints.dtype == np.arange(3).dtype  # integer leaves stay
    with pytest.raises(ExportError, match="--dtype 'int8' is not a save dtype"):
        export_bundle(bf16_run, str(tmp_path / "c"), "safetensors", dtype="int8")
