"""Hugging Face ``transformers`` CLIP checkpoints <-> :class:`jaxtrain.models.clip.CLIP`.

Supported: ``CLIPModel`` (``model_type`` ``clip``) in a local directory holding ``config.json``
and ``model.safetensors`` (or ``model.safetensors.index.json`` + shards), plus the optional
``preprocessor_config.json`` (``CLIPImageProcessor``) and tokenizer files. Pickled
``pytorch_model.bin`` checkpoints are never read. Not supported (``ValueError``): SigLIP,
Chinese-CLIP and other ``model_type``\\ s, single-tower checkpoints (``clip_vision_model``,
``clip_text_model``), projections with a bias, activations other than ``gelu`` (exact) /
``quick_gelu``, towers with different activations or LayerNorm epsilons.

Name mapping (T = ``text_model``, V = ``vision_model``, ``i`` = layer; D = tower width, N / Dh =
heads / head dim, F = intermediate size, E = ``projection_dim``, C = channels, P = patch size).
torch ``Linear`` weights are ``[out, in]``, Flax kernels ``[in, ...out]``; the patch conv goes
from torch ``[out, in, kh, kw]`` to Flax ``[kh, kw, in, out]``::

    Hugging Face                          shape         jaxtrain                          shape
    T.embeddings.token_embedding.weight   [V, D]        .../token_embedding/embedding     [V, D]
    *.embeddings.position_embedding.weight [L, D]       .../position_embedding/embedding  [L, D]
    V.embeddings.class_embedding          [D]           V/embeddings/class_embedding      [D]
    V.embeddings.patch_embedding.weight   [D, C, P, P]  .../patch_embedding/kernel   [P, P, C, D]
    V.pre_layrnorm, V.post_layernorm, T.final_layer_norm: .weight / .bias -> /scale / /bias
    per layer i, with L = "{T,V}.encoder.layers.{i}" and Q = "{T,V}/encoder/layers_{i}":
    L.layer_norm{1,2}.{weight,bias}       [D]           Q/layer_norm{1,2}/{scale,bias}    [D]
    L.self_attn.{q,k,v}_proj.weight       [D, D]        Q/self_attn/{q,k,v}_proj/kernel   [D, N, Dh]
    L.self_attn.{q,k,v}_proj.bias         [D]           Q/self_attn/{q,k,v}_proj/bias     [N, Dh]
    L.self_attn.out_proj.weight           [D, D]        Q/self_attn/out_proj/kernel       [N, Dh, D]
    L.self_attn.out_proj.bias             [D]           Q/self_attn/out_proj/bias         [D]
    L.mlp.fc1.weight, .bias               [F, D], [F]   Q/mlp/fc1/kernel, bias           [D, F], [F]
    L.mlp.fc2.weight, .bias               [D, F], [D]   Q/mlp/fc2/kernel, bias           [F, D], [D]
    {visual,text}_projection.weight       [E, D]        {visual,text}_projection/kernel   [D, E]
    logit_scale (log scale, as ours)      []            logit_scale                       []

``*.embeddings.position_ids`` buffers (in old checkpoints) are ignored. jaxtrain's optional
``logit_bias`` (SigLIP) has no Hugging Face CLIP counterpart: :func:`params_to_hf` refuses it
unless ``drop_logit_bias=True``.

Config mapping (``config.json`` -> :class:`ClipConfig`), ``text_config`` / ``vision_config``:
``hidden_size`` -> ``{text,vision}_width``, ``num_hidden_layers`` -> ``*_layers``,
``num_attention_heads`` -> ``*_heads``, ``intermediate_size`` -> ``*_mlp_ratio``
(= intermediate / hidden; ``round(width * ratio)`` gives it back exactly), ``hidden_act`` ->
``activation``, ``layer_norm_eps``, ``vocab_size``, ``max_position_embeddings`` ->
``text_max_len``, ``image_size``, ``patch_size``, ``num_channels`` -> ``channels``; top level:
``projection_dim`` -> ``embed_dim``, ``logit_scale_init_value`` -> ``init_temperature`` =
``exp(-value)`` (only used to initialise; the checkpoint holds the trained ``logit_scale``).
Keys a ``config.json`` leaves out take transformers' ``CLIPConfig`` defaults.

Text pooling, exactly as transformers' ``CLIPTextModel``: ``text_config.eos_token_id == 2``
(legacy, e.g. ``openai/clip-vit-base-patch32``) pools at the highest token id
(``text_pooling='argmax'``); any other id pools at its first occurrence (``text_pooling='eos'``,
``eos_token_id``). The padding ``attention_mask`` is not needed: the text tower is causal, so the
pooled token never attends to the (right) padding after it and its features are exact.
``pad_token_id`` / ``bos_token_id`` are not used by the model and not mapped. jaxtrain's default
``text_pooling='last'`` (last non-pad token) has no Hugging Face equivalent and is not exported.

Example::

    cfg, params = load_hf("/ckpt/clip-vit-base-patch32", dtype="bfloat16")
    emb = CLIP(cfg).apply({"params": params}, images_nhwc, method=CLIP.encode_image)
    prep = image_preprocessing_from_hf("/ckpt/clip-vit-base-patch32")  # resize, crop, mean, std
    tok = load_pretrained_tokenizer("/ckpt/clip-vit-base-patch32")  # jaxtrain.tokenizer_files
    save_hf("/tmp/export", params, cfg, image_preprocessing=prep, tokenizer=tok)

Images are NHWC for jaxtrain (transformers' ``pixel_values`` are NCHW).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxtrain.hf.files import (
    CONFIG,
    DEFAULT_MAX_SHARD_BYTES,
    cast_state,
    f32,
    flatten,
    mismatch_error,
    read_state,
    same,
    to_numpy,
    transpose,
    unsupported,
    write_json,
    write_state,
)
from jaxtrain.models.clip import ClipConfig
from jaxtrain.tokenizer_files import has_tokenizer_files

Params = dict[str, Any]

MODEL_TYPE = "clip"
_PREPROCESSOR = "preprocessor_config.json"
_IGNORED_KEY = re.compile(r"^(text|vision)_model\.embeddings\.position_ids$")
LEGACY_EOS_TOKEN_ID = 2  # transformers pools at argmax(input_ids) for this eos_token_id

# transformers' CLIPConfig defaults (used for keys a config.json leaves out).
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}  # fmt: skip
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
_TOP_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}
_ACTIVATIONS = ("gelu", "quick_gelu")  # the same functions in transformers' ACT2FN
_OTHER_MODEL_TYPES = {
    "siglip": "SigLIP (sigmoid loss, MAP-head pooling, different layer names)",
    "siglip2": "SigLIP 2",
    "chinese_clip": "Chinese-CLIP (a BERT text tower)",
    "clip_vision_model": "a vision-tower-only checkpoint (CLIPVisionModel[WithProjection])",
    "clip_text_model": "a text-tower-only checkpoint (CLIPTextModel[WithProjection])",
    "altclip": "AltCLIP (an XLM-R text tower)",
    "x_clip": "X-CLIP (video)",
    "clipseg": "CLIPSeg",
    "owlvit": "OWL-ViT",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# config.json <-> ClipConfig
# --------------------------------------------------------------------------------------------

def _sub_config(hf: Mapping[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``{tower}_config`` with transformers' defaults filled in (and the legacy
    ``{tower}_config_dict`` applied on top, as transformers does)."""
    out = dict(defaults)
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        sub = hf.get(key)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            raise unsupported(key, sub, "expected a dict")
        out.update({k: v for k, v in sub.items() if v is not None})
    return out


