"""Hugging Face ``transformers`` checkpoint conversion (safetensors only, no torch needed).

The package-level ``config_from_hf`` / ``load_hf`` / ``save_hf`` / ... convert Llama-family
decoders (:mod:`jaxtrain.hf.llama`); CLIP has its own module, :mod:`jaxtrain.hf.clip`, whose
``load_hf`` / ``save_hf`` are also exported here as ``load_clip_hf`` / ``save_clip_hf``.
"""

from jaxtrain.hf import clip
from jaxtrain.hf.clip import image_preprocessing_from_hf
from jaxtrain.hf.clip import load_hf as load_clip_hf
from jaxtrain.hf.clip import save_hf as save_clip_hf
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
    "clip", "image_preprocessing_from_hf", "load_clip_hf", "save_clip_hf",
]
