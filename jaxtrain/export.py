"""Export a run: a verified bundle (safetensors, StableHLO, Hugging Face), merged weights as a
params-only jaxtrain checkpoint, and LoRA adapters alone.

    python -m jaxtrain.export --workdir=runs/lm --format=safetensors,stablehlo,hf \\
        --out=exports/lm [--batch_size=8] [--seq_len=128] [--platforms=cpu,cuda] [--overwrite]
    python -m jaxtrain.export --workdir=runs/dpo --hf_out=exports/dpo_hf [--model_type=qwen2]
    python -m jaxtrain.export --workdir=runs/dpo --params_out=exports/dpo_merged
    python -m jaxtrain.export --workdir=runs/dpo --adapters_out=exports/dpo_lora   # LoRA runs

A LoRA run's adapters are merged into its base weights (W + alpha/r · A B) for every format but
`--adapters_out`. `--params_out` writes `<dir>/checkpoints/<step>/{state,meta}` with the merged
params and the run's config (LoRA off), so `init_from` and `distill.teacher` accept it.

The bundle (`--out`, see :func:`export_bundle`)::

    config.json           the run's full config (every format)
    params.safetensors    safetensors, stablehlo: the params flattened by '/'-joined path,
                          in their checkpoint dtype (float32; a LoRA run merged, in float32)
    model.stablehlo       stablehlo: `jax.export` of the task's `inference(params, inputs)` for
                          a fixed batch (and sequence) shape; the params are an argument
    bundle.json           stablehlo: input/output names, shapes and dtypes, the params' key
                          order, platforms, jax version, how to call it
    run_exported.py       stablehlo: a runner needing only jax, numpy and safetensors
    example_inputs.npz    stablehlo: the verification inputs; example_outputs.npz: the
                          in-memory outputs for them (<= 4096 sampled values per output)
    hf/                   hf: a `transformers` directory (config.json + model.safetensors)
    export.json           what was exported from which checkpoint, and each format's check

Every format is verified after writing (reloaded and compared with the in-memory model); the
bundle is written to a temporary directory next to `--out` and moved into place only when all
checks pass, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from jaxtrain.tree import nest, path_str

FORMATS = ("safetensors", "stablehlo", "hf")
HF_TASKS = ("lm", "dpo", "clip")  # tasks with a Hugging Face format
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's platform names
EXAMPLE_SAMPLES = 4096  # values per output kept in example_outputs.npz
BUNDLE_FORMAT = "jaxtrain.stablehlo/1"


class ExportError(ValueError):
    """The export cannot be done as asked (format, output directory, task)."""


class ExportVerificationError(RuntimeError):
    """A written export does not reproduce the model: nothing was moved into place."""


def export_params(path: str, params, config: dict, step: int = 0) -> str:
    """Merged params + config as `<path>/checkpoints/<step>/{state,meta}` (read_params reads it)."""
    step_dir = os.path.join(os.path.abspath(path), "checkpoints", str(step))
    if os.path.exists(step_dir):
        raise FileExistsError(f"{step_dir} exists: export to a new directory.")
    ocp.PyTreeCheckpointer().save(os.path.join(step_dir, "state"), {"params": params})
    config = {**config, "lora": {**config.get("lora", {}), "rank": 0}}
    os.makedirs(os.path.join(step_dir, "meta"), exist_ok=True)
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        json.dump({"step": step, "config": config}, f)
    return step_dir


# ------------------------------------------------------------------------------------ params


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """{'/'-joined path: host array} (boxed leaves unboxed), in jax's flattening order."""
    from flax.core import meta

    leaves = jax.tree_util.tree_flatten_with_path(meta.unbox(params))[0]
    return {path_str(p): np.asarray(jax.device_get(x), order="C") for p, x in leaves}


def save_safetensors(path: str, params: Any) -> dict[str, np.ndarray]:
    """`params` flattened by path into one safetensors file; returns the flat dict."""
    import ml_dtypes  # noqa: F401  (bfloat16 leaves)
    from safetensors.numpy import save_file

    flat = flatten_params(params)
    save_file(flat, path, metadata={"format": "jaxtrain", "layout": "'/'-joined param paths"})
    return flat


