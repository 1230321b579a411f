"""`jaxtrain.export`: the verified bundle (safetensors, StableHLO + a standalone runner, Hugging
Face) of LM, LoRA and CLIP runs, its error messages, the runner module itself
(`jaxtrain.export.runner`, imported), and the older --hf_out / --params_out / --adapters_out
exports of a LoRA run (through the CLI, with the bundle, once)."""

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from absl import app

from jaxtrain import Trainer
from jaxtrain.checkpoint import read_state
from jaxtrain.export import (
    ExportError,
    ExportVerificationError,
    cli,
    export_bundle,
    export_params,
    flatten_params,
    load_exported,
    load_safetensors,
    parse_formats,
)
from jaxtrain.lora import LoraTask, load_adapters, merge
from jaxtrain.tasks import get_task
from jaxtrain.weights import read_run
from tests.test_lm_task import ROOT, leaves, load_config

# a tiny LM on random tokens (no tokenizer): vocab 512, 2 layers of width 32
LM = dict(train__steps=2, optim__warmup_steps=1, eval__every=0, data__kind="synthetic",
          model__vocab_size=512, data__train_examples=64, data__eval_examples=8)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("lm") / "run")
    Trainer(load_config("lm", **LM), run, devices=jax.devices()[:1]).train()
    return run


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A tiny CLIP checkpoint (init params, written as read_run reads a run's), pooling text
    at the highest id so that Hugging Face's CLIPModel can express it."""
    c = load_config("clip", "runlocal", model__text_pooling="argmax")
    task = get_task("clip")(c)
    params = jax.device_get(nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(2))))
    run = str(tmp_path_factory.mktemp("clip") / "run")
    export_params(run, params, c.to_dict())
    return run


@pytest.fixture(scope="module")
def lm_bundle(lm_run, tmp_path_factory):
    """The LM run's StableHLO bundle for batch 3 (its default length 32), lowered for cpu and
    cuda (a multi-platform module)."""
    out = tmp_path_factory.mktemp("lm_bundle") / "bundle"
    export_bundle(lm_run, str(out), ["stablehlo"], batch_size=3, platforms=["cpu", "cuda"])
    return out


def in_memory(run, inputs):
    """The run's task.inference on its checkpoint's params (the reference)."""
    config, params = read_run(run)
    task = get_task(config["task"])(ml_collections.ConfigDict(config))
    return jax.device_get(jax.jit(task.inference)(params, {}, inputs))


