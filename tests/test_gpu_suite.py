"""benchmarks/gpu_suite.py: the tiny mode runs every row without grain, datasets, tensorboardX
or pyarrow (as on the GPU image); its random batches have the pipelines' layout."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
MISSING_ON_GPU = ("grain", "datasets", "tensorboardX", "pyarrow")

# Runs the suite with the packages the GPU image lacks made unimportable.
BLOCKED_RUN = f"""
import importlib.abc, runpy, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU!r}:
            raise ImportError(f"{{name}} is not installed on the GPU image")
sys.meta_path.insert(0, Missing())
sys.argv = [{SUITE!r}] + sys.argv[1:]
runpy.run_path({SUITE!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_suite"]


@pytest.mark.slow
def test_tiny_suite_gives_every_row_without_the_packages_the_gpu_lacks(tmp_path, suite):
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--tiny", f"--out={tmp_path}"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == [r.name for r in suite.ROWS]
    for name, r in rows.items():
        assert "error" not in r, (name, r["error"])
        assert np.isfinite(r["value"]) and r["value"] > 0, (name, r)
        if suite.BY_NAME[name].kind == "train":
            assert np.isfinite(r["loss"]) and r["compile_s"] > 0 and r["tflops"] > 0, (name, r)
            assert r["mfu"] is not None  # against the measured ceiling row
    # printed as measured, one line per row, and the markdown table has them all
    printed = [line.split(" | ")[0] for line in proc.stdout.splitlines() if " | " in line]
    assert printed == ["row"] + list(rows)
    md = (tmp_path / "gpu_suite.md").read_text()
    assert all(f"| {name} |" in md for name in rows)
    assert "7.25e+04 tokens/s" in md  # the peer figure shown beside the Llama rows


def _first_batch(config):
    from jaxtrain import build_task

    task, _ = build_task(config)
    it = task.train_iterator(seed=0, batch_size=config.train.batch_size, process_index=0,
                             process_count=1)
    return next(it)


def _layout(batch):
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def test_random_batches_have_the_pipelines_layout(suite):
    import jax

    from jaxtrain import mesh as mesh_lib

    lm = suite.llama_config(tiny=True)
    assert _layout(suite.lm_batch(lm, 8, packed=False)) == _layout(_first_batch(lm))
    packed_cfg = suite.llama_config(tiny=True, packed=True)
    packed_cfg.model.vocab_size = 50304  # the real rows are GPT-2 tokens of the built-in text
    real, fake = _first_batch(packed_cfg), suite.lm_batch(packed_cfg, 8, packed=True)
    assert _layout(fake) == _layout(real)
    assert fake["segment_ids"].max() > 1  # (the plays are longer than a tiny row)
    # positions restart at every new segment, as the pipeline's do
    for b in (real, fake):
        starts = np.diff(b["segment_ids"], axis=1) != 0
        assert (b["positions"][:, 1:][starts] == 0).all()
    clip = suite.clip_config(tiny=True)
    mesh = mesh_lib.make_mesh({"data": -1})
    fake = jax.device_get(suite.clip_batch(clip, clip.train.batch_size, mesh))
    assert _layout(fake) == _layout(_first_batch(clip))


def test_a_failing_row_is_an_entry_not_a_crash(suite, monkeypatch):
    from jaxtrain import ConfigError

    def bad(tiny):
        raise ConfigError("model.attention_impl='cudnn' needs a GPU")

    row = suite.Row("bad", "a row that fails", "train", bad, "lm")
    monkeypatch.setitem(suite.BY_NAME, "bad", row)
    r = suite.measure("bad", tiny=True, steps=1, peak=1.0)
    assert r["error"] == "ConfigError: model.attention_impl='cudnn' needs a GPU"
    cells = suite.table_cells(row, r)
    assert cells[2] == "error" and "needs a GPU" in cells[-1]


def test_a_row_in_its_own_process(suite):
    import argparse

    args = argparse.Namespace(steps=1, tiny=True)
    r = suite.run_child("ceiling", args, 0.0, timeout=300)
    assert r["value"] > 0 and r["unit"] == "TFLOP/s", r
    assert "timed out" in suite.run_child("ceiling", args, 0.0, timeout=0.01)["error"]
