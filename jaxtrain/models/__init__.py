"""Flax models, and the registry of model families (``config.model.name``)."""

from jaxtrain.models.registry import ModelFamily, get_model, model_names, register_model

__all__ = ["ModelFamily", "get_model", "model_names", "register_model"]
