"""LoRA (jaxtrain/lora.py) on the tiny SFT and CLIP configs: identity at init, merge equals the
adapter model, optimizer state for the adapters alone, a frozen base, trainable extras and
parameter groups, bfloat16 base, dropout, adapter files, read_run of a LoRA run, 8 devices."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxtrain import Trainer
from jaxtrain.lora import load_adapters, merge, save_adapters, split_axes
from jaxtrain.mesh import shard_batch
from jaxtrain.task import params_key
from jaxtrain.tree import path_str
from jaxtrain.weights import read_run
from tests.test_lm_task import load_config

ROOT = Path(__file__).resolve().parents[1]
ONE = jax.devices()[:1]
NORMS = ".*norm.*"


def clip_config(**model):
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import clip

        c = clip.get_config("runlocal")
    finally:
        sys.path.pop(0)
    c.train.progress_bar = False
    c.model.update(model)
    return c


def sft(**overrides):
    """The tiny SFT run with rank-4 adapters on q/k/v/o and the norm scales trained in full;
    no warmup, so the first step already moves the adapters."""
    kw = dict(lora__rank=4, lora__trainable=NORMS, data__seq_len=64, data__eval_rows=16,
              optim__warmup_steps=0, optim__lr=1e-2, train__steps=3, train__log_every=1,
              eval__every=0, checkpoint__every=0, checkpoint__async_save=False)
    return load_config("sft", **{**kw, **overrides})


def flat(tree) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def first_batch(trainer):
    it = trainer.task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1)
    return next(it)


def plain_params_paths(trainer) -> set[str]:
    """The tree paths of the non-LoRA model's parameters."""
    abstract = jax.eval_shape(trainer.task.inner.init_params, params_key(0))
    return set(flat(jax.tree.map(lambda s: np.zeros((), s.dtype), nn.unbox(abstract))))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 3-step LoRA SFT run on 1 device, with its fresh initial state."""
    workdir = str(tmp_path_factory.mktemp("lora_sft"))
    trainer = Trainer(sft(), workdir, devices=ONE)
    result = trainer.train()
    init = jax.device_get(trainer.init_state())
    return types.SimpleNamespace(trainer=trainer, result=result, workdir=workdir, init=init,
                                 final=jax.device_get(result.final_state),
                                 batch=first_batch(trainer), lora=trainer.config.lora,
                                 lora_loss=jax.jit(trainer.task.loss_fn),
                                 plain_loss=jax.jit(trainer.task.inner.loss_fn))


def test_lora_at_init_leaves_the_loss_unchanged(run):
    trainer, init = run.trainer, run.init
    lora = flat(init.params["lora"])
    assert lora and all(not v.any() for k, v in lora.items() if k.endswith("/b"))  # B = 0
    assert all(v.std() > 0 for k, v in lora.items() if k.endswith("/a"))
    # the frozen base is exactly what the non-LoRA trainer would start from
    plain = Trainer(load_config("sft", data__seq_len=64), devices=ONE)
    plain_init = flat(plain.init_state().params)
    base = flat(init.frozen["lora_base"])
    assert base.keys() == plain_init.keys()
    for k in base:
        np.testing.assert_array_equal(base[k], plain_init[k], err_msg=k)
    _, metrics = trainer.train_step(trainer.init_state(), shard_batch(run.batch, trainer.mesh))
    loss, _ = run.plain_loss(init.frozen["lora_base"], run.batch, jax.random.PRNGKey(1), {})
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    assert 5.0 < float(loss) < 15.0  # a real (untrained, 50k-vocab) loss, not a degenerate one


def test_split_axes_picks_the_input_axes():
    assert split_axes((32, 2, 16), ("embed", "heads", "head_dim")) == (0, 1)  # q_proj
    assert split_axes((2, 16, 32), ("heads", "head_dim", "embed")) == (0, 2)  # o_proj
    assert split_axes((64, 32), ("mlp", "embed")) == (0, 1)  # down_proj
    assert split_axes((3, 32, 2, 16), ("layers", "embed", "heads", "head_dim")) == (1, 1)
    assert split_axes((3, 4, 32, 64), ("layers", "expert", "embed", "mlp")) == (2, 1)
    with pytest.raises(ValueError, match="input and output axes"):
        split_axes((3, 32), ("layers", "embed"))


def test_merge_equals_numpy_reference_and_the_adapter_model(run):
    trainer, final = run.trainer, run.final
    params, base = final.params, final.frozen["lora_base"]
    lora, base_flat = flat(params["lora"]), flat(base)
    scale = run.lora.alpha / run.lora.rank
    assert scale == 4.0
    abstract = _leaves_boxed(jax.eval_shape(trainer.task.inner.init_params, params_key(0)))
    # split_axes on the model's own names: q_proj [D, H, Dh] has 1 input axis, o_proj 2
    q, o = "layers_0/self_attn/q_proj/kernel", "layers_0/self_attn/o_proj/kernel"
    assert base_flat[q].shape == (32, 2, 16) and base_flat[o].shape == (2, 16, 32)
    assert split_axes(abstract[q].value.shape, abstract[q].names) == (0, 1)
    assert split_axes(abstract[o].value.shape, abstract[o].names) == (0, 2)

    merged = flat(merge(params, base, run.lora))
    assert merged.keys() == base_flat.keys()
    reference = dict(base_flat)
    adapted = sorted({k.rsplit("/", 1)[0] for k in lora})
    assert len(adapted) == 8  # q, k, v, o in 2 layers
    for k in adapted:
        a, b = lora[f"{k}/a"].astype(np.float64), lora[f"{k}/b"].astype(np.float64)
        assert np.abs(b).max() > 1e-3, k  # trained: B is no longer zero
        n_in = a.ndim - 1
        assert n_in == (2 if "o_proj" in k else 1)
        w = base_flat[k].astype(np.float64)
        reference[k] = (w + scale * np.tensordot(a, b, axes=([-1], [0]))).astype(np.float32)
        assert not np.allclose(reference[k], base_flat[k], atol=1e-4), k
    # explicit einsums for the two 3-D shapes
    np.testing.assert_allclose(
        reference[q], base_flat[q] + scale * np.einsum(
            "dr,rhk->dhk", lora[f"{q}/a"], lora[f"{q}/b"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        reference[o], base_flat[o] + scale * np.einsum(
            "hkr,rd->hkd", lora[f"{o}/a"], lora[f"{o}/b"]), rtol=1e-5, atol=1e-6)
    for k, v in flat(params["train"]).items():  # trained norm scales replace the base's
        reference[k] = v
    for k in merged:
        np.testing.assert_allclose(merged[k], reference[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # the merged weights as plain params of the non-LoRA model = the LoRA task
    ref_tree = _nest_like(base, reference)
    inner, task = trainer.task.inner, trainer.task
    rng = jax.random.PRNGKey(3)
    lora_loss, _ = run.lora_loss(params, run.batch, rng, final.frozen)
    plain_loss, _ = run.plain_loss(ref_tree, run.batch, rng, {})
    np.testing.assert_allclose(float(lora_loss), float(plain_loss), rtol=1e-5)
    base_loss, _ = run.plain_loss(base, run.batch, rng, {})
    assert abs(float(base_loss) - float(plain_loss)) > 1e-3  # the adapters changed the model
    lora_eval = jax.jit(_evaluated(task))(params, run.batch, final.frozen)
    plain_eval = jax.jit(inner.token_nll)(ref_tree, run.batch)
    np.testing.assert_allclose(lora_eval["nll"], plain_eval["nll"], rtol=1e-5, atol=1e-4)


def _evaluated(task):
    """The perplexity evaluator's per-row outputs on what evaluators see of `task`'s params
    (the engine's eval step: `eval_params`, then the evaluator's step)."""
    return lambda params, batch, frozen: task.inner.token_nll(
        task.eval_params(params, frozen)[0], batch)


def _leaves_boxed(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    return {path_str(p): x for p, x in leaves}


def _nest_like(tree, values: dict[str, np.ndarray]):
    return jax.tree_util.tree_map_with_path(lambda p, _: values[path_str(p)], tree)


def test_merge_of_a_scanned_kernel_matches_numpy():
    import ml_collections

    rng = np.random.default_rng(0)
    cfg = ml_collections.ConfigDict(dict(rank=2, alpha=6.0, dropout=0.0))
    w = rng.normal(size=(3, 2, 4, 5)).astype(np.float32)  # [layers, heads, head_dim, embed]
    assert split_axes(w.shape, ("layers", "heads", "head_dim", "embed")) == (1, 2)
    a = rng.normal(size=(3, 2, 4, 2)).astype(np.float32)
    b = rng.normal(size=(3, 2, 5)).astype(np.float32)
    out = merge({"lora": {"o": {"kernel": {"a": a, "b": b}}}}, {"o": {"kernel": w}}, cfg)
    want = w + 3.0 * np.einsum("lhkr,lrd->lhkd", a, b)
    np.testing.assert_allclose(out["o"]["kernel"], want, rtol=1e-5, atol=1e-5)


def test_optimizer_state_holds_only_the_trainable_params(run):
    init, final = run.init, run.final
    trainable = flat(final.params)
    assert {k.split("/")[0] for k in trainable} == {"lora", "train"}
    shapes = {v.shape for v in trainable.values()}
    opt = [np.asarray(x) for x in jax.tree.leaves(final.opt_state) if np.ndim(x) > 0]
    assert opt and all(x.shape in shapes for x in opt), {x.shape for x in opt} - shapes
    n_trainable = sum(v.size for v in trainable.values())
    n_opt = sum(x.size for x in opt)
    n_base = sum(v.size for v in flat(final.frozen["lora_base"]).values())
    assert n_opt == 2 * n_trainable  # AdamW: mu and nu of each trainable leaf
    assert n_opt < 0.01 * 2 * n_base
    # the base is never changed by training; every adapter is
    base0, base1 = flat(init.frozen), flat(final.frozen)
    assert base0.keys() == base1.keys()
    for k in base0:
        np.testing.assert_array_equal(base0[k], base1[k], err_msg=k)
    assert int(final.step) == 3
    before = flat(init.params)
    for k, v in trainable.items():
        assert not np.array_equal(v, before[k]), f"{k} was not updated"


def test_trainable_norms_and_param_groups(run):
    base_paths = flat(run.init.frozen["lora_base"])
    norms = {k for k in base_paths if "norm" in k}
    assert len(norms) == 5  # 2 per layer + the final norm
    train0, train1 = flat(run.init.params["train"]), flat(run.final.params["train"])
    assert set(train0) == norms
    for k in norms:  # start from the base's value, then trained
        np.testing.assert_array_equal(train0[k], base_paths[k])
        assert not np.allclose(train1[k], train0[k]), k

    cfg = sft(optim__param_groups=(("lora/.*", 1.0), ("train/.*", 0.0)))
    trainer = Trainer(cfg, devices=ONE)
    state = trainer.init_state()
    start = flat(state.params)
    for _ in range(2):
        state, _ = trainer.train_step(state, shard_batch(run.batch, trainer.mesh))
    end = flat(state.params)
    for k in start:
        if k.startswith("train/"):
            np.testing.assert_array_equal(end[k], start[k], err_msg=k)
        else:
            assert not np.array_equal(end[k], start[k]), f"{k} was not updated"


def test_clip_lora(run):
    cfg = clip_config()
    cfg.lora.rank = 4
    cfg.lora.targets = r".*(q_proj|k_proj|v_proj|out_proj)/kernel"
    cfg.optim.warmup_steps = 0
    trainer = Trainer(cfg, devices=ONE)
    state = trainer.init_state()
    lora = flat(state.params["lora"])
    assert {k.split("/")[0] for k in lora} == {"text_model", "vision_model"}
    assert "text_model/encoder/layers_0/self_attn/q_proj/kernel/a" in lora
    assert len(lora) == 2 * 4 * 2  # (a, b) x 4 projections x 2 towers (1 layer each)
    batch = next(trainer.task.train_iterator(seed=0, batch_size=16, process_index=0,
                                             process_count=1))
    base = jax.device_get(state.frozen["lora_base"])
    plain_loss, _ = jax.jit(trainer.task.inner.loss_fn)(base, batch, jax.random.PRNGKey(0), {})
    state, metrics = trainer.train_step(state, shard_batch(batch, trainer.mesh))
    np.testing.assert_allclose(float(metrics["loss"]), float(plain_loss), rtol=1e-6)
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    after = flat(state.params["lora"])
    moved = {k.split("/")[0] for k in after if k.endswith("/b") and np.abs(after[k]).max() > 0}
    assert moved == {"text_model", "vision_model"}


def test_bfloat16_base(run):
    trainer = Trainer(sft(lora__base_dtype="bfloat16"), devices=ONE)
    state = trainer.init_state()
    base16, base32 = flat(state.frozen["lora_base"]), flat(run.init.frozen["lora_base"])
    assert all(v.dtype == jax.numpy.bfloat16 for v in base16.values())
    assert all(v.dtype == np.float32 for v in flat(state.params).values())
    for k in base32:
        np.testing.assert_array_equal(base16[k], base32[k].astype(jax.numpy.bfloat16))
    rng = jax.random.PRNGKey(0)
    fn = jax.jit(trainer.task.loss_fn)
    # the trained fp32 run's adapters on the bf16 base vs on the fp32 base
    loss16, _ = fn(run.final.params, run.batch, rng, state.frozen)
    loss32, _ = run.lora_loss(run.final.params, run.batch, rng, run.final.frozen)
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=1e-2)


def test_dropout_is_random_in_training_and_off_in_eval(run):
    trainer = Trainer(sft(lora__dropout=0.5), devices=ONE)
    task = trainer.task
    loss = jax.jit(task.loss_fn)
    r1, r2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    # B = 0 at init: dropout of the adapter path changes nothing
    init_frozen = run.init.frozen
    a0, _ = loss(run.init.params, run.batch, r1, init_frozen)
    b0, _ = loss(run.init.params, run.batch, r2, init_frozen)
    assert float(a0) == float(b0)
    params, frozen = run.final.params, run.final.frozen
    l1, _ = loss(params, run.batch, r1, frozen)
    l1_again, _ = loss(params, run.batch, r1, frozen)
    l2, _ = loss(params, run.batch, r2, frozen)
    assert float(l1) == float(l1_again)
    assert abs(float(l1) - float(l2)) > 1e-4
    ev = jax.jit(_evaluated(task))
    e1, e2 = ev(params, run.batch, frozen), ev(params, run.batch, frozen)
    np.testing.assert_array_equal(e1["nll"], e2["nll"])
    no_dropout = jax.jit(_evaluated(run.trainer.task))(params, run.batch, frozen)
    np.testing.assert_allclose(e1["nll"], no_dropout["nll"], rtol=1e-6)


_DROPOUT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, ml_collections, numpy as np
from jaxtrain.lora import merge
cfg = ml_collections.ConfigDict(dict(rank=2, alpha=2.0, dropout=0.5))
ones = lambda *s: np.ones(s, np.float32)
params = {"lora": {f"l{i}": {"q_proj": {"kernel": {"a": ones(64, 2), "b": ones(2, 3)}}}
                   for i in range(4)}}
base = {f"l{i}": {"q_proj": {"kernel": ones(64, 3)}} for i in range(4)}
out = merge(params, base, cfg, jax.random.PRNGKey(0))
print(json.dumps({k: np.asarray(v["q_proj"]["kernel"]).tolist() for k, v in out.items()}))
"""