def assert_outputs_close(got, want, rtol=1e-5, atol=1e-5):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def test_lm_bundle_every_format(lm_run, tmp_path):
    out = tmp_path / "bundle"
    manifest = export_bundle(lm_run, str(out), "safetensors,stablehlo,hf", batch_size=2,
                             seq_len=8)
    names = {"config.json", "params.safetensors", "model.stablehlo", "bundle.json",
             "run_exported.py", "example_inputs.npz", "example_outputs.npz", "export.json", "hf"}
    assert set(os.listdir(out)) == names
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".bundle")]  # no temp left
    assert manifest == json.loads((out / "export.json").read_text())
    assert manifest["step"] == 2 and manifest["task"] == "lm" and not manifest["lora_merged"]
    assert manifest["checks"]["stablehlo"]["checked"] == "outputs"

    # (a) safetensors: the checkpoint's params, every array equal; config.json: the run's config
    config, params = read_run(lm_run)
    assert json.loads((out / "config.json").read_text()) == config
    got, want = flatten_params(load_safetensors(str(out / "params.safetensors"))), \
        flatten_params(params)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # (b) stablehlo: bundle.json describes the call; the call equals task.inference
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["inputs"] == {"tokens": {"shape": [2, 8], "dtype": "int32", "range": [0, 512]}}
    assert bundle["outputs"] == {"logits": {"shape": [2, 8, 512], "dtype": "float32"}}
    assert bundle["param_keys"] == sorted(want) and bundle["platforms"] == ["cpu"]
    assert bundle["jax_version"] == jax.__version__
    fn, _ = load_exported(str(out))
    tokens = np.random.default_rng(1).integers(0, 512, (2, 8)).astype(np.int32)
    assert_outputs_close(fn({"tokens": tokens}), in_memory(lm_run, {"tokens": tokens}))
    # the params are an argument, not constants: other params, other logits; the module is small
    exported = jax.export.deserialize(bytearray((out / "model.stablehlo").read_bytes()))
    assert len(exported.in_avals) == len(want) + 1
    halved = {k: v * 0.5 for k, v in want.items()}
    assert not np.allclose(exported.call(halved, {"tokens": tokens})["logits"],
                           fn({"tokens": tokens})["logits"])
    assert (out / "model.stablehlo").stat().st_size < (out / "params.safetensors").stat().st_size

    # (c) hf: transformers' logits were compared (torch is installed); our loader agrees too
    from jaxtrain.hf import load_hf

    assert manifest["checks"]["hf"]["checked"].startswith("outputs (transformers")
    assert manifest["checks"]["hf"]["max_abs_diff"] < 1e-4
    hf_cfg, hf_params = load_hf(str(out / "hf"))
    assert hf_cfg.vocab_size == 512
    for k, v in flatten_params(hf_params).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_standalone_runner_without_jaxtrain(lm_run, lm_bundle, tmp_path):
    """run_exported.py in a copy of the bundle, in an isolated interpreter where `import
    jaxtrain` fails: the example check passes and --inputs/--outputs equal task.inference.
    Lowered for cpu and cuda (a multi-platform module), run here on cpu."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(lm_bundle, copy)
    assert json.loads((copy / "bundle.json").read_text())["platforms"] == ["cpu", "cuda"]
    assert "jaxtrain" not in (copy / "run_exported.py").read_text().split('"""')[2]
    tokens = np.random.default_rng(2).integers(0, 512, (3, 32)).astype(np.int32)
    np.savez(copy / "in.npz", tokens=tokens)
    guard = ("import runpy, sys; sys.modules['jaxtrain'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in ([], ["--inputs=in.npz", "--outputs=out.npz"]):
        proc = subprocess.run([sys.executable, "-I", "-c", guard, "run_exported.py", *args],
                              capture_output=True, text=True, timeout=120, cwd=copy, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        assert "logits: shape [3, 32, 512] float32" in proc.stdout
        if not args:  # the check run: compared with the exporter's outputs
            assert "logits: max |diff| vs the exporter's outputs" in proc.stdout
            assert ": ok" in proc.stdout and "MISMATCH" not in proc.stdout
    got = dict(np.load(copy / "out.npz"))
    assert_outputs_close(got, in_memory(lm_run, {"tokens": tokens}))


def test_runner_module(lm_run, lm_bundle, tmp_path, capsys):
    """`jaxtrain.export.runner`, imported: the bundle's run_exported.py is its source and
    imports only jax, numpy, safetensors and the standard library; load_bundle's function
    equals task.inference and checks its inputs and the platform; check_outputs and main's exit
    code catch outputs that differ from the exporter's."""
    from jaxtrain.export import runner

    text = (lm_bundle / "run_exported.py").read_text()
    assert text == inspect.getsource(runner)
    assert "jaxtrain" not in text.split('"""', 2)[2]  # anywhere after the module docstring
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(text))
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "collections", "json", "os", "sys", "typing",
                        "jax", "numpy", "safetensors"}, imported

    fn, bundle = runner.load_bundle(str(lm_bundle))
    assert bundle["inputs"]["tokens"]["shape"] == [3, 32]
    tokens = np.random.default_rng(6).integers(0, 512, (3, 32))  # int64: cast to int32
    assert_outputs_close(fn({"tokens": tokens}),
                         in_memory(lm_run, {"tokens": tokens.astype(np.int32)}))
    with pytest.raises(ValueError, match=r"input 'tokens' has shape \[2, 32\]; the model was "
                                         r"exported for \[3, 32\] \(pad the batch\)"):
        fn({"tokens": tokens[:2]})
    with pytest.raises(ValueError, match=r"inputs \['ids'\]; this model takes \['tokens'\]"):
        fn({"ids": tokens})

    # main on the example inputs: the check passes; against shifted outputs it fails (exit 1)
    # unless the tolerance allows the shift
    assert runner.main([f"--bundle={lm_bundle}"]) == 0
    printed = capsys.readouterr().out
    assert "logits: shape [3, 32, 512] float32" in printed and "MISMATCH" not in printed
    copy = tmp_path / "shifted"
    shutil.copytree(lm_bundle, copy)
    want = dict(np.load(copy / "example_outputs.npz"))
    want["logits"] = want["logits"] + 1.0
    np.savez(copy / "example_outputs.npz", **want)
    outputs = fn(dict(np.load(copy / "example_inputs.npz")))
    diff, good = runner.check_outputs(outputs, want, rtol=1e-5, atol=1e-5)["logits"]
    assert not good and diff == pytest.approx(1.0, abs=1e-4)
    assert runner.main([f"--bundle={copy}"]) == 1
    assert "logits: max |diff| vs the exporter's outputs 1: MISMATCH" in capsys.readouterr().out
    assert runner.main([f"--bundle={copy}", "--atol=2"]) == 0
    assert runner.main([f"--bundle={copy}", f"--inputs={copy / 'example_inputs.npz'}",
                        f"--outputs={tmp_path / 'out.npz'}"]) == 0  # given inputs: no check
    assert_outputs_close(dict(np.load(tmp_path / "out.npz")), outputs, rtol=0, atol=0)

    spec = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**spec, "platforms": ["tpu"]}))
    with pytest.raises(RuntimeError, match=r"exported for \['tpu'\]; jax here runs on '\w+': "
                                           r"export again with --platforms including"):
        runner.load_bundle(str(copy))


