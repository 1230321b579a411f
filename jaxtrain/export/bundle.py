"""The export bundle: a run's newest checkpoint written in the asked formats to a temporary
directory next to `out`, every format verified, then moved into place (so a failed export
leaves nothing behind), with export.json recording what was exported and each check."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from jaxtrain.export.checks import ExportError, verify_arrays
from jaxtrain.export.hf import check_hf_format, export_hf, save_options
from jaxtrain.export.inference import check_params, inference_task, input_specs
from jaxtrain.export.params import cast_params, save_dtype, save_safetensors
from jaxtrain.export.stablehlo import PLATFORMS, default_platforms, export_stablehlo
from jaxtrain.weights import read_run

FORMATS = ("safetensors", "stablehlo", "hf")


def parse_formats(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'safetensors,stablehlo' (or a sequence) -> the formats, checked, without repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip().lower() for s in items if s and s.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if unknown or not items:
        what = f"Unknown export format {unknown[0]!r}" if unknown else "No export format given"
        raise ExportError(f"{what}: valid formats are {', '.join(FORMATS)} (comma-separated, "
                          "e.g. --format=safetensors,stablehlo), or sentence-transformers "
                          "alone (export_sentence_transformers).")
    return tuple(dict.fromkeys(items))


def check_out(out: str, overwrite: bool) -> None:
    """An ExportError when ``out`` is a file, or a non-empty directory and not ``overwrite``."""
    if os.path.isfile(out):
        raise ExportError(f"--out {out!r} is a file: give a directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out!r} exists and is not empty: choose a new directory or "
                          "pass --overwrite (overwrite=True) to replace it.")


def checkpoint_step(path: str) -> int | None:
    """The step of the checkpoint read_state reads (for export.json)."""
    if os.path.isdir(os.path.join(path, "state")):
        name = os.path.basename(os.path.normpath(path))
        return int(name) if name.isdigit() else None
    root = os.path.join(path, "checkpoints")
    root = root if os.path.isdir(root) else path
    steps = [int(d) for d in os.listdir(root)
             if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))]
    return max(steps, default=None)


def move_into_place(tmp: str, out: str) -> None:
    """`tmp` becomes `out` (an existing `out` replaced), with the usual directory mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> the usual directory mode
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.replace(out, os.path.join(old, "bundle"))
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_json(path: str, content: Any) -> None:
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


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
    dtype: str | None = None,
) -> dict:
    """Export `workdir`'s newest checkpoint (LoRA merged) to the bundle directory `out` in
    `formats` (see :mod:`jaxtrain.export` for the layout); every format is verified before the
    bundle is moved into place. `dtype` (bf16 | fp16 | fp32; None: the run's
    `checkpoint.save_dtype`, '' there = as trained): floating params are cast to it before
    anything is written, and every format is verified against the cast params. Returns
    export.json's content.

    Raises ExportError (bad request: format, `out`, a task without that format),
    FileNotFoundError (no checkpoint) or ExportVerificationError (a check failed)."""
    formats = parse_formats(formats)
    if not workdir:
        raise ExportError("No workdir: give --workdir, the run to export.")
    if not out:
        raise ExportError("No output directory: give --out, the bundle's directory.")
    out = os.path.abspath(out)
    check_out(out, overwrite)
    platforms = tuple(p.strip().lower() for p in (platforms or default_platforms()) if p.strip())
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ExportError(f"--platforms: unknown platform {bad[:1]}; valid: "
                          f"{', '.join(PLATFORMS)}.")
    if seq_len is not None and seq_len < 1:
        raise ExportError(f"--seq_len must be >= 1; got {seq_len}.")

    config, params = read_run(workdir)
    dtype = save_dtype(dtype, config)
    task = inference_task(config, platforms if "stablehlo" in formats else ())
    check_params(task, params)
    params = cast_params(params, dtype)
    family, hf_options = None, {}
    if "hf" in formats:
        family = check_hf_format(task)
        hf_options = save_options(family, task, model_type, dtype)
    if "stablehlo" in formats:
        input_specs(task, batch_size, seq_len)  # fail before writing anything

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        write_json(os.path.join(tmp, "config.json"), config)
        checks: dict[str, Any] = {}
        if "safetensors" in formats or "stablehlo" in formats:
            from safetensors.numpy import load_file

            path = os.path.join(tmp, "params.safetensors")
            flat = save_safetensors(path, params)
            diff = verify_arrays("safetensors", "params.safetensors", load_file(path), flat)
            checks["safetensors"] = {"checked": "every array equal", "max_abs_diff": diff,
                                     "arrays": len(flat)}
        if "stablehlo" in formats:
            checks["stablehlo"] = export_stablehlo(tmp, task, params, batch_size=batch_size,
                                                   seq_len=seq_len, platforms=platforms)
        if "hf" in formats:
            checks["hf"] = export_hf(os.path.join(tmp, "hf"), family, task.model_config,
                                     params, hf_options, task=task)
        manifest = {
            "workdir": os.path.abspath(workdir), "step": checkpoint_step(workdir),
            "task": config["task"], "formats": list(formats),
            "lora_merged": bool(config.get("lora", {}).get("rank")),
            "dtype": dtype or "as trained",
            "jax_version": jax.__version__, "checks": checks,
        }
        if "model_type" in hf_options:
            manifest["hf_model_type"] = hf_options["model_type"]
        write_json(os.path.join(tmp, "export.json"), manifest)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Exported %s (%s) to %s: %s", workdir, ", ".join(formats), out, checks)
    return manifest