def _square(key: str, value: Any) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise unsupported(key, value, "only square images / patches are supported")
        value = value[0]
    return int(value)


def _mlp_ratio(key: str, intermediate: int, width: int) -> float:
    ratio = intermediate / width
    if int(round(width * ratio)) != intermediate:  # never for realistic sizes; checked anyway
        raise unsupported(key, intermediate, f"not representable as {width} * ratio")
    return ratio


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ClipConfig:
    """A :class:`ClipConfig` from a transformers ``CLIPModel`` ``config.json`` dict.

    ``overrides`` set other :class:`ClipConfig` fields (``dtype``, ``remat``,
    ``attention_impl``, ...) or replace converted ones. Raises ``ValueError`` naming the
    offending key and value for anything jaxtrain's CLIP cannot represent exactly.
    """
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        what = _OTHER_MODEL_TYPES.get(str(model_type), "")
        raise unsupported(
            "model_type", model_type,
            (f"{what} is not supported; " if what else "")
            + "jaxtrain converts transformers CLIPModel checkpoints only (model_type 'clip')")
    text = _sub_config(hf, "text", _TEXT_DEFAULTS)
    vision = _sub_config(hf, "vision", _VISION_DEFAULTS)
    top = {**_TOP_DEFAULTS, **{k: hf[k] for k in _TOP_DEFAULTS if hf.get(k) is not None}}

    for tower, sub in (("text", text), ("vision", vision)):
        if sub["hidden_act"] not in _ACTIVATIONS:
            raise unsupported(f"{tower}_config.hidden_act", sub["hidden_act"],
                               f"supported activations are {list(_ACTIVATIONS)}")
    if text["hidden_act"] != vision["hidden_act"]:
        raise unsupported("text_config.hidden_act", text["hidden_act"],
                           f"differs from vision_config.hidden_act={vision['hidden_act']!r}; "
                           "jaxtrain's CLIP uses one activation for both towers")
    if float(text["layer_norm_eps"]) != float(vision["layer_norm_eps"]):
        raise unsupported("text_config.layer_norm_eps", text["layer_norm_eps"],
                           f"differs from vision_config.layer_norm_eps="
                           f"{vision['layer_norm_eps']!r}; jaxtrain's CLIP uses one epsilon")

    eos = text["eos_token_id"]
    for key in ("text_config", "text_config_dict"):
        if isinstance(hf.get(key), Mapping) and "eos_token_id" in hf[key] \
                and hf[key]["eos_token_id"] is None:
            eos = None
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise unsupported("text_config.eos_token_id", eos,
                           "expected one int (the id the text tower pools at)")
    if eos == LEGACY_EOS_TOKEN_ID:
        pooling: dict[str, Any] = {"text_pooling": "argmax", "eos_token_id": None}
    else:
        pooling = {"text_pooling": "eos", "eos_token_id": eos}

    t_width, v_width = int(text["hidden_size"]), int(vision["hidden_size"])
    fields: dict[str, Any] = {
        "image_size": _square("vision_config.image_size", vision["image_size"]),
        "patch_size": _square("vision_config.patch_size", vision["patch_size"]),
        "channels": int(vision["num_channels"]),
        "vision_width": v_width,
        "vision_layers": int(vision["num_hidden_layers"]),
        "vision_heads": int(vision["num_attention_heads"]),
        "vision_mlp_ratio": _mlp_ratio("vision_config.intermediate_size",
                                       int(vision["intermediate_size"]), v_width),
        "vocab_size": int(text["vocab_size"]),
        "text_max_len": int(text["max_position_embeddings"]),
        "text_width": t_width,
        "text_layers": int(text["num_hidden_layers"]),
        "text_heads": int(text["num_attention_heads"]),
        "text_mlp_ratio": _mlp_ratio("text_config.intermediate_size",
                                     int(text["intermediate_size"]), t_width),
        "embed_dim": int(top["projection_dim"]),
        "init_temperature": math.exp(-float(top["logit_scale_init_value"])),
        "activation": text["hidden_act"],
        "layer_norm_eps": float(text["layer_norm_eps"]),
        **pooling,
    }
    return ClipConfig.from_dict({**fields, **overrides})