def load_safetensors(path: str) -> dict:
    """The nested params of a file written by :func:`save_safetensors`."""
    from safetensors.numpy import load_file

    return nest(load_file(path))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) if a.shape == b.shape else float("inf")


def _verify_flat(fmt: str, what: str, got: Mapping[str, np.ndarray],
                 want: Mapping[str, np.ndarray], atol: float = 0.0) -> float:
    """Every array of `want` in `got` with its shape (and within `atol`); the max difference."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ExportVerificationError(
            f"{fmt}: {what} has {len(missing)} missing and {len(extra)} extra arrays (missing "
            f"{missing[:3]}, extra {extra[:3]}).")
    diffs = {k: _max_diff(got[k], want[k]) for k in want}
    bad = {k: d for k, d in diffs.items() if not d <= atol
           or np.shape(got[k]) != np.shape(want[k])}
    if bad:
        k = max(bad, key=bad.get)
        raise ExportVerificationError(
            f"{fmt}: {what} differs from the checkpoint's params in {len(bad)} arrays; max |diff| "
            f"{bad[k]:.3g} at {k!r} (shapes {np.shape(got[k])} vs {np.shape(want[k])}, "
            f"tolerance {atol:g}).")
    return max(diffs.values(), default=0.0)


def _verify_outputs(fmt: str, what: str, got: Mapping[str, Any], want: Mapping[str, Any],
                    rtol: float, atol: float) -> float:
    """Outputs equal within |got - want| <= atol + rtol |want|; the max |diff|."""
    if set(got) != set(want):
        raise ExportVerificationError(f"{fmt}: {what} gives outputs {sorted(got)}, the model "
                                      f"{sorted(want)}.")
    worst = 0.0
    for name in want:
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        if g.shape != w.shape:
            raise ExportVerificationError(f"{fmt}: {what}: output {name!r} has shape {g.shape}, "
                                          f"the model's {w.shape}.")
        diff = _max_diff(g, w)
        worst = max(worst, diff)
        if not np.all(np.abs(g - w) <= atol + rtol * np.abs(w)):
            raise ExportVerificationError(
                f"{fmt}: {what}: output {name!r} differs from the in-memory model by max |diff| "
                f"{diff:.3g} (rtol {rtol:g}, atol {atol:g}).")
    return worst


# ------------------------------------------------------------------------------------ task


def default_platforms() -> tuple[str, ...]:
    """cpu, plus this machine's platform when it is another (cuda, rocm, tpu)."""
    here = jax.export.default_export_platform()
    return ("cpu",) if here == "cpu" else ("cpu", here)


def inference_task(config: Mapping[str, Any], platforms: Sequence[str] = ()):
    """The run's task, built from its saved config for inference: LoRA off (the params are
    merged), no distillation teacher; cuDNN attention becomes XLA's when exporting for
    another platform than cuda."""
    import ml_collections

    from jaxtrain.config import ConfigError
    from jaxtrain.tasks import get_task

    c = copy.deepcopy(dict(config))
    if not c.get("task"):
        raise ExportError("The checkpoint's config names no task (config['task']): is it a "
                          "jaxtrain run?")
    c["lora"] = {**c.get("lora", {}), "rank": 0}
    if isinstance(c.get("distill"), dict):
        c["distill"] = {**c["distill"], "teacher": ""}
    model = c.get("model")
    if isinstance(model, dict) and model.get("attention_impl") == "cudnn" and any(
            p != "cuda" for p in platforms):
        logging.info("Exporting for %s: cuDNN attention replaced by XLA's.", ",".join(platforms))
        c["model"] = {**model, "attention_impl": "xla"}
    try:
        return get_task(c["task"])(ml_collections.ConfigDict(c))
    except ConfigError as e:
        hint = (f" The run started from init_from={c['init_from']!r}, which gives the model its "
                "shape: it must still be readable." if c.get("init_from") else "")
        raise ExportError(f"Cannot build the run's {c['task']!r} task from its saved config: "
                          f"{e}{hint}") from None


