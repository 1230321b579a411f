"""Pretrained weights, one way in: ``init_from``, ``distill.teacher`` and DPO's reference all
load through :func:`load_pretrained`, from either

* a Hugging Face model directory (``config.json`` + safetensors), converted by the model
  family that reads its ``model_type`` (:func:`jaxtrain.models.registry.family_for_hf_dir`),
  or a Hugging Face Hub id (``openai/clip-vit-base-patch32``) for one, from the Hub's cache
  (:func:`jaxtrain.hub.resolve`; downloaded unless ``HF_HUB_OFFLINE=1``), or
* a jaxtrain workdir (or a checkpoint / step directory in it): its newest checkpoint, with a
  LoRA run's adapters merged into its base weights (:func:`read_run`).

Both give the model's config, its params as host numpy arrays, and the data settings the
weights imply (their tokenizer, a CLIP model's image normalisation: the family's
``data_keys``), which a run starting from them may adopt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections

from jaxtrain.checkpoint import read_state
from jaxtrain.errors import ConfigError
from jaxtrain.hub import resolve
from jaxtrain.lora import merged_state_params
from jaxtrain.models.registry import ModelFamily, family_for_hf_dir, get_model


class Pretrained(NamedTuple):
    """What :func:`load_pretrained` returns."""

    config: Any  # the model's config (an instance of the family's config_cls)
    params: Any  # host numpy arrays, nested like the model's params
    data: dict[str, Any]  # `config.data` settings the weights imply (tokenizer, image mean/std)


def is_hf_dir(path: str) -> bool:
    """A Hugging Face model directory (a ``config.json``), not a jaxtrain workdir."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(
        os.path.join(path, "checkpoints"))


def read_run(path: str) -> tuple[dict, Any]:
    """(config dict, params as host numpy arrays) of a jaxtrain run's newest checkpoint (see
    :func:`jaxtrain.checkpoint.read_state` for the paths it takes). A LoRA run's adapters are
    merged into its base weights, so the params are always the whole model's."""
    config, state = read_state(path)
    lora = config.get("lora", {})
    if lora.get("rank"):
        return config, merged_state_params(state, ml_collections.ConfigDict(lora))
    return config, state["params"]


def starting_model(family: ModelFamily, model: Mapping[str, Any],
                   init_from: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model config, params or None, data settings) a run starts from: the config's own model
    with a random init (params None), or with `init_from` the weights' shape and params (the
    config says only how to run it: the family's runtime fields) and what they imply of the
    data."""
    if not init_from:
        return family.config(model), None, {}
    shape, params, data = load_pretrained(init_from, family, "init_from")
    return family.pretrained_config(shape, model), params, data


def run_family(config: Mapping[str, Any]) -> ModelFamily:
    """The model family of a saved run's config: its ``model.name``; a run saved before
    ``model.name`` existed has its task's default model."""
    name = config.get("model", {}).get("name")
    if not name:
        from jaxtrain.tasks import get_task

        name = get_task(config.get("task", "")).default_config().model.name
    return get_model(name)


def load_pretrained(path: str, family: ModelFamily, what: str) -> Pretrained:
    """The weights at ``path`` (a Hugging Face directory or Hub id, or a jaxtrain workdir) for
    a model of ``family``. ``what`` names the config key that gave the path (``init_from``,
    ``distill.teacher``), for the errors: a ConfigError when the path does not exist (nor is a
    Hub id in the cache), holds no checkpoint, or holds another family's model."""
    local = (f"a jaxtrain {family.title} workdir (the --workdir of a `python -m jaxtrain.main` "
             f"run with model.name={family.name!r}: train that run first) or a Hugging Face "
             f"{family.title} directory (config.json + model.safetensors)")
    path = resolve(path, what, local=local)
    if not os.path.exists(path):
        raise ConfigError(
            f"{what} {path!r} does not exist: give {local}, or a Hugging Face Hub id "
            "(owner/name).")
    if is_hf_dir(path):
        found = family_for_hf_dir(path, default=family)
        if found.name != family.name and found.name not in family.hf_towers:
            raise ConfigError(
                f"{what} {path!r} is a Hugging Face {found.title} (model family "
                f"{found.name!r}), not a {family.title} (model.name {family.name!r}).")
        cfg, params = family.load_hf(path)
        return Pretrained(cfg, params, family.hf_data_settings(path))
    try:
        saved, params = read_run(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {path!r}: {e}") from None
    found = run_family(saved)
    if found.name != family.name:
        raise ConfigError(
            f"{what} {path!r} holds a {saved.get('task')!r} run of a {found.title} (model.name "
            f"{found.name!r}), not a {family.title} (model.name {family.name!r}).")
    saved_data = saved.get("data", {})
    data = {k: saved_data[k] for k in family.data_keys if k in saved_data}
    return Pretrained(family.config(saved["model"]), params, data)