def _mlp_dim(cfg: ClipConfig, tower: str) -> int:
    return int(round(getattr(cfg, f"{tower}_width") * getattr(cfg, f"{tower}_mlp_ratio")))


def config_to_hf(cfg: ClipConfig) -> dict[str, Any]:
    """A transformers ``CLIPModel`` ``config.json`` dict for ``cfg``.

    Raises ``ValueError`` when Hugging Face's model would pool text differently: jaxtrain's
    default ``text_pooling='last'`` (last non-pad token) has no equivalent, and
    ``text_pooling='eos'`` cannot use ``eos_token_id=2`` (transformers' legacy argmax id).
    ``max_logit_scale``, ``logit_bias_init``, ``dtype``, ``remat`` and ``attention_impl`` have
    no counterpart and are not written.
    """
    if cfg.text_pooling == "last":
        raise ValueError(
            "cfg.text_pooling='last' (pool at the last non-pad token) has no Hugging Face CLIP "
            "equivalent: transformers pools at the first eos_token_id (or at the highest id when "
            "eos_token_id == 2). If every caption ends with an EOS token, export "
            "dataclasses.replace(cfg, text_pooling='eos', eos_token_id=<EOS id>) (the same "
            "pooled token), or text_pooling='argmax' if EOS is the highest id")
    if cfg.text_pooling == "eos":
        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            raise ValueError(
                f"cfg.text_pooling='eos' with eos_token_id={LEGACY_EOS_TOKEN_ID} cannot be "
                f"exported: transformers treats eos_token_id == {LEGACY_EOS_TOKEN_ID} as the "
                "legacy argmax pooling; use text_pooling='argmax' if EOS is the highest id")
        eos = cfg.eos_token_id
    else:
        eos = LEGACY_EOS_TOKEN_ID
    common = {
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": cfg.embed_dim,
    }
    text = {
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.text_width,
        "intermediate_size": _mlp_dim(cfg, "text"),
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "max_position_embeddings": cfg.text_max_len,
        "eos_token_id": eos,
        **common,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": cfg.vision_width,
        "intermediate_size": _mlp_dim(cfg, "vision"),
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "num_channels": cfg.channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        **common,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": MODEL_TYPE,
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": math.log(1.0 / cfg.init_temperature),
        "initializer_factor": 1.0,
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": "float32",  # transformers v4
        "dtype": "float32",  # v5
    }