def _check_params(task, params) -> None:
    """The checkpoint's params have the shapes of the model its config describes."""
    from flax.core import meta

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(meta.unbox(tree))[0]
        return {path_str(p): tuple(np.shape(x)) for p, x in leaves}

    want = shapes(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    got = shapes(params)
    if want != got:
        differ = [f"{k}: checkpoint {got[k]} vs model {want[k]}"
                  for k in sorted(set(want) & set(got)) if want[k] != got[k]][:3]
        raise ExportError(
            f"The checkpoint's params do not fit the {task.name!r} model its config describes "
            f"(only in the checkpoint: {sorted(set(got) - set(want))[:3]}, only in the model: "
            f"{sorted(set(want) - set(got))[:3]}, shapes: {differ}).")


def _input_specs(task, batch_size: int, seq_len: int | None) -> dict[str, jax.ShapeDtypeStruct]:
    from jaxtrain.tasks.base import Task

    if any(getattr(type(task), m, None) is getattr(Task, m)
           for m in ("inference_inputs", "inference")):
        raise ExportError(f"format 'stablehlo': the {task.name!r} task has no inference function "
                          "to export (it implements no inference_inputs / inference); use "
                          "--format=safetensors.")
    if seq_len is None:
        return dict(task.inference_inputs(batch_size))
    if "seq_len" not in inspect.signature(task.inference_inputs).parameters:
        raise ExportError(f"--seq_len: the {task.name!r} task's inputs have no sequence length "
                          "to set (their shapes come from the model config).")
    return dict(task.inference_inputs(batch_size, seq_len=seq_len))


def _int_range(task, dtype) -> tuple[int, int]:
    """[low, high) of valid integer inputs: token ids in [0, vocab_size)."""
    if np.dtype(dtype) == np.bool_:
        return 0, 2
    vocab = getattr(getattr(task, "model_config", None), "vocab_size", 2)
    return 0, max(int(vocab), 2)


def example_inputs(task, specs: Mapping[str, jax.ShapeDtypeStruct], seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Random inputs: floats ~ N(0, 1), integers uniform in :func:`_int_range` but 0 (CLIP's
    padding)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in specs.items():
        if np.issubdtype(s.dtype, np.floating):
            out[name] = rng.standard_normal(s.shape).astype(s.dtype)
        else:
            low, high = _int_range(task, s.dtype)
            out[name] = rng.integers(max(low, 1), high, s.shape).astype(s.dtype)
    return out


def _tolerance(task) -> tuple[float, float]:
    """(rtol, atol) of the exported vs the in-memory function: same program, same compiler."""
    dtype = getattr(getattr(task, "model_config", None), "dtype", "float32")
    return (1e-5, 1e-5) if dtype == "float32" else (2e-2, 2e-2)


# ------------------------------------------------------------------------------------ stablehlo


def export_stablehlo(out_dir: str, task, params: Any, *, batch_size: int = 8,
                     seq_len: int | None = None, platforms: Sequence[str] | None = None,
                     seed: int = 0) -> dict:
    """`jax.export` of ``task.inference(params, {}, inputs)`` into `out_dir`: model.stablehlo,
    bundle.json, run_exported.py and example_{inputs,outputs}.npz; then checked: deserialised,
    called with the params of `out_dir`/params.safetensors (write it first) on random inputs and
    compared with the in-memory function. Returns the check's summary."""
    from safetensors.numpy import load_file

    if importlib.util.find_spec("flatbuffers") is None:
        raise ExportError("format 'stablehlo' needs the 'flatbuffers' package for "
                          "jax.export serialisation: pip install flatbuffers.")
    if batch_size < 1:
        raise ExportError(f"--batch_size must be >= 1; got {batch_size}.")
    platforms = tuple(platforms or default_platforms())
    params_file = os.path.join(out_dir, "params.safetensors")
    if not os.path.isfile(params_file):
        raise FileNotFoundError(f"{params_file} is missing: the exported function takes the "
                                "params as an argument; write them first (save_safetensors).")
    flat = flatten_params(params)
    specs = _input_specs(task, batch_size, seq_len)
    param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}

    def fn(flat_params, inputs):
        return task.inference(nest(flat_params), {}, inputs)

    exported = jax.export.export(jax.jit(fn), platforms=platforms)(param_specs, specs)
    with open(os.path.join(out_dir, "model.stablehlo"), "wb") as f:
        f.write(exported.serialize())
    out_specs = jax.eval_shape(fn, param_specs, specs)

    inputs = example_inputs(task, specs, seed)
    want = jax.device_get(jax.jit(task.inference)(nest(flat), {}, inputs))
    np.savez(os.path.join(out_dir, "example_inputs.npz"), **inputs)
    samples = {}
    for name, value in want.items():
        n = int(np.prod(value.shape))
        index = np.unique(np.linspace(0, max(n - 1, 0), min(n, EXAMPLE_SAMPLES)).round()
                          ).astype(np.int64)
        samples[name] = np.asarray(value).reshape(-1)[index]
        samples[f"{name}.index"] = index
    np.savez(os.path.join(out_dir, "example_outputs.npz"), **samples)

    rtol, atol = _tolerance(task)
    keys = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(param_specs)[0]]
    bundle = {
        "format": BUNDLE_FORMAT,
        "task": task.name,
        "function": "model.stablehlo",
        "params": "params.safetensors",
        "param_keys": keys,
        "inputs": {k: {"shape": list(s.shape), "dtype": np.dtype(s.dtype).name,
                       **({"range": list(_int_range(task, s.dtype))}
                          if not np.issubdtype(s.dtype, np.floating) else {})}
                   for k, s in specs.items()},
        "outputs": {k: {"shape": list(s.shape), "dtype": np.dtype(s.dtype).name}
                    for k, s in out_specs.items()},
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "call": ("exported = jax.export.deserialize(bytearray(open('model.stablehlo', 'rb')"
                 ".read())); params = safetensors.numpy.load_file('params.safetensors'); "
                 "outputs = exported.call(params, inputs)  # params: the flat {path: array} "
                 "dict, inputs: {name: array} as in 'inputs'; outputs: {name: array}"),
        "examples": {"inputs": "example_inputs.npz", "outputs": "example_outputs.npz",
                     "outputs_layout": "<name>: values at flat indices <name>.index"},
        "tolerance": {"rtol": rtol, "atol": atol},
    }
    with open(os.path.join(out_dir, "bundle.json"), "w") as f:
        json.dump(bundle, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "run_exported.py"), "w") as f:
        f.write(RUNNER)

    # the check: what a user does, from the files
    with open(os.path.join(out_dir, "model.stablehlo"), "rb") as f:
        loaded = jax.export.deserialize(bytearray(f.read()))
    here = jax.export.default_export_platform()
    if here not in loaded.platforms:
        logging.warning("stablehlo: exported for %s, not this machine's %s: checked the "
                        "deserialised signature only, not the outputs.", loaded.platforms, here)
        if [tuple(a.shape) for a in loaded.in_avals] != [tuple(a.shape) for a in
                                                         exported.in_avals]:
            raise ExportVerificationError("stablehlo: model.stablehlo deserialises to another "
                                          "signature than was exported.")
        return {"checked": "signature", "platforms": list(loaded.platforms)}
    got = jax.device_get(loaded.call(load_file(params_file), inputs))
    diff = _verify_outputs("stablehlo", "model.stablehlo called with params.safetensors", got,
                           want, rtol, atol)
    return {"checked": "outputs", "max_abs_diff": diff, "rtol": rtol, "atol": atol,
            "platforms": list(loaded.platforms)}


