"""Model families by ``config.model.name``: one place that says how to build, run, count and
convert a kind of model.

A :class:`ModelFamily` bundles a config dataclass with the functions code outside the model
needs: the Flax module, its init, its inference function and input shapes, its FLOP formula, the
fields that say how to run it rather than what it is, and its Hugging Face conversion (a module
path, imported only when used: models never import :mod:`jaxtrain.hf`). Tasks, export and the
pretrained-weights loader ask this registry; nothing branches on a model's name.

    from jaxtrain.models import ModelFamily, get_model, register_model

    family = get_model("llama")
    cfg = family.config({"name": "llama", "hidden_size": 64, ...})  # ConfigError on a bad value
    params = family.init(cfg, jax.random.key(0))                      # boxed (logical axes)
    out = family.inference(cfg, unboxed_params, {"tokens": tokens})   # {"logits": ...}
    register_model(ModelFamily(name="mine", ...))                     # config.model.name='mine'

The built-in families are defined next to their modules (``FAMILY`` at the bottom of
:mod:`jaxtrain.models.llama` and :mod:`jaxtrain.models.clip`) and imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax

from jaxtrain.errors import ConfigError
from jaxtrain.registry import Registry

# What a family is, for the tasks that check they can train it (the module's contract):
# CAUSAL_LM: module(tokens [B, T], positions=None, segment_ids=None) -> (logits [B, T, V],
#   aux: "hidden", and MoE router statistics "router_logits", "expert_index",
#   "dropped_fraction" stacked over layers).
# DUAL_ENCODER: module(images, tokens) -> {"image_embeds", "text_embeds", "logit_scale", ...},
#   with methods encode_image, encode_text and scalars (as jaxtrain.models.clip.CLIP).
# TEXT_ENCODER: module(tokens [B, T], mask [B, T] bool) -> hidden [B, T, D] (a tower of the
#   `embedder` family, e.g. jaxtrain.models.bert.Bert).
CAUSAL_LM = "causal_lm"
DUAL_ENCODER = "dual_encoder"
TEXT_ENCODER = "text_encoder"


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How to build, run, count and convert one kind of model. ``cfg`` below is an instance
    of ``config_cls``; ``params`` are the model's (unboxed) parameters."""

    name: str  # config.model.name
    kind: str  # CAUSAL_LM, DUAL_ENCODER, or a new kind a new task understands
    title: str  # for messages: "language model", "CLIP"
    config_cls: type  # a frozen dataclass with `from_dict(d)` (ValueError on a bad key/value)
    module: Callable[[Any], nn.Module]  # cfg -> the Flax module
    init: Callable[[Any, jax.Array], Any]  # (cfg, rng) -> boxed params (logical axis names)
    # (cfg, batch_size, seq_len or None) -> {input name: jax.ShapeDtypeStruct}
    inference_inputs: Callable[..., dict[str, jax.ShapeDtypeStruct]]
    # (cfg, params, inputs) -> {output name: array}: what an exported model computes
    inference: Callable[[Any, Any, dict[str, jax.Array]], dict[str, jax.Array]]
    # Config fields that say how to run the model rather than what it is (dtype, remat, ...):
    # taken from the run's config when the shape comes from pretrained weights.
    runtime_fields: tuple[str, ...] = ()
    # (cfg, seq_len) -> training FLOPs per token (forward + backward), the documented formula
    # used for MFU; None = the trainer uses XLA's count of the compiled step.
    flops_per_token: Callable[[Any, int], float] | None = None
    # Hugging Face conversion: a module with load_hf(path) -> (cfg, params),
    # save_hf(path, params, cfg, **extras) and data_settings(path) -> dict; "" = none.
    hf_module: str = ""
    hf_model_types: tuple[str, ...] = ()  # config.json model_types that hf_module reads
    # Families whose Hugging Face directories hf_module also reads, as parts of this model
    # (the embedder: a bert / llama / clip / siglip directory becomes its towers).
    hf_towers: tuple[str, ...] = ()
    # Keys of a run's `data` config that its weights imply (its tokenizer, its image
    # normalisation): handed on with the weights to a run that starts from them.
    data_keys: tuple[str, ...] = ()

    def default_config(self) -> dict[str, Any]:
        """``{"name": name, <every config field>: <its default>}``: a task's ``config.model``."""
        return {"name": self.name, **dataclasses.asdict(self.config_cls())}

    def config(self, d: Mapping[str, Any]) -> Any:
        """The config of ``d`` (a ``config.model`` dict; its ``name`` key is dropped). A bad key
        or value is a ConfigError naming it."""
        fields = {k: v for k, v in dict(d).items() if k != "name"}
        try:
            return self.config_cls.from_dict(fields)
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None

    def pretrained_config(self, shape: Any, model: Mapping[str, Any]) -> Any:
        """The config of a model whose shape comes from pretrained weights: ``shape``'s fields,
        with the runtime fields taken from ``model`` (the run's ``config.model`` dict)."""
        runtime = {k: model[k] for k in self.runtime_fields if k in model}
        return self.config({**dataclasses.asdict(shape), **runtime})

    def hf(self) -> ModuleType:
        """The Hugging Face conversion module (imported now)."""
        if not self.hf_module:
            raise ConfigError(
                f"The {self.name!r} model family has no Hugging Face conversion: start from a "
                "jaxtrain workdir instead, or register the family with hf_module='pkg.module' "
                "(a module with load_hf, save_hf and data_settings).")
        return importlib.import_module(self.hf_module)

    def load_hf(self, path: str) -> tuple[Any, Any]:
        """(cfg, params as float32 numpy) of a Hugging Face model directory."""
        return self.hf().load_hf(path)

    def save_hf(self, path: str, params: Any, cfg: Any, **extras: Any) -> None:
        """Write a Hugging Face model directory (``extras``: the converter's options, e.g. an
        LM's ``model_type``, CLIP's ``image_preprocessing`` and ``tokenizer``)."""
        self.hf().save_hf(path, params, cfg, **extras)

    def hf_data_settings(self, path: str) -> dict[str, Any]:
        """The data settings a Hugging Face directory implies (its tokenizer, its image
        preprocessing), as ``config.data`` keys."""
        return dict(self.hf().data_settings(path))