# --------------------------------------------------------------------------------------------
# state dicts <-> parameter trees
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    hf: str  # name in the state dict
    path: tuple[str, ...]  # path in the Flax tree
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _copy(hf: str, path: tuple[str, ...], shape: tuple[int, ...]) -> _Entry:
    return _Entry(hf, path, shape, shape, same, same)


def _linear(hf: str, path: tuple[str, ...], d_in: int, d_out: int) -> _Entry:
    return _Entry(f"{hf}.weight", (*path, "kernel"), (d_out, d_in), (d_in, d_out),
                  transpose, transpose)


def _layer_norm(hf: str, path: tuple[str, ...], d: int) -> list[_Entry]:
    return [_copy(f"{hf}.weight", (*path, "scale"), (d,)),
            _copy(f"{hf}.bias", (*path, "bias"), (d,))]


def _tower_layers(cfg: ClipConfig, tower: str) -> list[_Entry]:
    d, n = getattr(cfg, f"{tower}_width"), getattr(cfg, f"{tower}_heads")
    dh, f = d // n, _mlp_dim(cfg, tower)
    out: list[_Entry] = []
    for i in range(getattr(cfg, f"{tower}_layers")):
        hf, path = f"{tower}_model.encoder.layers.{i}", (f"{tower}_model", "encoder", f"layers_{i}")
        out += _layer_norm(f"{hf}.layer_norm1", (*path, "layer_norm1"), d)
        for name in ("q_proj", "k_proj", "v_proj"):
            p, h = (*path, "self_attn", name), f"{hf}.self_attn.{name}"
            out.append(_Entry(f"{h}.weight", (*p, "kernel"), (d, d), (d, n, dh),
                              lambda w, d=d, n=n, dh=dh: w.T.reshape(d, n, dh),
                              lambda k, d=d: k.reshape(d, d).T))
            out.append(_Entry(f"{h}.bias", (*p, "bias"), (d,), (n, dh),
                              lambda b, n=n, dh=dh: b.reshape(n, dh),
                              lambda b, d=d: b.reshape(d)))
        p, h = (*path, "self_attn", "out_proj"), f"{hf}.self_attn.out_proj"
        out.append(_Entry(f"{h}.weight", (*p, "kernel"), (d, d), (n, dh, d),
                          lambda w, d=d, n=n, dh=dh: w.T.reshape(n, dh, d),
                          lambda k, d=d: k.reshape(d, d).T))
        out.append(_copy(f"{h}.bias", (*p, "bias"), (d,)))
        out += _layer_norm(f"{hf}.layer_norm2", (*path, "layer_norm2"), d)
        out.append(_linear(f"{hf}.mlp.fc1", (*path, "mlp", "fc1"), d, f))
        out.append(_copy(f"{hf}.mlp.fc1.bias", (*path, "mlp", "fc1", "bias"), (f,)))
        out.append(_linear(f"{hf}.mlp.fc2", (*path, "mlp", "fc2"), f, d))
        out.append(_copy(f"{hf}.mlp.fc2.bias", (*path, "mlp", "fc2", "bias"), (d,)))
    return out


