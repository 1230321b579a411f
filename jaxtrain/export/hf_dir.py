"""A run as one Hugging Face model directory (`--hf_out`, `export.at_end=('hf',)`): what
``transformers`` loads from the folder itself, not from a bundle's ``hf/`` sub-folder.

The same path as the bundle's ``hf`` format (:func:`jaxtrain.export.bundle.export_bundle`):
the run's task built from its saved config (:func:`~jaxtrain.export.inference.inference_task`,
so a model whose shape came from ``init_from`` has that shape), its params checked against it,
cast to the save dtype, written with the tokenizer and chat template, verified, and moved into
place only when every check passed; ``export.json`` beside the weights records the checkpoint
and the checks."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
from absl import logging

from jaxtrain.export.bundle import check_out, checkpoint_step, move_into_place, write_json
from jaxtrain.export.checks import ExportError
from jaxtrain.export.hf import check_hf_format, export_hf, save_options
from jaxtrain.export.inference import check_params, inference_task
from jaxtrain.export.params import cast_params, save_dtype
from jaxtrain.weights import read_run

MANIFEST = "export.json"


def export_hf_dir(workdir: str, out: str, *, model_type: str = "llama",
                  overwrite: bool = False, dtype: str | None = None) -> dict:
    """Write `workdir`'s newest checkpoint (or the step directory `workdir` names; LoRA
    merged) as the Hugging Face directory `out`, verified (:func:`export_hf`), with the run's
    tokenizer for a language model. `dtype`: as :func:`export_bundle`'s. Returns export.json's
    content. Raises ExportError (`out` not empty without `overwrite`, a task without a
    Hugging Face format, params that do not fit the run's model), FileNotFoundError (no
    checkpoint) or ExportVerificationError (a check failed)."""
    if not out:
        raise ExportError("No output directory: give --hf_out, the model's directory.")
    out = os.path.abspath(out)
    check_out(out, overwrite)
    config, params = read_run(workdir)
    dtype = save_dtype(dtype, config)
    task = inference_task(config)
    check_params(task, params)
    params = cast_params(params, dtype)
    family = check_hf_format(task)
    options = save_options(family, task, model_type, dtype)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        check = export_hf(tmp, family, task.model_config, params, options, task=task)
        manifest = {"workdir": os.path.abspath(workdir), "step": checkpoint_step(workdir),
                    "task": config["task"], "formats": ["hf"],
                    "lora_merged": bool(config.get("lora", {}).get("rank")),
                    "dtype": dtype or "as trained", "jax_version": jax.__version__,
                    "checks": {"hf": check}}
        if "model_type" in options:
            manifest["hf_model_type"] = options["model_type"]
        write_json(os.path.join(tmp, MANIFEST), manifest)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Wrote a Hugging Face %s to %s%s: %s", family.title, out,
                 f" ({options['model_type']})" if "model_type" in options else "", check)
    return manifest
