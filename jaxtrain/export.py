"""Export a language-model run: merged weights to Hugging Face format or to a params-only jaxtrain
checkpoint, and LoRA adapters alone.

    python -m jaxtrain.export --workdir=runs/dpo --hf_out=exports/dpo_hf [--model_type=qwen2]
    python -m jaxtrain.export --workdir=runs/dpo --params_out=exports/dpo_merged
    python -m jaxtrain.export --workdir=runs/dpo --adapters_out=exports/dpo_lora   # LoRA runs

A LoRA run's adapters are merged into its base weights (W + alpha/r · A B) for `--hf_out` and
`--params_out`. `--params_out` writes `<dir>/checkpoints/<step>/{state,meta}` with the merged
params and the run's config (LoRA off), so `init_from` and `distill.teacher` accept it.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to export (its newest checkpoint).")
_HF_OUT = flags.DEFINE_string("hf_out", None, "Write a Hugging Face model directory here.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "llama", ["llama", "qwen2", "mistral"],
                                "Hugging Face architecture for --hf_out.")
_PARAMS_OUT = flags.DEFINE_string("params_out", None, "Write merged params as a jaxtrain "
                                  "checkpoint directory here.")
_ADAPTERS_OUT = flags.DEFINE_string("adapters_out", None, "Write a LoRA run's adapters here.")


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


def main(argv) -> None:
    del argv
    from jaxtrain.checkpoint import read_params
    from jaxtrain.tasks.lm import model_config

    if not (_HF_OUT.value or _PARAMS_OUT.value or _ADAPTERS_OUT.value):
        raise app.UsageError("Give at least one of --hf_out, --params_out, --adapters_out.")
    config, params = read_params(_WORKDIR.value)
    if _HF_OUT.value:
        from jaxtrain.hf import save_hf

        save_hf(_HF_OUT.value, params, model_config(config["model"]), _MODEL_TYPE.value)
        logging.info("Wrote a Hugging Face %s model to %s", _MODEL_TYPE.value, _HF_OUT.value)
    if _PARAMS_OUT.value:
        logging.info("Wrote merged params to %s", export_params(_PARAMS_OUT.value, params, config))
    if _ADAPTERS_OUT.value:
        from jaxtrain.checkpoint import read_state
        from jaxtrain.lora import save_adapters

        if not config.get("lora", {}).get("rank"):
            raise app.UsageError(f"{_WORKDIR.value} is not a LoRA run (lora.rank = 0).")
        import ml_collections

        save_adapters(_ADAPTERS_OUT.value, read_state(_WORKDIR.value)[1]["params"],
                      ml_collections.ConfigDict(config["lora"]))
        logging.info("Wrote the LoRA adapters to %s", _ADAPTERS_OUT.value)


def run() -> None:
    flags.mark_flag_as_required("workdir")
    app.run(main)


if __name__ == "__main__":
    run()