def _entries(cfg: ClipConfig) -> list[_Entry]:
    dt, dv, e, c, p = cfg.text_width, cfg.vision_width, cfg.embed_dim, cfg.channels, cfg.patch_size
    tm, vm = "text_model", "vision_model"
    return [
        _copy("logit_scale", ("logit_scale",), ()),
        _copy(f"{tm}.embeddings.token_embedding.weight",
              (tm, "embeddings", "token_embedding", "embedding"), (cfg.vocab_size, dt)),
        _copy(f"{tm}.embeddings.position_embedding.weight",
              (tm, "embeddings", "position_embedding", "embedding"), (cfg.text_max_len, dt)),
        *_tower_layers(cfg, "text"),
        *_layer_norm(f"{tm}.final_layer_norm", (tm, "final_layer_norm"), dt),
        _copy(f"{vm}.embeddings.class_embedding", (vm, "embeddings", "class_embedding"), (dv,)),
        _Entry(f"{vm}.embeddings.patch_embedding.weight",
               (vm, "embeddings", "patch_embedding", "kernel"), (dv, c, p, p), (p, p, c, dv),
               lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
        _copy(f"{vm}.embeddings.position_embedding.weight",
              (vm, "embeddings", "position_embedding", "embedding"), (cfg.num_patches + 1, dv)),
        *_layer_norm(f"{vm}.pre_layrnorm", (vm, "pre_layrnorm"), dv),
        *_tower_layers(cfg, "vision"),
        *_layer_norm(f"{vm}.post_layernorm", (vm, "post_layernorm"), dv),
        _linear("visual_projection", ("visual_projection",), dv, e),
        _linear("text_projection", ("text_projection",), dt, e),
    ]


def params_from_hf(state: Mapping[str, Any], cfg: ClipConfig) -> Params:
    """The unboxed Flax parameter tree of :class:`CLIP` (float32 numpy arrays) from a
    transformers ``CLIPModel`` state dict (``logit_bias`` is never created). Arrays may be
    (transposed) views of ``state``'s float32 arrays. Raises ``ValueError`` listing missing /
    unexpected keys and shape mismatches (with the expected shapes)."""
    biased = [n for n in ("visual_projection.bias", "text_projection.bias") if n in state]
    if biased:
        raise ValueError(f"Hugging Face state dict has projection biases ({', '.join(biased)}): "
                         "CLIP's visual/text projections have no bias in transformers' CLIPModel "
                         "nor in jaxtrain; this checkpoint is not a CLIPModel")
    entries = {e.hf: e for e in _entries(cfg)}
    missing = [n for n in entries if n not in state]
    unexpected = [n for n in state if n not in entries and not _IGNORED_KEY.match(n)]
    shapes = [f"{n}: got {list(np.shape(state[n]))}, expected {list(e.hf_shape)}"
              for n, e in entries.items() if n in state and tuple(np.shape(state[n])) != e.hf_shape]
    if missing or unexpected or shapes:
        raise mismatch_error("Hugging Face state dict", "the CLIP config", missing, unexpected,
                             shapes)

    params: Params = {}
    for name, e in entries.items():
        tree = params
        for key in e.path[:-1]:
            tree = tree.setdefault(key, {})
        tree[e.path[-1]] = e.to_jax(np.asarray(state[name], dtype=np.float32))
    return params


def params_to_hf(params: Any, cfg: ClipConfig, drop_logit_bias: bool = False
                 ) -> dict[str, np.ndarray]:
    """The transformers ``CLIPModel`` state dict (float32, C-contiguous numpy) of a
    :class:`CLIP` parameter tree (boxed or unboxed, jax or numpy). Inverse of
    :func:`params_from_hf`.

    A ``logit_bias`` parameter (SigLIP-style training) has no place in Hugging Face's CLIP and
    raises ``ValueError`` unless ``drop_logit_bias=True`` (the exported model then scores
    pairs without it).
    """
    import flax.linen as nn

    flat = flatten(nn.unbox(params))
    if ("logit_bias",) in flat:
        if not drop_logit_bias:
            raise ValueError(
                "the parameters have a 'logit_bias' (SigLIP-style sigmoid loss), which Hugging "
                "Face's CLIPModel does not have; pass drop_logit_bias=True to export without it "
                "(image/text features are unaffected; only the pair logits lose the bias)")
        flat = {k: v for k, v in flat.items() if k != ("logit_bias",)}
    entries = {e.path: e for e in _entries(cfg)}
    missing = ["/".join(p) for p in entries if p not in flat]
    unexpected = ["/".join(p) for p in flat if p not in entries]
    shapes = [f"{'/'.join(p)}: got {list(np.shape(flat[p]))}, expected {list(e.shape)}"
              for p, e in entries.items() if p in flat and tuple(np.shape(flat[p])) != e.shape]
    if missing or unexpected or shapes:
        raise mismatch_error("jaxtrain parameter tree", "the CLIP config", missing, unexpected,
                             shapes)
    return {e.hf: f32(e.to_hf(to_numpy(flat[p]))) for p, e in entries.items()}


# --------------------------------------------------------------------------------------------
# image preprocessing (preprocessor_config.json)
# --------------------------------------------------------------------------------------------

# PIL.Image.Resampling codes, as stored in CLIPImageProcessor's "resample".
PIL_RESAMPLE: dict[int, str] = {
    0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming",
}
# CLIPImageProcessor's defaults (OpenAI CLIP's normalisation).
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSING_KEYS = ("image_resize", "image_crop", "image_mean", "image_std",
                      "image_interpolation")


def _edge(file: str, key: str, value: Any, edge: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # legacy: a bare int
    if isinstance(value, Mapping):
        if edge == "shortest_edge" and set(value) == {"shortest_edge"}:
            return int(value[edge])
        if edge == "height" and set(value) == {"height", "width"} \
                and value["height"] == value["width"]:
            return int(value["height"])
    want = "{'shortest_edge': N}" if edge == "shortest_edge" else "{'height': N, 'width': N}"
    raise ValueError(f"{file}: unsupported {key}={value!r}; expected {want} (CLIP resizes the "
                     "shorter side, then center-crops a square)")


def _channels(file: str, key: str, value: Any) -> list[float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)] * 3
    if isinstance(value, list | tuple) and len(value) == 3:
        return [float(v) for v in value]
    raise ValueError(f"{file}: {key}={value!r} must be 3 numbers (one per RGB channel)")


def image_preprocessing_from_hf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The image preprocessing of a ``CLIPImageProcessor`` ``preprocessor_config.json`` in
    directory ``path``, as ``{"image_resize": int (shorter side), "image_crop": int (square
    center crop), "image_mean": [3 floats], "image_std": [3 floats], "image_interpolation":
    "bicubic" | "bilinear" | "nearest" | "lanczos" | "box" | "hamming"}``. Mean / std apply to
    pixels scaled to [0, 1] (``do_normalize: false`` gives mean 0, std 1); keys the file leaves
    out take ``CLIPImageProcessor``'s defaults (224, 224, OpenAI's mean / std, bicubic). Raises
    ``ValueError`` for processors that do not resize-the-shorter-side-then-center-crop."""
    file = os.path.join(os.fspath(path), _PREPROCESSOR)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist; save the processor with "
                                "CLIPImageProcessor.save_pretrained(path) (or pass the "
                                "preprocessing settings yourself)")
    with open(file) as f:
        hf = json.load(f)
    for flag in ("do_resize", "do_center_crop", "do_rescale"):
        if hf.get(flag, True) is False:
            raise ValueError(f"{file}: {flag}=false is not supported (CLIP preprocessing "
                             "resizes, center-crops and scales pixels to [0, 1])")
    factor = hf.get("rescale_factor", 1 / 255)
    if not math.isclose(float(factor), 1 / 255, rel_tol=1e-6):
        raise ValueError(f"{file}: rescale_factor={factor!r} is not supported (expected 1/255: "
                         "pixels scaled to [0, 1])")
    resample = hf.get("resample", 3)
    if isinstance(resample, str) and resample.lower() in PIL_RESAMPLE.values():
        interpolation = resample.lower()
    elif isinstance(resample, int) and resample in PIL_RESAMPLE:
        interpolation = PIL_RESAMPLE[resample]
    else:
        raise ValueError(f"{file}: unknown resample={resample!r}; expected a PIL resampling "
                         f"code {PIL_RESAMPLE}")
    normalize = hf.get("do_normalize", True)
    return {
        "image_resize": _edge(file, "size", hf.get("size", 224), "shortest_edge"),
        "image_crop": _edge(file, "crop_size", hf.get("crop_size", 224), "height"),
        "image_mean": (_channels(file, "image_mean", hf.get("image_mean", OPENAI_CLIP_MEAN))
                       if normalize else [0.0] * 3),
        "image_std": (_channels(file, "image_std", hf.get("image_std", OPENAI_CLIP_STD))
                      if normalize else [1.0] * 3),
        "image_interpolation": interpolation,
    }


def data_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.data`` settings the directory implies: ``tokenizer`` (the directory itself)
    when it holds tokenizer files, and the image preprocessing of its
    ``preprocessor_config.json`` (:func:`image_preprocessing_from_hf`) when it has one."""
    path = os.fspath(path)
    out: dict[str, Any] = {"tokenizer": path} if has_tokenizer_files(path) else {}
    if os.path.isfile(os.path.join(path, _PREPROCESSOR)):
        out.update(image_preprocessing_from_hf(path))
    return out