def test_dpo_bundle_is_the_policy(tmp_path):
    """A DPO run exports its policy (the reference is not part of inference); the sequence
    length defaults to data.max_length. Params written the way the trainer's are read."""
    c = load_config("dpo", "runlocal", init_from="", model__vocab_size=512, data__max_length=16,
                    data__max_prompt_length=8)
    task = get_task("dpo")(c)
    params = jax.device_get(nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(1))))
    export_params(str(tmp_path / "run"), params, c.to_dict())
    export_bundle(str(tmp_path / "run"), str(tmp_path / "out"), "stablehlo", batch_size=1)
    fn, bundle = load_exported(str(tmp_path / "out"))
    assert bundle["inputs"]["tokens"]["shape"] == [1, c.data.max_length]
    tokens = np.random.default_rng(5).integers(0, 512, (1, c.data.max_length)).astype(np.int32)
    want = jax.jit(task.inference)(params, {}, {"tokens": tokens})
    assert_outputs_close(fn({"tokens": tokens}), jax.device_get(want))


def test_clip_bundle(clip_run, tmp_path):
    out = tmp_path / "clip"
    manifest = export_bundle(clip_run, str(out), "safetensors,stablehlo", batch_size=4)
    assert manifest["checks"]["stablehlo"]["max_abs_diff"] < 1e-5
    config, _ = read_run(clip_run)
    m = config["model"]
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["inputs"]["image"] == {
        "shape": [4, m["image_size"], m["image_size"], m["channels"]], "dtype": "float32"}
    assert bundle["inputs"]["text"]["shape"] == [4, m["text_max_len"]]
    assert bundle["outputs"] == {k: {"shape": [4, m["embed_dim"]], "dtype": "float32"}
                                 for k in ("image_embeds", "text_embeds")}
    rng = np.random.default_rng(3)
    inputs = {"image": rng.standard_normal((4, m["image_size"], m["image_size"],
                                            m["channels"])).astype(np.float32),
              "text": np.zeros((4, m["text_max_len"]), np.int32)}
    inputs["text"][:, :5] = [1, 5, 6, 7, 2]  # bos, words, eos, padding
    fn, _ = load_exported(str(out))
    assert_outputs_close(fn(inputs), in_memory(clip_run, inputs))
    with pytest.raises(ExportError, match="--seq_len: the 'clip' task's inputs have no "
                                          "sequence length"):
        export_bundle(clip_run, str(tmp_path / "x"), "stablehlo", seq_len=8)