MODELS = Registry("model", "config.model.name", {
    "llama": "jaxtrain.models.llama:FAMILY",
    "clip": "jaxtrain.models.clip:FAMILY",
    "embedder": "jaxtrain.models.embedder:FAMILY",
    "bert": "jaxtrain.models.bert:FAMILY",
    "siglip": "jaxtrain.models.siglip:FAMILY",
})


def register_model(family: ModelFamily) -> ModelFamily:
    """Make ``config.model.name = family.name`` find ``family``. Returns it."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_model takes a ModelFamily; got {type(family).__name__}.")
    return MODELS.register(family.name, family)


def get_model(name: str, kind: str | None = None) -> ModelFamily:
    """The family registered as ``name``; with ``kind``, a ConfigError unless it is of that
    kind (a task asking for a model it can train)."""
    family = MODELS.get(name)
    if kind is not None and family.kind != kind:
        fitting = [n for n in MODELS.names() if MODELS.get(n).kind == kind]
        raise ConfigError(
            f"config.model.name {name!r} is a {family.kind} model ({family.title}), but this "
            f"task trains {kind} models: set model.name to one of {fitting}.")
    return family


def model_schema(default: Mapping[str, Any], model: Mapping[str, Any], kind: str) -> dict:
    """The keys and defaults a run's ``config.model`` is checked against: the task's
    ``default`` block when ``model`` names its family (or no family), else the defaults of the
    family ``model["name"]`` names (which must be of ``kind``)."""
    name = model.get("name") or default["name"]
    if name == default["name"]:
        return dict(default)
    return get_model(name, kind=kind).default_config()


def model_names() -> list[str]:
    """The registered ``config.model.name`` values."""
    return MODELS.names()


def family_for_hf_dir(path: str, default: ModelFamily | None = None) -> ModelFamily:
    """The family whose converter reads the Hugging Face directory ``path`` (by its
    ``config.json``'s ``model_type``). When none claims it: ``default`` (whose converter then
    says why it cannot read it), or a ConfigError naming the types the families read."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist: {path} is not a Hugging Face model "
                                "directory.")
    with open(file) as f:
        model_type = json.load(f).get("model_type")
    families = [MODELS.get(n) for n in MODELS.names()]
    for family in families:
        if model_type in family.hf_model_types:
            return family
    if default is not None:
        return default
    known = {f.name: list(f.hf_model_types) for f in families if f.hf_model_types}
    raise ConfigError(f"{file}: no registered model family reads model_type {model_type!r} "
                      f"(families and the types they read: {known}).")