def image_preprocessing_to_hf(prep: Mapping[str, Any]) -> dict[str, Any]:
    """The ``CLIPImageProcessor`` ``preprocessor_config.json`` dict for a preprocessing dict
    as returned by :func:`image_preprocessing_from_hf` (exactly its keys)."""
    missing = [k for k in PREPROCESSING_KEYS if k not in prep]
    unknown = sorted(set(prep) - set(PREPROCESSING_KEYS))
    if missing or unknown:
        raise ValueError(f"image_preprocessing must have exactly the keys "
                         f"{list(PREPROCESSING_KEYS)}; missing {missing}, unknown {unknown}")
    codes = {v: k for k, v in PIL_RESAMPLE.items()}
    if prep["image_interpolation"] not in codes:
        raise ValueError(f"image_preprocessing['image_interpolation']="
                         f"{prep['image_interpolation']!r}; expected one of {list(codes)}")
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": int(prep["image_resize"])},
        "resample": codes[prep["image_interpolation"]],
        "do_center_crop": True,
        "crop_size": {"height": int(prep["image_crop"]), "width": int(prep["image_crop"])},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _channels("image_preprocessing", "image_mean", prep["image_mean"]),
        "image_std": _channels("image_preprocessing", "image_std", prep["image_std"]),
    }


