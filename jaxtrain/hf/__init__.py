"""Hugging Face ``transformers`` checkpoint conversion (safetensors only, no torch needed)."""

from jaxtrain.hf.llama import (
    config_from_hf,
    config_to_hf,
    load_hf,
    params_from_hf,
    params_to_hf,
    save_hf,
)

__all__ = [
    "config_from_hf", "config_to_hf", "load_hf", "params_from_hf", "params_to_hf", "save_hf",
]