def load_exported(path: str):
    """(fn(inputs) -> outputs, bundle.json) of a stablehlo bundle (what run_exported.py does)."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "bundle.json")) as f:
        bundle = json.load(f)
    with open(os.path.join(path, bundle["function"]), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    params = load_file(os.path.join(path, bundle["params"]))
    return (lambda inputs: jax.device_get(exported.call(params, inputs))), bundle


# ------------------------------------------------------------------------------------ hf


def _hf_module(task_name: str):
    if task_name in ("lm", "dpo"):
        from jaxtrain import hf

        return hf
    try:
        from jaxtrain.hf import clip
    except ModuleNotFoundError as e:
        if e.name != "jaxtrain.hf.clip":
            raise
        raise ExportError("format 'hf' for a CLIP run needs jaxtrain.hf.clip, which this "
                          "installation lacks; use --format=safetensors,stablehlo.") from None
    return clip


def _torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _hf_tol(ref: np.ndarray) -> float:
    return 1e-3 * (1.0 + float(np.max(np.abs(ref), initial=0.0)))


def export_hf(path: str, task, params: Any, model_type: str = "llama", seed: int = 0) -> dict:
    """A Hugging Face directory of an LM (``model_type``) or CLIP run, checked: loaded with
    ``transformers`` (torch) and its logits / embeddings compared with ours, or, without torch,
    reloaded with our ``load_hf`` and its params compared."""
    module = _hf_module(task.name)
    cfg = task.model_config
    try:
        if task.name == "clip":
            module.save_hf(path, params, cfg, **_clip_hf_extras(task))
        else:
            module.save_hf(path, params, cfg, model_type)
    except ValueError as e:  # a model the Hugging Face format cannot express
        raise ExportError(f"format 'hf': {e}") from None
    if not _torch_available():
        _, loaded = module.load_hf(path)
        diff = _verify_flat("hf", f"{path} reloaded with load_hf", flatten_params(loaded),
                            flatten_params(params), atol=1e-6)
        return {"checked": "params (load_hf; torch not installed)", "max_abs_diff": diff}
    rng = np.random.default_rng(seed)
    if task.name == "clip":
        ours, theirs = _clip_hf_outputs(path, cfg, params, rng)
    else:
        ours, theirs = _lm_hf_outputs(path, cfg, params, rng)
    worst = 0.0
    for name, ref in ours.items():
        worst = max(worst, _verify_outputs("hf", f"transformers' model in {path}",
                                           {name: theirs[name]}, {name: ref}, 1e-3,
                                           _hf_tol(ref)))
    return {"checked": "outputs (transformers, torch)", "max_abs_diff": worst}


def _clip_hf_extras(task) -> dict:
    """The run's image preprocessing (preprocessor_config.json) and its Hugging Face tokenizer,
    if it has one, to save beside a CLIP model."""
    d, size = task.data_config, task.model_config.image_size
    extras = {"image_preprocessing": {
        "image_resize": d.image_resize or size, "image_crop": d.image_crop or size,
        "image_mean": list(d.image_mean), "image_std": list(d.image_std),
        "image_interpolation": d.image_interpolation}}
    if task.tokenizer.hf is not None:
        extras["tokenizer"] = task.tokenizer.hf
    return extras


@contextlib.contextmanager
def _quiet(transformers):
    """No 'Loading weights' progress bar from transformers (restored after)."""
    hf_logging = transformers.utils.logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _lm_hf_outputs(path, cfg, params, rng) -> tuple[dict, dict]:
    import torch
    import transformers

    from jaxtrain.models.llama import Llama

    tokens = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    f32 = dataclasses.replace(cfg, dtype="float32", remat_policy="none", attention_impl=None)
    ours, _ = jax.jit(Llama(f32).apply)({"params": params}, tokens)
    with _quiet(transformers):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    return {"logits": np.asarray(ours)}, {"logits": theirs}


def _clip_hf_outputs(path, cfg, params, rng) -> tuple[dict, dict]:
    import torch
    import transformers

    from jaxtrain.models.clip import CLIP

    b, t = 2, cfg.text_max_len
    images = rng.standard_normal((b, cfg.image_size, cfg.image_size, cfg.channels))
    images = images.astype(np.float32)
    # caption-like rows: bos, words, the pooled token, padding. 'argmax' pools at the highest
    # id (the last vocabulary id here), 'eos' at eos_token_id (save_hf refuses other poolings)
    v = max(cfg.vocab_size, 4)
    end = v - 1 if cfg.text_pooling == "argmax" else cfg.eos_token_id
    tokens = np.zeros((b, t), np.int32)
    for i, n in enumerate((t, max(t // 2, 2))):
        words = rng.integers(1, v - 1, n - 2)
        words[words == end] = 1
        tokens[i, :n] = [1, *words, end]
    f32 = dataclasses.replace(cfg, dtype="float32", attention_impl=None)
    out = jax.jit(CLIP(f32).apply)({"params": params}, images, tokens)
    with _quiet(transformers):
        model = transformers.CLIPModel.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)))
        txt = model.get_text_features(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                                      attention_mask=torch.as_tensor(tokens != 0))
    img, txt = (getattr(x, "pooler_output", x).numpy() for x in (img, txt))
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return ({"image_embeds": np.asarray(out["image_embeds"]),
             "text_embeds": np.asarray(out["text_embeds"])},
            {"image_embeds": norm(img), "text_embeds": norm(txt)})


# ------------------------------------------------------------------------------------ bundle


def parse_formats(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'safetensors,stablehlo' (or a sequence) -> the formats, checked, without repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip().lower() for s in items if s and s.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        what = f"Unknown export format {unknown[0]!r}" if unknown else "No export format given"
        raise ExportError(f"{what}: valid formats are {', '.join(FORMATS)} (comma-separated, "
                          "e.g. --format=safetensors,stablehlo).")
    return tuple(dict.fromkeys(items))


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise ExportError(f"--out {out!r} is a file: give a directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out!r} exists and is not empty: choose a new directory or "
                          "pass --overwrite (overwrite=True) to replace it.")


def _checkpoint_step(path: str) -> int | None:
    """The step of the checkpoint read_state reads (for export.json)."""
    if os.path.isdir(os.path.join(path, "state")):
        name = os.path.basename(os.path.normpath(path))
        return int(name) if name.isdigit() else None
    root = os.path.join(path, "checkpoints")
    root = root if os.path.isdir(root) else path
    steps = [int(d) for d in os.listdir(root)
             if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))]
    return max(steps, default=None)


def export_bundle(
    workdir: str,
    out: str,
    formats: str | Sequence[str] = ("safetensors",),
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    platforms: Sequence[str] | None = None,
    model_type: str = "llama",
    overwrite: bool = False,
) -> dict:
    """Export `workdir`'s newest checkpoint (LoRA merged) to the bundle directory `out` in
    `formats` (see the module docstring for the layout); every format is verified before the
    bundle is moved into place. Returns export.json's content.

    Raises ExportError (bad request: format, `out`, a task without that format),
    FileNotFoundError (no checkpoint) or ExportVerificationError (a check failed)."""
    from jaxtrain.checkpoint import read_params

    formats = parse_formats(formats)
    if not workdir:
        raise ExportError("No workdir: give --workdir, the run to export.")
    if not out:
        raise ExportError("No output directory: give --out, the bundle's directory.")
    out = os.path.abspath(out)
    _check_out(out, overwrite)
    platforms = tuple(p.strip().lower() for p in (platforms or default_platforms()) if p.strip())
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ExportError(f"--platforms: unknown platform {bad[:1]}; valid: "
                          f"{', '.join(PLATFORMS)}.")
    if seq_len is not None and seq_len < 1:
        raise ExportError(f"--seq_len must be >= 1; got {seq_len}.")

    config, params = read_params(workdir)
    task_name = config.get("task")
    if "hf" in formats and task_name not in HF_TASKS:
        raise ExportError(f"format 'hf': the {task_name!r} task has no Hugging Face format "
                          f"(tasks with one: {', '.join(HF_TASKS)}); use "
                          "--format=safetensors,stablehlo.")
    task = inference_task(config, platforms if "stablehlo" in formats else ())
    _check_params(task, params)
    if "stablehlo" in formats:
        _input_specs(task, batch_size, seq_len)  # fail before writing anything

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        checks: dict[str, Any] = {}
        if "safetensors" in formats or "stablehlo" in formats:
            from safetensors.numpy import load_file

            path = os.path.join(tmp, "params.safetensors")
            flat = save_safetensors(path, params)
            diff = _verify_flat("safetensors", "params.safetensors", load_file(path), flat)
            checks["safetensors"] = {"checked": "every array equal", "max_abs_diff": diff,
                                     "arrays": len(flat)}
        if "stablehlo" in formats:
            checks["stablehlo"] = export_stablehlo(tmp, task, params, batch_size=batch_size,
                                                   seq_len=seq_len, platforms=platforms)
        if "hf" in formats:
            checks["hf"] = export_hf(os.path.join(tmp, "hf"), task, params, model_type)
        manifest = {
            "workdir": os.path.abspath(workdir), "step": _checkpoint_step(workdir),
            "task": task_name, "formats": list(formats),
            "lora_merged": bool(config.get("lora", {}).get("rank")),
            "jax_version": jax.__version__, "checks": checks,
        }
        if "hf" in formats and task_name != "clip":
            manifest["hf_model_type"] = model_type
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> the usual directory mode
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "bundle"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Exported %s (%s) to %s: %s", workdir, ", ".join(formats), out, checks)
    return manifest


# ------------------------------------------------------------------------------------ CLI


def _define_flags() -> dict[str, Any]:
    """The CLI's flags (defined by :func:`run` only, so importing this module defines none)."""
    return {
        "workdir": flags.DEFINE_string("workdir", None, "The run to export (its newest "
                                       "checkpoint)."),
        "formats": flags.DEFINE_string("format", None, "Comma-separated bundle formats for "
                                       f"--out: {', '.join(FORMATS)}."),
        "out": flags.DEFINE_string("out", None, "The bundle's directory (must not exist or be "
                                   "empty, unless --overwrite)."),
        "batch_size": flags.DEFINE_integer("batch_size", 8, "stablehlo: the exported batch "
                                           "size."),
        "seq_len": flags.DEFINE_integer("seq_len", None, "stablehlo: the exported sequence "
                                        "length of a language model (default: the run's "
                                        "data.seq_len; DPO: data.max_length)."),
        "platforms": flags.DEFINE_list("platforms", None, "stablehlo: lower for these "
                                       "platforms (cpu, cuda, rocm, tpu); default: cpu and "
                                       "this machine's."),
        "overwrite": flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty "
                                       "--out."),
        "hf_out": flags.DEFINE_string("hf_out", None, "Write a Hugging Face model directory "
                                      "here."),
        "model_type": flags.DEFINE_enum("model_type", "llama", ["llama", "qwen2", "mistral"],
                                        "Hugging Face architecture of a language model "
                                        "(--hf_out, --format=hf)."),
        "params_out": flags.DEFINE_string("params_out", None, "Write merged params as a "
                                          "jaxtrain checkpoint directory here."),
        "adapters_out": flags.DEFINE_string("adapters_out", None, "Write a LoRA run's adapters "
                                            "here."),
    }