# --------------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------------

def _checkpoint_dir(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path} does not exist (pass "
                                "a local directory; download with huggingface_hub first)")
    return path


def load_hf(path: str | os.PathLike[str], **overrides: Any) -> tuple[ClipConfig, Params]:
    """``(config, params)`` from a local transformers ``CLIPModel`` directory (``config.json``
    + ``model.safetensors`` or a sharded ``model.safetensors.index.json``). Weights are float32
    numpy arrays; ``overrides`` are :class:`ClipConfig` fields (``dtype='bfloat16'``, ...)."""
    path = _checkpoint_dir(path)
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: {path} is not a transformers "
                                "checkpoint directory")
    with open(config_path) as f:
        hf = json.load(f)
    try:
        cfg = config_from_hf(hf, **overrides)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e
    state = read_state(path, "CLIPModel")
    try:
        params = params_from_hf(state, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return cfg, params



def _check_tokenizer(tokenizer: Any, cfg: ClipConfig) -> None:
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer (with save_pretrained); "
                        f"got {type(tokenizer).__name__}")
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size "
                         f"is {cfg.vocab_size}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if cfg.text_pooling == "eos" and eos is not None and eos != cfg.eos_token_id:
        raise ValueError(f"the tokenizer's eos_token_id ({eos}) differs from the config's "
                         f"eos_token_id ({cfg.eos_token_id}) that the text tower pools at")


