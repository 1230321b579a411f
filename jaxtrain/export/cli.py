"""`python -m jaxtrain.export`: its flags, and what it does with their values (:func:`cli`).

Exit codes: 0 done; 1 a bundle that could not be written or did not verify (the message
says why, prefixed `jaxtrain.export:`), or missing or contradictory flags (absl's usage
error, with the usage)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from jaxtrain.export.bundle import FORMATS, export_bundle
from jaxtrain.export.checks import ExportError, ExportVerificationError
from jaxtrain.export.hf_dir import export_hf_dir
from jaxtrain.export.params import SAVE_DTYPES, cast_params, export_params, save_dtype
from jaxtrain.export.sentence_transformers import FORMAT as ST_FORMAT
from jaxtrain.weights import read_run


def _define_flags() -> dict[str, Any]:
    """The CLI's flags (defined by :func:`run` only, so importing this module defines none)."""
    return {
        "workdir": flags.DEFINE_string("workdir", None, "The run to export (its newest "
                                       "checkpoint)."),
        "formats": flags.DEFINE_string("format", None, "Comma-separated bundle formats for "
                                       f"--out: {', '.join(FORMATS)}; or {ST_FORMAT} alone (an "
                                       "embedder's sentence-transformers folder)."),
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
                                       "--out or --hf_out."),
        "hf_out": flags.DEFINE_string("hf_out", None, "Write a Hugging Face model directory "
                                      "here (a language model's with its tokenizer and chat "
                                      "template), verified like --format=hf."),
        "model_type": flags.DEFINE_enum("model_type", "llama", ["llama", "qwen2", "mistral"],
                                        "Hugging Face architecture of a language model "
                                        "(--hf_out, --format=hf)."),
        "params_out": flags.DEFINE_string("params_out", None, "Write merged params as a "
                                          "jaxtrain checkpoint directory here."),
        "adapters_out": flags.DEFINE_string("adapters_out", None, "Write a LoRA run's adapters "
                                            "here."),
        "dtype": flags.DEFINE_enum("dtype", None, list(SAVE_DTYPES), "Cast floating params to "
                                   "this dtype when writing (--out, --hf_out, --params_out); "
                                   "default: the run's checkpoint.save_dtype, '' there = as "
                                   "trained."),
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
    dtype: str | None = None,
) -> None:
    """What `python -m jaxtrain.export` does with its flags' values (the arguments). `dtype`
    (bf16 | fp16 | fp32; None: the run's checkpoint.save_dtype) applies to every params-only
    output (the bundle, --hf_out, --params_out), not to --adapters_out."""
    if formats is not None or out is not None:
        if not out:
            raise app.UsageError("--format needs --out=DIR, the bundle's directory.")
        if not formats:
            raise app.UsageError(f"--out needs --format=..., comma-separated from "
                                 f"{', '.join(FORMATS)}.")
        try:
            wanted = [f.strip().lower() for f in formats.split(",") if f.strip()]
            if ST_FORMAT in wanted:
                if len(wanted) > 1:
                    raise app.UsageError(f"--format={ST_FORMAT} writes its own folder: export "
                                         "it alone (another --out for the other formats).")
                from jaxtrain.export.sentence_transformers import export_sentence_transformers

                export_sentence_transformers(workdir, out, model_type=model_type,
                                             overwrite=overwrite, dtype=dtype)
            else:
                export_bundle(workdir, out, formats, batch_size=batch_size, seq_len=seq_len,
                              platforms=platforms, model_type=model_type, overwrite=overwrite,
                              dtype=dtype)
        except (ExportError, ExportVerificationError, FileNotFoundError) as e:
            sys.exit(f"jaxtrain.export: {e}")
    elif not (hf_out or params_out or adapters_out):
        raise app.UsageError("Give --format=... --out=DIR (a bundle), or at least one of "
                             "--hf_out, --params_out, --adapters_out.")
    if hf_out:
        try:
            export_hf_dir(workdir, hf_out, model_type=model_type, overwrite=overwrite,
                          dtype=dtype)
        except (ExportError, ExportVerificationError, FileNotFoundError) as e:
            sys.exit(f"jaxtrain.export: --hf_out: {e}")
    if not (params_out or adapters_out):
        return
    config, params = read_run(workdir)
    if params_out:
        try:
            params = cast_params(params, save_dtype(dtype, config))
        except ExportError as e:
            sys.exit(f"jaxtrain.export: {e}")
        logging.info("Wrote merged params to %s", export_params(params_out, params, config))
    if adapters_out:
        import ml_collections

        from jaxtrain.checkpoint import read_state
        from jaxtrain.lora import save_adapters

        if not config.get("lora", {}).get("rank"):
            raise app.UsageError(f"{workdir} is not a LoRA run (lora.rank = 0).")
        save_adapters(adapters_out, read_state(workdir)[1]["params"],
                      ml_collections.ConfigDict(config["lora"]))
        logging.info("Wrote the LoRA adapters to %s", adapters_out)


def main(argv: Sequence[str]) -> None:
    """absl's entry: :func:`cli` with the flags' values."""
    del argv
    cli(**{k: v.value for k, v in _FLAGS.items()})


def run() -> None:
    """Define the flags (once) and run `python -m jaxtrain.export`."""
    if not _FLAGS:
        _FLAGS.update(_define_flags())
    flags.mark_flag_as_required("workdir")
    app.run(main)