_FLAGS: dict[str, Any] = {}


def cli(
    workdir: str | None,
    *,
    formats: str | None = None,
    out: str | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    platforms: Sequence[str] | None = None,
    overwrite: bool = False,
    hf_out: str | None = None,
    model_type: str = "llama",
    params_out: str | None = None,
    adapters_out: str | None = None,
) -> None:
    """What `python -m jaxtrain.export` does with its flags' values (the arguments)."""
    from jaxtrain.checkpoint import read_params
    from jaxtrain.tasks.lm import model_config

    if formats is not None or out is not None:
        if not out:
            raise app.UsageError("--format needs --out=DIR, the bundle's directory.")
        if not formats:
            raise app.UsageError(f"--out needs --format=..., comma-separated from "
                                 f"{', '.join(FORMATS)}.")
        try:
            export_bundle(workdir, out, formats, batch_size=batch_size, seq_len=seq_len,
                          platforms=platforms, model_type=model_type, overwrite=overwrite)
        except (ExportError, ExportVerificationError, FileNotFoundError) as e:
            sys.exit(f"jaxtrain.export: {e}")
    elif not (hf_out or params_out or adapters_out):
        raise app.UsageError("Give --format=... --out=DIR (a bundle), or at least one of "
                             "--hf_out, --params_out, --adapters_out.")
    if not (hf_out or params_out or adapters_out):
        return
    config, params = read_params(workdir)
    if hf_out:
        from jaxtrain.hf import save_hf

        save_hf(hf_out, params, model_config(config["model"]), model_type)
        logging.info("Wrote a Hugging Face %s model to %s", model_type, hf_out)
    if params_out:
        logging.info("Wrote merged params to %s", export_params(params_out, params, config))
    if adapters_out:
        from jaxtrain.checkpoint import read_state
        from jaxtrain.lora import save_adapters

        if not config.get("lora", {}).get("rank"):
            raise app.UsageError(f"{workdir} is not a LoRA run (lora.rank = 0).")
        import ml_collections

        save_adapters(adapters_out, read_state(workdir)[1]["params"],
                      ml_collections.ConfigDict(config["lora"]))
        logging.info("Wrote the LoRA adapters to %s", adapters_out)