def test_dropout_masks_do_not_depend_on_the_python_process():
    """Every host of a multi-host run (and a resumed run) must draw the same masks: they may not
    depend on Python's per-process string hashing."""
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        proc = subprocess.run([sys.executable, "-c", _DROPOUT_SCRIPT, str(ROOT)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    kernel = np.asarray(outs[0]["l0"])
    assert len(np.unique(kernel)) == 2  # some input rows dropped, the rest scaled by 1/keep


def test_adapters_round_trip(run, tmp_path):
    params = run.final.params
    save_adapters(str(tmp_path / "ad"), params, run.lora)
    cfg, loaded = load_adapters(str(tmp_path / "ad"))
    assert cfg.to_dict() == run.lora.to_dict()
    want, got = flat(params), flat(loaded)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # loaded adapters merge to the same full weights
    a = flat(merge(loaded, run.final.frozen["lora_base"], cfg))
    b = flat(merge(params, run.final.frozen["lora_base"], run.lora))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    os.remove(tmp_path / "ad" / "adapters.safetensors")
    with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
        load_adapters(str(tmp_path / "ad"))
    with pytest.raises(FileNotFoundError, match=r"(?s)adapters\.safetensors.*lora\.json"):
        load_adapters(str(tmp_path / "nowhere"))


def test_read_run_of_a_lora_run_is_merged(run):
    assert run.result.final_step == 3
    config, params = read_run(run.workdir)
    assert config["lora"]["rank"] == 4
    got = flat(params)
    assert set(got) == plain_params_paths(run.trainer)  # the full model's tree, no lora/train
    want = flat(merge(run.final.params, run.final.frozen["lora_base"], run.lora))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    q = "layers_0/self_attn/q_proj/kernel"
    assert not np.allclose(got[q], flat(run.final.frozen["lora_base"])[q], atol=1e-4)


def test_targets_matching_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match=r"(?s)matches no kernel.*layers_0/[a-z_]+/[a-z_]+/kernel"):
        Trainer(sft(lora__targets=r".*qkv_proj/kernel"), devices=ONE)


def test_lora_on_8_devices_equals_1_device(run):
    t8 = Trainer(sft(mesh__data=2, mesh__fsdp=2, mesh__tensor=2))
    assert t8.mesh.devices.size == 8
    s8 = t8.init_state()
    kernel = s8.frozen["lora_base"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert len({str(s.index) for s in kernel.addressable_shards}) > 1  # the base is sharded
    s8, m8 = t8.train_step(s8, shard_batch(run.batch, t8.mesh))
    t1 = run.trainer
    s1, m1 = t1.train_step(t1.init_state(), shard_batch(run.batch, t1.mesh))
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-4)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    p8, p1 = flat(s8.params), flat(s1.params)
    for k in p1:
        np.testing.assert_allclose(p8[k], p1[k], rtol=1e-4, atol=1e-6, err_msg=k)