def save_hf(
    path: str | os.PathLike[str],
    params: Any,
    cfg: ClipConfig,
    *,
    image_preprocessing: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    drop_logit_bias: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: str = "float32",
) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (or shards +
    ``model.safetensors.index.json`` when larger than ``max_shard_bytes``) to ``path``, the
    weights in ``dtype`` ('float32', 'bfloat16' or 'float16'; config.json's ``torch_dtype`` /
    ``dtype`` say which), loadable
    with ``transformers.CLIPModel.from_pretrained(path)``; plus ``preprocessor_config.json``
    from ``image_preprocessing`` (the dict of :func:`image_preprocessing_from_hf`) and the
    ``tokenizer``'s files (``tokenizer.save_pretrained(path)``) when given. ``params`` may be
    boxed or unboxed, jax or numpy; ``drop_logit_bias`` as in :func:`params_to_hf`. Everything
    is validated before anything is written; stale weight files in ``path`` are removed. In a
    multi-process job call it from one process (after gathering is done)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0; got {max_shard_bytes}")
    hf = config_to_hf(cfg)
    state = cast_state(params_to_hf(params, cfg, drop_logit_bias=drop_logit_bias), dtype)
    hf.update(torch_dtype=dtype, dtype=dtype)
    preprocessor = None
    if image_preprocessing is not None:
        preprocessor = image_preprocessing_to_hf(image_preprocessing)
        if image_preprocessing["image_crop"] != cfg.image_size:
            raise ValueError(f"image_preprocessing['image_crop']="
                             f"{image_preprocessing['image_crop']} must equal the model's "
                             f"image_size ({cfg.image_size})")
    if tokenizer is not None:
        _check_tokenizer(tokenizer, cfg)

    path = os.fspath(path)
    write_state(path, state, max_shard_bytes)
    write_json(os.path.join(path, CONFIG), hf)
    if preprocessor is not None:
        write_json(os.path.join(path, _PREPROCESSOR), preprocessor)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def transformers_outputs(path: str | os.PathLike[str], cfg: ClipConfig, params: Any,
                         seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ours, transformers'): the L2-normalised ``image_embeds`` / ``text_embeds`` of this model
    (``cfg``, ``params``, in float32) and of ``transformers.CLIPModel`` loaded from ``path``
    (written by :func:`save_hf`), for the same random images and caption-like token rows: how an
    export checks its Hugging Face directory. Needs torch."""
    import jax
    import torch
    import transformers

    from jaxtrain.models.clip import CLIP

    rng = np.random.default_rng(seed)
    b, t = 2, cfg.text_max_len
    images = rng.standard_normal((b, cfg.image_size, cfg.image_size, cfg.channels))
    images = images.astype(np.float32)
    # caption-like rows: bos, words, the pooled token, padding. 'argmax' pools at the highest
    # id (the last vocabulary id here), 'eos' at eos_token_id (save_hf refuses other poolings)
    v = max(cfg.vocab_size, 4)
    end = v - 1 if cfg.text_pooling == "argmax" else cfg.eos_token_id
    tokens = np.zeros((b, t), np.int32)
    for i, n in enumerate((t, max(t // 2, 2))):
        words = rng.integers(1, v - 1, n - 2)
        words[words == end] = 1
        tokens[i, :n] = [1, *words, end]
    f32 = dataclasses.replace(cfg, dtype="float32", attention_impl=None)
    out = jax.jit(CLIP(f32).apply)({"params": params}, images, tokens)
    model = transformers.CLIPModel.from_pretrained(os.fspath(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)))
        txt = model.get_text_features(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                                      attention_mask=torch.as_tensor(tokens != 0))
    img, txt = (getattr(x, "pooler_output", x).numpy() for x in (img, txt))
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return ({"image_embeds": np.asarray(out["image_embeds"]),
             "text_embeds": np.asarray(out["text_embeds"])},
            {"image_embeds": norm(img), "text_embeds": norm(txt)})