def test_clip_hf(clip_run, tmp_path):
    """The CLIP family writes the HF directory (transformers' embeddings compared) with the
    run's image preprocessing; --hf_out does the same for a run saved before model.name
    existed (its task's default family, clip)."""
    pytest.importorskip("jaxtrain.hf.clip")
    manifest = export_bundle(clip_run, str(tmp_path / "clip"), "hf")
    check = manifest["checks"]["hf"]
    assert check["max_abs_diff"] < 1e-4, check
    assert check["checked"].startswith("outputs (transformers") and "hf_model_type" not in manifest
    from jaxtrain.hf.clip import image_preprocessing_from_hf, load_hf

    config, want_params = read_run(clip_run)
    want = flatten_params(want_params)
    unnamed = str(tmp_path / "unnamed_run")
    export_params(unnamed, want_params, {**config, "model": {
        k: v for k, v in config["model"].items() if k != "name"}})
    cli(unnamed, hf_out=str(tmp_path / "hf_out"))
    for hf_dir in (tmp_path / "clip" / "hf", tmp_path / "hf_out"):
        prep = image_preprocessing_from_hf(str(hf_dir))  # the run's, written along
        assert prep["image_crop"] == config["model"]["image_size"]
        np.testing.assert_allclose(prep["image_mean"], [0.48145466, 0.4578275, 0.40821073])
        _, params = load_hf(str(hf_dir))
        for k, v in flatten_params(params).items():
            np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_errors(lm_run, tmp_path):
    with pytest.raises(ExportError, match=r"Unknown export format 'onnx': valid formats are "
                                          r"safetensors, stablehlo, hf"):
        parse_formats("safetensors,onnx")
    with pytest.raises(FileNotFoundError, match="No jaxtrain checkpoint under"):
        export_bundle(str(tmp_path / "nothing"), str(tmp_path / "a"), "safetensors")
    with pytest.raises(ExportError, match="No output directory: give --out"):
        export_bundle(lm_run, "", "safetensors")
    with pytest.raises(app.UsageError, match="--format needs --out"):
        cli(lm_run, formats="safetensors")
    with pytest.raises(ExportError, match="--platforms: unknown platform"):
        export_bundle(lm_run, str(tmp_path / "a"), "stablehlo", platforms=["gpu"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty.*--overwrite"):
        export_bundle(lm_run, str(taken), "safetensors")
    with pytest.raises(SystemExit, match="jaxtrain.export: .*exists and is not empty"):
        cli(lm_run, formats="safetensors", out=str(taken))
    export_bundle(lm_run, str(taken), "safetensors", overwrite=True)
    assert sorted(os.listdir(taken)) == ["config.json", "export.json", "params.safetensors"]

    # a task with neither a Hugging Face format nor an inference function
    from tests.toy_task import RegressionTask

    toy = RegressionTask.default_config()
    params = nn.unbox(jax.jit(RegressionTask(toy).init_params)(jax.random.PRNGKey(0)))
    export_params(str(tmp_path / "toy"), jax.device_get(params), toy.to_dict())
    with pytest.raises(ExportError, match="format 'hf': the 'toy_regression' task has no "
                                          "Hugging Face format.*tasks with one: clip, dpo, lm"):
        export_bundle(str(tmp_path / "toy"), str(tmp_path / "b"), "safetensors,hf")
    with pytest.raises(ExportError, match="format 'stablehlo': the 'toy_regression' task has "
                                          "no inference function"):
        export_bundle(str(tmp_path / "toy"), str(tmp_path / "b"), "stablehlo")
    export_bundle(str(tmp_path / "toy"), str(tmp_path / "b"), "safetensors")  # that works
    assert not os.path.exists(tmp_path / "a")


def test_failed_check_leaves_nothing(lm_run, tmp_path, monkeypatch):
    import safetensors.numpy

    real = safetensors.numpy.load_file
    calls = []

    def corrupt_after(n):
        def load(path):
            calls.append(path)
            flat = real(path)
            if len(calls) > n:
                flat["norm/scale"] = flat["norm/scale"] + 0.5
            return flat
        return load

    for n, fmt in ((0, "safetensors: params.safetensors differs .* max \\|diff\\| 0.5 at "
                       "'norm/scale'"),
                   (1, "stablehlo: model.stablehlo called with params.safetensors: output "
                       "'logits' differs from the in-memory model by max \\|diff\\|")):
        calls.clear()
        monkeypatch.setattr(safetensors.numpy, "load_file", corrupt_after(n))
        with pytest.raises(ExportVerificationError, match=fmt):
            export_bundle(lm_run, str(tmp_path / "out"), "safetensors,stablehlo", batch_size=1,
                          seq_len=4)
        assert os.listdir(tmp_path) == []  # neither the bundle nor its temporary directory


def test_export_merged_lora_run(tmp_path):
    """The CLI end to end on a LoRA run: the bundle equals the merged weights (its StableHLO
    equals the LoRA task's own inference), and so do --hf_out / --params_out; the adapters
    alone round-trip."""
    run = str(tmp_path / "run")
    c = load_config("sft", "runlocal", train__steps=3, eval__every=0, lora__rank=4,
                    data__seq_len=64)
    result = Trainer(c, run, devices=jax.devices()[:1]).train()
    state = result.final_state
    merged = merge(state.params, state.frozen["lora_base"], c.lora)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.export", f"--workdir={run}",
         f"--hf_out={out / 'hf'}", f"--params_out={out / 'params'}",
         f"--adapters_out={out / 'lora'}", "--format=safetensors,stablehlo,hf",
         f"--out={out / 'bundle'}", "--batch_size=2", "--seq_len=16"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    bundle = out / "bundle"
    manifest = json.loads((bundle / "export.json").read_text())
    assert manifest["lora_merged"] and manifest["formats"] == ["safetensors", "stablehlo", "hf"]
    for x, y in zip(leaves(load_safetensors(str(bundle / "params.safetensors"))), leaves(merged),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    fn, spec = load_exported(str(bundle))
    assert spec["inputs"]["tokens"]["shape"] == [2, 16]
    tokens = np.random.default_rng(4).integers(0, c.model.vocab_size, (2, 16)).astype(np.int32)
    lora_task = LoraTask(get_task("lm")(c))
    want = jax.jit(lora_task.inference)(state.params, state.frozen, {"tokens": tokens})
    assert_outputs_close(fn({"tokens": tokens}), jax.device_get(want), rtol=1e-5, atol=1e-5)

    from jaxtrain.hf import load_hf

    for hf_dir in (out / "hf", bundle / "hf"):
        hf_cfg, hf_params = load_hf(str(hf_dir))
        assert hf_cfg.num_kv_heads == c.model.num_kv_heads
        for x, y in zip(leaves(hf_params), leaves(merged), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    config, params = read_run(str(out / "params"))
    assert config["lora"]["rank"] == 0 and config["task"] == "lm"
    for x, y in zip(leaves(params), leaves(merged), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    lora_cfg, adapters = load_adapters(str(out / "lora"))
    assert lora_cfg.rank == 4
    for x, y in zip(leaves(adapters), leaves(read_state(run)[1]["params"]), strict=True):
        np.testing.assert_array_equal(x, y)
    # and the exported params start a new run: init_from accepts the directory
    again = Trainer(load_config("sft", "runlocal", init_from=str(out / "params")),
                    str(tmp_path / "again"), devices=jax.devices()[:1]).init_state()
    for x, y in zip(leaves(again.params), leaves(merged), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
