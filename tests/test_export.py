"""`python -m jaxtrain.export` on a LoRA run: the merged weights in Hugging Face format and as a
params-only jaxtrain checkpoint equal the run's merged params; the adapters alone round-trip."""

import os
import subprocess
import sys

import jax
import numpy as np

from jaxtrain import Trainer
from jaxtrain.checkpoint import read_params, read_state
from jaxtrain.lora import load_adapters, merge
from tests.test_lm_task import ROOT, leaves, load_config


def test_export_merged_lora_run(tmp_path):
    run = str(tmp_path / "run")
    c = load_config("sft", "runlocal", train__steps=3, eval__every=0, lora__rank=4,
                    data__seq_len=64)
    result = Trainer(c, run, devices=jax.devices()[:1]).train()
    merged = merge(result.final_state.params, result.final_state.frozen["lora_base"], c.lora)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.export", f"--workdir={run}",
         f"--hf_out={out / 'hf'}", f"--params_out={out / 'params'}",
         f"--adapters_out={out / 'lora'}"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from jaxtrain.hf import load_hf

    hf_cfg, hf_params = load_hf(str(out / "hf"))
    assert hf_cfg.num_kv_heads == c.model.num_kv_heads
    for x, y in zip(leaves(hf_params), leaves(merged), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    config, params = read_params(str(out / "params"))
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
