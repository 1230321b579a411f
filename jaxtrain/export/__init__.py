"""Export a run: a verified bundle (safetensors, StableHLO, Hugging Face), merged weights as a
params-only jaxtrain checkpoint, and LoRA adapters alone.

    python -m jaxtrain.export --workdir=runs/lm --format=safetensors,stablehlo,hf \\
        --out=exports/lm [--batch_size=8] [--seq_len=128] [--platforms=cpu,cuda] [--overwrite]
    python -m jaxtrain.export --workdir=runs/dpo --hf_out=exports/dpo_hf [--model_type=qwen2]
    python -m jaxtrain.export --workdir=runs/dpo --params_out=exports/dpo_merged
    python -m jaxtrain.export --workdir=runs/dpo --adapters_out=exports/dpo_lora   # LoRA runs
    python -m jaxtrain.export --workdir=runs/lm --hf_out=exports/lm_hf --dtype=bf16  # bf16 weights
    python -m jaxtrain.export --workdir=runs/embed --format=sentence-transformers --out=exports/st

A LoRA run's adapters are merged into its base weights (W + alpha/r · A B) for every format but
`--adapters_out`. `--params_out` writes `<dir>/checkpoints/<step>/{state,meta}` with the merged
params and the run's config (LoRA off), so `init_from` and `distill.teacher` accept it.
`--dtype=bf16|fp16|fp32` (default: the run's `checkpoint.save_dtype`, '' there = as trained)
casts the floating params of every output but `--adapters_out` before writing
(:func:`~jaxtrain.export.params.cast_params`); each format is verified against the cast params,
and a Hugging Face config.json names the dtype (`torch_dtype`).

The bundle (`--out`, see :func:`export_bundle`)::

    config.json           the run's full config (every format)
    params.safetensors    safetensors, stablehlo: the params flattened by '/'-joined path,
                          in their checkpoint dtype (float32; a LoRA run merged, in float32)
                          or --dtype's
    model.stablehlo       stablehlo: `jax.export` of the task's `inference(params, inputs)` for
                          a fixed batch (and sequence) shape; the params are an argument
    bundle.json           stablehlo: input/output names, shapes and dtypes, the params' key
                          order, platforms, jax version, how to call it
    run_exported.py       stablehlo: a runner needing only jax, numpy and safetensors (the
                          source of :mod:`jaxtrain.export.runner`)
    example_inputs.npz    stablehlo: the verification inputs; example_outputs.npz: the
                          in-memory outputs for them (<= 4096 sampled values per output)
    hf/                   hf: a `transformers` directory (config.json + model.safetensors; a
                          language model's tokenizer files, with the chat template of a chat
                          SFT or DPO run: :mod:`~jaxtrain.export.tokenizer`)
    export.json           what was exported from which checkpoint, and each format's check

Every format is verified after writing (reloaded and compared with the in-memory model); the
bundle is written to a temporary directory next to `--out` and moved into place only when all
checks pass, so a failed export leaves nothing behind.

`--hf_out=DIR` writes that `hf/` directory at DIR itself, the same way (verified, moved into
place; :func:`~jaxtrain.export.hf_dir.export_hf_dir`). `export.at_end` runs these exports when
training finishes (:mod:`~jaxtrain.export.at_end`).

`--format=sentence-transformers` (alone) writes an `embedder` run (bert or causal llama text
tower) as a folder `sentence_transformers.SentenceTransformer(path)` loads, checked by comparing
its `encode()` with the run's embeddings (:mod:`~jaxtrain.export.sentence_transformers`).

Modules: :mod:`~jaxtrain.export.bundle` (the bundle), :mod:`~jaxtrain.export.params`
(safetensors, params-only checkpoints), :mod:`~jaxtrain.export.stablehlo` (`jax.export`),
:mod:`~jaxtrain.export.runner` (the bundle's standalone runner), :mod:`~jaxtrain.export.hf`
(Hugging Face), :mod:`~jaxtrain.export.inference` (the run's task built for inference),
:mod:`~jaxtrain.export.checks` (errors, comparisons), :mod:`~jaxtrain.export.cli` (the CLI).
"""

from jaxtrain.export.bundle import FORMATS, export_bundle, parse_formats
from jaxtrain.export.checks import ExportError, ExportVerificationError
from jaxtrain.export.cli import cli
from jaxtrain.export.hf import export_hf
from jaxtrain.export.hf_dir import export_hf_dir
from jaxtrain.export.inference import inference_task
from jaxtrain.export.params import (
    export_params,
    flatten_params,
    load_safetensors,
    save_safetensors,
)
from jaxtrain.export.sentence_transformers import export_sentence_transformers
from jaxtrain.export.stablehlo import PLATFORMS, default_platforms, export_stablehlo, load_exported

__all__ = [
    "FORMATS", "PLATFORMS", "ExportError", "ExportVerificationError", "cli", "default_platforms",
    "export_bundle", "export_hf", "export_hf_dir", "export_params", "export_sentence_transformers",
    "export_stablehlo", "flatten_params",
    "inference_task", "load_exported", "load_safetensors", "parse_formats", "save_safetensors",
]
