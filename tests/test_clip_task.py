"""The contrastive task end to end: gradient cache, shard_map loss, retrieval modes, unified
encoder, SigLIP, zero-shot eval, embedding distillation and Hugging Face CLIP weights."""

import json
import os

import jax
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain.evaluators.zero_shot import zero_shot_metrics
from jaxtrain.mesh import shard_batch
from jaxtrain.weights import read_run

from .test_lm_task import leaves, load_config


def _batches(trainer, n=1, batch_size=32):
    it = trainer.task.train_iterator(seed=0, batch_size=batch_size, process_index=0,
                                     process_count=1)
    return [next(it) for _ in range(n)]


def _step(trainer, batch):
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, shard_batch(batch, trainer.mesh))
    return jax.device_get(state), jax.device_get(metrics)


def _assert_same_step(a, b, rtol=2e-5):
    (sa, ma), (sb, mb) = a, b
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=rtol)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
    for x, y in zip(leaves(sa.params), leaves(sb.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_gradient_cache_on_8_devices_equals_plain_step_on_1():
    cached = load_config("clip", "runlocal,gradcache=8", train__batch_size=32)
    cached.mesh.update(data=4, fsdp=2)
    plain = load_config("clip", "runlocal", train__batch_size=32)
    t_plain = Trainer(plain, devices=jax.devices()[:1])
    batch = _batches(t_plain)[0]
    _assert_same_step(_step(Trainer(cached), batch), _step(t_plain, batch))


def test_gradient_cache_with_accumulation_defaults_to_the_microbatch():
    """use_gradient_cache + accum_steps=2 with no chunk size: one chunk per microbatch (it
    used to default to the whole batch and fail while tracing), equal to the plain step; a
    chunk that does not divide the microbatch is a config error naming both."""
    cached = load_config("clip", "runlocal", train__batch_size=32, train__accum_steps=2,
                         train__use_gradient_cache=True)
    plain = load_config("clip", "runlocal", train__batch_size=32, train__accum_steps=2)
    t_plain = Trainer(plain, devices=jax.devices()[:1])
    batch = _batches(t_plain)[0]
    _assert_same_step(_step(Trainer(cached, devices=jax.devices()[:2]), batch),
                      _step(t_plain, batch))
    cached.train.gradient_cache_chunk_size = 12
    with pytest.raises(ConfigError, match=r"gradient_cache_chunk_size \(12\) must divide the "
                       r"microbatch.* = 16"):
        Trainer(cached)


def test_siglip_t2t_negatives_unified_local_loss_cache_equal_the_plain_step():
    """Every switch at once on 8 devices (unified encoder, shard_map SigLIP loss with hard
    negatives, gradient cache) against the plain global loss with separate passes on 1."""
    arg = "runlocal,siglip,mode=t2t,negatives=2"
    fancy = load_config("clip", arg + ",unified,local,gradcache=16", train__batch_size=32)
    fancy.mesh.update(data=2, fsdp=2, tensor=2)
    t_plain = Trainer(load_config("clip", arg, train__batch_size=32), devices=jax.devices()[:1])
    batch = _batches(t_plain)[0]
    assert batch["negatives"].shape == (32, 2, batch["query"].shape[1])
    a, b = _step(Trainer(fancy), batch), _step(t_plain, batch)
    _assert_same_step(a, b)
    assert set(a[1]) >= {"bias", "q2k_acc"}
    np.testing.assert_allclose(a[0].params["logit_bias"], -10.0, atol=0.01)  # SigLIP's init


@pytest.mark.parametrize("mode,kind", [("i2i", "image"), ("t2t", "text")])
def test_modes_train_and_evaluate(mode, kind, tmp_path):
    c = load_config("clip", f"runlocal,mode={mode},negatives=1", train__steps=2,
                    optim__warmup_steps=0, eval__every=2, checkpoint__every=2)
    trainer = Trainer(c, str(tmp_path), devices=jax.devices()[:1])  # the modes, not the mesh
    batch = _batches(trainer, batch_size=4)[0]
    assert batch["negatives"].shape[:2] == (4, 1)
    assert (batch["positive"].ndim == 4) == (kind == "image")
    result = trainer.train()
    record = result.metrics[-1]
    names = {"t2i": ("t2i", "i2t")}.get(mode, ("q2p", "p2q"))
    for k in (1, 5, 10):
        for direction in names:
            assert 0.0 <= record[f"eval/retrieval/{direction}/recall@{k}"] <= 1.0
    assert record[f"eval/retrieval/{names[0]}/mean_rank"] >= 1.0
    assert "eval/zero_shot/accuracy" in record


def test_unified_encoder_needs_one_modality():
    with pytest.raises(ConfigError, match="unified_encoder needs queries and positives"):
        Trainer(load_config("clip", "runlocal,unified"))


def test_zero_shot_metrics_against_numpy():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    prompts = unit(rng.normal(size=(7, 3, 5)))
    images = unit(rng.normal(size=(40, 5)))
    labels = rng.integers(0, 7, 40)
    classes = unit(prompts.mean(axis=1))
    scores = images @ classes.T
    want = np.mean(scores.argmax(1) == labels)
    top5 = np.mean([labels[i] in np.argsort(-scores[i])[:5] for i in range(40)])
    got = zero_shot_metrics(images, labels, prompts)
    assert got["accuracy"] == pytest.approx(want)
    assert got["top5_accuracy"] == pytest.approx(top5)
    assert got["chance"] == pytest.approx(1 / 7)
    # a class's own mean prompt embedding is its best match
    perfect = zero_shot_metrics(classes, np.arange(7), prompts)
    assert perfect["accuracy"] == 1.0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny CLIP run (what configs/clip.py writes, at runlocal size)."""
    workdir = str(tmp_path_factory.mktemp("clip_teacher"))
    c = load_config("clip", "runlocal", train__steps=20, eval__every=20, checkpoint__every=20)
    Trainer(c, workdir, devices=jax.devices()[:1]).train()  # only its weights matter
    return workdir


def test_distillation_from_a_clip_run(teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(teacher))  # a relative teacher path, as runs/clip is
    c = load_config("distill", f"clip,runlocal,teacher={os.path.basename(teacher)}",
                    train__steps=6,
                    optim__warmup_steps=2, eval__every=6, checkpoint__every=6, train__batch_size=32)
    trainer = Trainer(c, str(tmp_path), devices=jax.devices()[:1])
    assert trainer.task.teacher_config.vision_width == 32
    result = trainer.train()
    state = result.final_state
    _, teacher_params = read_run(teacher)
    for x, y in zip(leaves(state.frozen["teacher"]), leaves(teacher_params), strict=True):
        np.testing.assert_array_equal(x, y)  # frozen: bit-identical after training
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in logged if "train/distill/distill_kl" in r]
    assert train and all(np.isfinite(r["train/distill/distill_kl"]) for r in train)
    assert "train/contrastive_loss" in train[0]


def test_distillation_alpha_0_is_the_plain_loss_and_self_distillation_is_0(teacher):
    one = jax.devices()[:1]
    plain = Trainer(load_config("clip", "runlocal", train__batch_size=32), devices=one)
    batch = _batches(plain)[0]
    a0 = load_config("clip", "runlocal", train__batch_size=32)
    a0.distill.teacher, a0.distill.alpha = teacher, 0.0
    _, m_a0 = _step(Trainer(a0, devices=jax.devices()[:1]), batch)
    _, m_plain = _step(plain, batch)
    np.testing.assert_allclose(m_a0["loss"], m_plain["loss"], rtol=1e-6)
    # The student starting from the teacher's own weights: the distributions agree exactly.
    same = load_config("clip", "runlocal", train__batch_size=32)
    same.distill.teacher, same.init_from = teacher, teacher
    _, m_same = _step(Trainer(same, devices=jax.devices()[:1]), batch)
    assert abs(float(m_same["distill/distill_kl"])) < 1e-6
    assert float(m_same["distill/distill_top1_agreement"]) == 1.0


def test_distillation_errors(teacher, tmp_path):
    c = load_config("clip", "runlocal")
    c.distill.teacher = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="does not exist: give a jaxtrain CLIP workdir"):
        Trainer(c)
    c = load_config("clip", "runlocal", model__image_size=32)
    c.distill.teacher = teacher
    with pytest.raises(ConfigError, match="cannot score this student's inputs: image size 16"):
        Trainer(c)


def test_init_from_hugging_face_clip_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from jaxtrain.data.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2")  # any tokenizer: the shapes captions are re-tokenized with it
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         eos_token_id=tok.eos_token_id, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8,
                           hidden_act="quick_gelu"),
        projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16,
                                    image_mean=[0.5, 0.5, 0.5],
                                    image_std=[0.25, 0.25, 0.25]).save_pretrained(tmp_path)

    c = load_config("clip", f"runlocal,hf={tmp_path}", train__steps=2, eval__every=2,
                    optim__warmup_steps=0)
    trainer = Trainer(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    task = trainer.task
    assert (task.model_config.embed_dim, task.model_config.vocab_size) == (24, len(tok))
    assert task.data_config.tokenizer == str(tmp_path)
    assert tuple(task.data_config.image_mean) == (0.5, 0.5, 0.5)
    state = trainer.init_state()
    batch = next(iter(task.heldout_batches(batch_size=4, process_index=0, process_count=1)))
    out = jax.device_get(jax.jit(task.pair_outputs)(state.params, shard_batch(
        {k: batch[k] for k in ("query", "positive")}, trainer.mesh)))
    with torch.no_grad():
        pixels = torch.from_numpy(np.transpose(batch["query"], (0, 3, 1, 2)).copy())
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=torch.from_numpy(batch["positive"]).long())
    img = getattr(img, "pooler_output", img).numpy()
    txt = getattr(txt, "pooler_output", txt).numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(out["query"], unit(img), atol=2e-5)
    np.testing.assert_allclose(out["positive"], unit(txt), atol=2e-5)
    assert trainer.train().metrics[-1]["eval/retrieval/mean_recall@1"] >= 0.0
