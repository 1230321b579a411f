"""Hugging Face directories as embedder towers (``model.text_tower='auto'`` / ``init_from``).

``load_hf(path)`` reads ``config.json``'s ``model_type``, asks the model registry which family
reads it (:func:`jaxtrain.models.registry.family_for_hf_dir`) and converts the weights with that
family's own converter into the :mod:`jaxtrain.models.embedder` layout:

    bert                    (BertModel: BERT, MiniLM, bge, e5)  -> params["text"]
    llama / qwen2 / mistral (base model or causal LM; lm_head dropped, jaxtrain.hf.llama_encoder)
                                                                 -> params["text"]
    clip   (CLIPModel)   text_model -> "text", vision_model -> "image", text_projection,
                         visual_projection -> "image_projection", logit_scale
    siglip (SiglipModel) text_model -> "text" (its head after pooling), vision_model -> "image",
                         logit_scale, logit_bias

The returned config carries the towers (``text_tower``, ``text``, ``image_tower``, ``image``,
and for CLIP its ``embed_dim``); how they are used (pooling, causal, text_max_len, ...) comes
from the run's config (the family's runtime fields). ``data_settings`` is the tower converter's
(the directory's tokenizer, a CLIP / SigLIP image normalisation).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jaxtrain.models.embedder import RUNTIME, EmbedderConfig
from jaxtrain.models.registry import family_for_hf_dir

Params = dict[str, Any]
TOWER_FAMILIES = ("bert", "llama", "clip", "siglip")


def tower_family(path: str | os.PathLike[str]) -> str:
    """The text tower family (``'bert'``, ``'llama'``, ``'clip'``, ``'siglip'``) of a Hugging
    Face directory, from its ``config.json``'s ``model_type``; ValueError for another."""
    family = family_for_hf_dir(os.fspath(path))
    if family.name not in TOWER_FAMILIES:
        raise ValueError(f"{path}: a {family.title} directory (model family {family.name!r}) "
                         f"cannot be an embedder tower; towers come from {TOWER_FAMILIES}.")
    return family.name


def _fields(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME}


def _converter(name: str) -> Any:
    import importlib

    module = "jaxtrain.hf.llama_encoder" if name == "llama" else f"jaxtrain.hf.{name}"
    return importlib.import_module(module)


def load_hf(path: str | os.PathLike[str], **overrides: Any) -> tuple[EmbedderConfig, Params]:
    """``(EmbedderConfig, params as float32 numpy)`` of a bert / llama / qwen2 / mistral / clip /
    siglip directory; ``overrides`` are EmbedderConfig fields (pooling, text_max_len, ...)."""
    name = tower_family(path)
    cfg, p = _converter(name).load_hf(os.fspath(path))
    fields: dict[str, Any] = {"text_tower": name, "text": _fields(cfg)}
    if name in ("bert", "llama"):
        params: Params = {"text": p}
        if name == "bert":
            fields["text_max_len"] = min(512, cfg.max_position_embeddings)
        else:
            fields["text_max_len"] = 512
            fields["pooling"] = "last_token"
    else:
        image = _fields(cfg)
        fields.update(image_tower=name, image=image, text_max_len=cfg.text_max_len,
                      pooling="last_token")
        params = {"text": p["text_model"], "image": p["vision_model"],
                  "logit_scale": p["logit_scale"]}
        if "logit_bias" in p:
            params["logit_bias"] = p["logit_bias"]
            fields["logit_bias_init"] = float(p["logit_bias"])
        if name == "clip":
            fields["embed_dim"] = cfg.embed_dim
            params["text_projection"] = p["text_projection"]
            params["image_projection"] = p["visual_projection"]
    fields.update(overrides)
    return EmbedderConfig.from_dict(fields), params


def data_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.data`` settings the directory implies (its tower converter's)."""
    return dict(_converter(tower_family(path)).data_settings(os.fspath(path)))


def save_hf(path: str | os.PathLike[str], params: Any, cfg: EmbedderConfig,
            **extras: Any) -> None:
    """Write the text tower as its own Hugging Face directory (bert: ``BertModel``; llama: a
    base model, ``extras`` ``model_type='qwen2'`` etc.; ``tokenizer=``), which
    ``transformers.AutoModel`` loads: the tower's hidden states, before pooling and projection
    (the sentence-transformers export adds those). CLIP / SigLIP towers: export the run with
    ``model.name='clip'`` / ``'siglip'`` instead."""
    import flax.linen as nn

    if cfg.text_tower not in ("bert", "llama"):
        raise ValueError(f"save_hf writes bert or llama text towers; this embedder's is "
                         f"{cfg.text_tower!r}.")
    if cfg.image_tower != "none":
        raise ValueError(f"save_hf writes a text tower alone; this embedder also has a "
                         f"{cfg.image_tower!r} image tower.")
    _converter(cfg.text_tower).save_hf(path, nn.unbox(params)["text"], cfg.text_config,
                                       **extras)