def main(argv) -> None:
    del argv
    cli(**{k: v.value for k, v in _FLAGS.items()})


def run() -> None:
    if not _FLAGS:
        _FLAGS.update(_define_flags())
    flags.mark_flag_as_required("workdir")
    app.run(main)


# The bundle's standalone runner (written as <out>/run_exported.py): jax, numpy, safetensors.
RUNNER = '''\
"""Run this jaxtrain StableHLO bundle with jax, numpy and safetensors only (no jaxtrain).

    python run_exported.py                                 # the example inputs, checked
    python run_exported.py --inputs=in.npz --outputs=out.npz

`in.npz` holds one array per input named in bundle.json ("inputs": shapes and dtypes are
fixed). As a library:

    from run_exported import load_bundle
    fn, bundle = load_bundle("path/to/bundle")
    outputs = fn({"tokens": tokens})        # {name: numpy array}

jax.export needs the `flatbuffers` package to deserialise (pip install flatbuffers).
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))


def load_bundle(path=HERE):
    """(fn(inputs) -> outputs, bundle.json) of the bundle in `path`."""
    with open(os.path.join(path, "bundle.json")) as f:
        bundle = json.load(f)
    here = jax.export.default_export_platform()
    if here not in bundle["platforms"]:
        raise RuntimeError(f"This bundle was exported for {bundle['platforms']}; jax here runs "
                           f"on {here!r}: export again with --platforms including {here}.")
    with open(os.path.join(path, bundle["function"]), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    params = load_file(os.path.join(path, bundle["params"]))
    if sorted(params) != sorted(bundle["param_keys"]):
        raise ValueError(f"{bundle['params']} does not hold the params bundle.json lists.")
    params = jax.device_put(params)  # once, not per call

    def fn(inputs):
        want = bundle["inputs"]
        if set(inputs) != set(want):
            raise ValueError(f"inputs {sorted(inputs)}; this model takes {sorted(want)}.")
        args = {}
        for name, spec in want.items():
            x = np.asarray(inputs[name])
            if list(x.shape) != spec["shape"]:
                raise ValueError(f"input {name!r} has shape {list(x.shape)}; the model was "
                                 f"exported for {spec['shape']} (pad the batch).")
            args[name] = x.astype(jax.numpy.dtype(spec["dtype"]))
        return {k: np.asarray(v) for k, v in exported.call(params, args).items()}

    return fn, bundle


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=HERE, help="the bundle directory (default: this file's)")
    p.add_argument("--inputs", help=".npz of inputs (default: the example inputs, checked)")
    p.add_argument("--outputs", help="write the outputs to this .npz")
    p.add_argument("--rtol", type=float, help="the check's tolerance (default: bundle.json's; "
                   "looser on another platform than the exporter's, e.g. TF32 GPUs)")
    p.add_argument("--atol", type=float)
    args = p.parse_args(argv)
    fn, bundle = load_bundle(args.bundle)
    examples = bundle["examples"]
    inputs = dict(np.load(args.inputs or os.path.join(args.bundle, examples["inputs"])))
    outputs = fn(inputs)
    for name, value in outputs.items():
        print(f"{name}: shape {list(value.shape)} {value.dtype}")
    if args.outputs:
        np.savez(args.outputs, **outputs)
    if args.inputs:
        return 0
    want = np.load(os.path.join(args.bundle, examples["outputs"]))
    tol = dict(bundle["tolerance"])
    tol.update({k: v for k, v in (("rtol", args.rtol), ("atol", args.atol)) if v is not None})
    ok = True
    for name, value in outputs.items():
        got = value.reshape(-1)[want[name + ".index"]].astype(np.float64)
        ref = want[name].astype(np.float64)
        diff = float(np.max(np.abs(got - ref), initial=0.0))
        good = bool(np.all(np.abs(got - ref) <= tol["atol"] + tol["rtol"] * np.abs(ref)))
        ok &= good
        print(f"{name}: max |diff| vs the exporter's outputs {diff:.3g}: "
              f"{'ok' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
'''


if __name__ == "__main__":
    run()
