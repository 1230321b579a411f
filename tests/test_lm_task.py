"""Language-model training end to end: sharded vs single device (dense and MoE), resume,
curriculum, distillation from a jaxtrain teacher, starting from Hugging Face weights, the CLI."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain.mesh import shard_batch
from jaxtrain.tasks.lm import parse_curriculum

ROOT = Path(__file__).resolve().parents[1]
ONE = jax.devices()[:1]  # for tests of what does not depend on the sharding


def load_config(name: str, arg: str = "runlocal", **overrides):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.train.progress_bar = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_resumed_equals_straight(resumed, straight, cut: int) -> None:
    """A run stopped after step `cut` and resumed took the uninterrupted run's later steps:
    the same losses from step cut + 1 on, and the same final params."""
    assert [s for s, _ in resumed.loss_history] == list(range(cut + 1, straight.final_step + 1))
    np.testing.assert_allclose([loss for _, loss in resumed.loss_history],
                               [loss for _, loss in straight.loss_history[cut:]], rtol=1e-5)
    for x, y in zip(leaves(resumed.final_state.params), leaves(straight.final_state.params),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def two_steps(trainer, batches):
    state = trainer.init_state()
    out = []
    for b in batches:
        state, m = trainer.train_step(state, shard_batch(b, trainer.mesh))
        out.append(jax.device_get(m))
    return state, out


@pytest.mark.parametrize("name,mesh", [
    ("lm", dict(data=2, fsdp=2, tensor=2)),
    ("moe", dict(data=2, fsdp=1, tensor=1, expert=4)),
    ("moe", dict(data=1, fsdp=2, tensor=2, expert=2)),
])
def test_sharded_on_8_devices_equals_1_device(name, mesh):
    c8 = load_config(name)
    c8.mesh.update(mesh)
    t8 = Trainer(c8)
    t1 = Trainer(load_config(name), devices=jax.devices()[:1])
    it = t1.task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1)
    batches = [next(it), next(it)]
    s8, m8 = two_steps(t8, batches)
    s1, m1 = two_steps(t1, batches)
    for a, b in zip(m8, m1, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    for x, y in zip(leaves(s8.params), leaves(s1.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    if name == "moe":
        # experts really are split over the expert axis, and the router stats are reported
        gate = s8.params["layers_0"]["mlp"]["gate_proj"]
        assert gate.sharding.spec[0] == "expert", gate.sharding
        assert len({str(s.index) for s in gate.addressable_shards}) == 8 // mesh["data"]
        np.testing.assert_allclose(m8[0]["moe/expert_load"].sum(), 1.0, rtol=1e-5)
        assert 0.0 <= m8[0]["moe/dropped_fraction"] < 1.0


def test_resume_mid_epoch_sees_the_same_batches(tmp_path):
    # on 1 device (about half the CPU time of 8): the data position is what is tested here;
    # sharded checkpoints resume in test_recovery.py and test_multiprocess.py
    straight = Trainer(load_config("lm", train__steps=8, checkpoint__every=0, eval__every=0),
                       str(tmp_path / "a"), devices=ONE).train()
    cut = load_config("lm", train__steps=8, checkpoint__every=0, eval__every=0)
    Trainer(cut, str(tmp_path / "b"), devices=ONE).train(stop_at_step=3)
    resumed = Trainer(cut, str(tmp_path / "b"), devices=ONE).train()
    assert_resumed_equals_straight(resumed, straight, cut=3)


def test_curriculum_keeps_tokens_per_batch_and_compiles_per_length(tmp_path):
    c = load_config("lm", data__curriculum="8:2,16:4", train__steps=6, eval__every=0,
                    train__log_every=1)
    trainer = Trainer(c, str(tmp_path), devices=ONE)  # the 3 compiles are what is counted
    it = trainer.train_iterator()
    plain = Trainer(load_config("lm"), str(tmp_path / "p"), devices=ONE).train_iterator()
    for step in range(6):
        batch, whole = next(it), next(plain)
        rows = {0: 32, 1: 32, 2: 16, 3: 16}.get(step, 8)
        assert batch["inputs"].shape == (rows, 32 * 8 // rows)
        # the same tokens, cut into shorter rows
        np.testing.assert_array_equal(batch["inputs"].reshape(8, 32), whole["inputs"])
    result = trainer.train()
    assert len(trainer._compiled) == 3
    tokens = [r["train/tokens_seen"] for r in result.metrics if "train/tokens_seen" in r]
    assert tokens == [256.0 * (i + 1) for i in range(6)]
    with pytest.raises(ConfigError, match="divide"):
        parse_curriculum("12:5", 32)
    with pytest.raises(ConfigError, match="increase"):
        parse_curriculum("16:5,8:9", 32)


def test_distillation_from_a_jaxtrain_teacher(tmp_path):
    # on 1 device: the teacher's weights and the loss are tested here, not the sharding
    teacher_dir = str(tmp_path / "teacher")
    teacher = Trainer(load_config("lm", train__steps=4, eval__every=0), teacher_dir,
                      devices=ONE).train()
    c = load_config("distill", f"runlocal,teacher={teacher_dir}", train__steps=3,
                    eval__every=0)
    trainer = Trainer(c, str(tmp_path / "student"), devices=ONE)
    result = trainer.train()
    # the frozen teacher is the trained teacher, and training leaves it untouched
    for x, y in zip(leaves(result.final_state.frozen["teacher"]),
                    leaves(teacher.final_state.params), strict=True):
        np.testing.assert_array_equal(x, y)
    train = [r for r in result.metrics if "train/kd" in r]
    assert train and np.isfinite(train[-1]["train/kd"]) and train[-1]["train/kd"] > 0
    # alpha = 0 is plain cross-entropy: the same loss as training without a teacher
    c0 = load_config("distill", f"runlocal,teacher={teacher_dir}", distill__alpha=0.0)
    plain = load_config("distill", "runlocal", distill__teacher="")
    t0, tp = Trainer(c0, devices=ONE), Trainer(plain, devices=ONE)
    batch = next(tp.task.train_iterator(seed=0, batch_size=8, process_index=0, process_count=1))
    _, m0 = two_steps(t0, [batch])
    _, mp = two_steps(tp, [batch])
    np.testing.assert_allclose(m0[0]["loss"], mp[0]["loss"], rtol=1e-6)


def test_starts_from_hugging_face_weights(tmp_path):
    from jaxtrain.hf import save_hf
    from jaxtrain.models.llama import LlamaConfig, init_params

    cfg = LlamaConfig(vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=48)
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(7)))
    save_hf(str(tmp_path / "hf"), params, cfg)
    # the config's own model shape differs: init_from decides it
    c = load_config("sft", init_from=str(tmp_path / "hf"))
    trainer = Trainer(c, str(tmp_path / "run"))
    assert trainer.task.model_config.num_kv_heads == 2
    state = trainer.init_state()
    for x, y in zip(leaves(state.params), leaves(params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(load_config("sft", init_from=str(tmp_path / "nope")))
    # the same directory as a distillation teacher: frozen with exactly those weights
    teacher = Trainer(load_config("distill", f"runlocal,teacher={tmp_path / 'hf'}"),
                      str(tmp_path / "student")).init_state().frozen["teacher"]
    for x, y in zip(leaves(teacher), leaves(params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_tokenizer_larger_than_the_vocabulary_is_a_clear_error(tmp_path):
    c = load_config("lm", model__vocab_size=1024)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        Trainer(c, str(tmp_path)).train()


def run_cli(config, workdir, *overrides):
    """`python -m jaxtrain.main` on 1 CPU device (as a laptop runs it: the 8-device sharding of
    these configs is test_sharded_on_8_devices_equals_1_device's; 1 device compiles faster)."""
    one_device = f"--xla_force_host_platform_device_count=1 {os.environ['JAXTRAIN_XLA_FLAGS']}"
    return subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", f"--config={ROOT}/configs/{config}",
         f"--workdir={workdir}", "--config.train.progress_bar=False", *overrides],
        capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": one_device},
        cwd=ROOT,
    )


@pytest.mark.parametrize("config", ["lm.py:runlocal", "sft.py:runlocal", "moe.py:runlocal"])
def test_cli_runs_and_validation_loss_falls(config, tmp_path):
    # sft: 64-token rows, not 128 (GPT-2's vocabulary makes the logits most of a step's time;
    # 0.7x the CPU time of the run, and its validation loss falls all the same)
    overrides = ["--config.data.seq_len=64"] if config.startswith("sft") else []
    proc = run_cli(config, tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/val/loss" in r]
    assert len(evals) == 2 and evals[-1]["eval/val/loss"] < evals[0]["eval/val/loss"]
    assert evals[-1]["eval/val/perplexity"] == pytest.approx(np.exp(evals[-1]["eval/val/loss"]))
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["perf/tokens_per_second"] > 0 and train[-1]["train/tokens_seen"] > 0
    assert train[-1]["perf/tflops_per_device"] > 0
    if config.startswith("moe"):
        assert {f"train/moe/expert_load/{i}" for i in range(4)} <= set(train[-1])
        assert "train/moe/load_balance" in train[-1]
