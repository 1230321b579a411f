"""Hugging Face ``transformers`` SigLIP checkpoints <-> :class:`jaxtrain.models.siglip.Siglip`.

Supported: ``SiglipModel`` (``model_type`` ``siglip``) in a local directory holding
``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``), plus
the optional ``preprocessor_config.json`` (``SiglipImageProcessor``) and tokenizer files.
Pickled weights are never read. Not supported (``ValueError`` naming the key): SigLIP 2
(``siglip2``: NaFlex patches), single-tower checkpoints (``siglip_vision_model``,
``siglip_text_model``), ``vision_use_head: false``, a text ``projection_size`` other than the
vision width (the two embeddings could not be compared), towers with different activations or
LayerNorm epsilons, non-square images / patches.

Name mapping (T = ``text_model``, V = ``vision_model``; D = tower width, N / Dh = heads / head
dim, F = intermediate size, C = channels, P = patch size, E = the vision width). torch ``Linear``
weights are ``[out, in]``, Flax kernels ``[in, ...out]``; the patch conv goes from torch
``[out, in, kh, kw]`` to Flax ``[kh, kw, in, out]``::

    Hugging Face                              shape          jaxtrain                      shape
    T.embeddings.token_embedding.weight       [V, D]         T/embeddings/token_embedding/embedding
    T.embeddings.position_embedding.weight    [L, D]         T/embeddings/position_embedding/...
    V.embeddings.patch_embedding.weight, .bias [D, C, P, P]  V/embeddings/patch_embedding/kernel
                                                                               [P, P, C, D], bias
    V.embeddings.position_embedding.weight    [P', D]        V/embeddings/position_embedding/...
    {T,V}.encoder.layers.{i}.*  (as CLIP: layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
                                 mlp.fc1, mlp.fc2)            {T,V}/encoder/layers_{i}/...
    T.final_layer_norm, V.post_layernorm, V.head.layernorm: .weight/.bias -> /scale, /bias
    T.head.weight, .bias                      [E, D], [E]    T/head/kernel, bias        [D, E]
    V.head.probe                              [1, 1, E]      V/head/probe               [1, 1, E]
    V.head.attention.in_proj_weight, _bias    [3E, E], [3E]  V/head/attention/{q,k,v}_proj
                                              (rows q; k; v)        kernel [E, N, Dh], bias [N, Dh]
    V.head.attention.out_proj.weight, .bias   [E, E], [E]    V/head/attention/out_proj  [N, Dh, E]
    V.head.mlp.fc{1,2}                                       V/head/mlp/fc{1,2}
    logit_scale, logit_bias                   [1]            logit_scale, logit_bias    []

Config mapping (``config.json`` -> :class:`SiglipConfig`), per tower: ``hidden_size`` ->
``{text,vision}_width``, ``num_hidden_layers`` -> ``*_layers``, ``num_attention_heads`` ->
``*_heads``, ``intermediate_size`` -> ``*_mlp_dim``, ``hidden_act`` -> ``activation``,
``layer_norm_eps``; text: ``vocab_size``, ``max_position_embeddings`` -> ``text_max_len``;
vision: ``image_size``, ``patch_size``, ``num_channels`` -> ``channels``. Keys a ``config.json``
leaves out take transformers' defaults. The text tower pools at the last position (SigLIP pads
every text to ``max_position_embeddings`` with its pad id), so ``pad_token_id`` /
``eos_token_id`` are not needed by the model.

Image preprocessing (``SiglipImageProcessor``): resize to ``size.height x size.width`` (no
aspect-preserving resize, no crop), rescale by 1/255, normalise with mean = std = 0.5 by default.
jaxtrain's data side does the same with ``data.image_resize_mode = 'squash'``, which
:func:`data_settings` sets (the default ``'shorter_crop'`` would centre-crop non-square images).

Example::

    cfg, params = load_hf("/ckpt/siglip-base-patch16-224")
    img = Siglip(cfg).apply({"params": params}, images_nhwc, method=Siglip.encode_image)
    vision_only = SiglipVision(cfg).apply({"params": params["vision_model"]}, images_nhwc)
    save_hf("/tmp/export", params, cfg, image_preprocessing=data_settings(path)...)
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
from jaxtrain.models.layers import get_activation
from jaxtrain.models.siglip import SiglipConfig
from jaxtrain.tokenizer_files import has_tokenizer_files

Params = dict[str, Any]

MODEL_TYPE = "siglip"
PREPROCESSOR = "preprocessor_config.json"
_IGNORED_KEY = re.compile(r"^(text|vision)_model\.embeddings\.position_ids$")
_IN_PROJ = "vision_model.head.attention.in_proj_"

# transformers' SiglipTextConfig / SiglipVisionConfig defaults (for keys config.json leaves out)
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "projection_size": None,
}  # fmt: skip
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True,
}  # fmt: skip
_OTHER_MODEL_TYPES = {
    "siglip2": "SigLIP 2 (NaFlex variable-resolution patches)",
    "siglip_vision_model": "a vision-tower-only checkpoint (SiglipVisionModel)",
    "siglip_text_model": "a text-tower-only checkpoint (SiglipTextModel)",
    "clip": "CLIP (model.name='clip' reads it)",
}
# PIL.Image.Resampling codes, as stored in an image processor's "resample".
PIL_RESAMPLE: dict[int, str] = {
    0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming",
}
SIGLIP_MEAN = [0.5, 0.5, 0.5]  # SiglipImageProcessor's defaults (IMAGENET_STANDARD_*)
SIGLIP_STD = [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------------------------
# config.json <-> SiglipConfig
# --------------------------------------------------------------------------------------------

def _sub_config(hf: Mapping[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    sub = hf.get(f"{tower}_config")
    if sub is not None:
        if not isinstance(sub, Mapping):
            raise unsupported(f"{tower}_config", sub, "expected a dict")
        out.update({k: v for k, v in sub.items() if v is not None})
    return out


def _square(key: str, value: Any) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise unsupported(key, value, "only square images / patches are supported")
        value = value[0]
    return int(value)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> SiglipConfig:
    """A :class:`SiglipConfig` from a transformers ``SiglipModel`` ``config.json`` dict;
    ``overrides`` set other fields (``dtype``, ``remat``, ...). ``ValueError`` naming the key for
    anything jaxtrain's SigLIP cannot represent exactly."""
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        what = _OTHER_MODEL_TYPES.get(str(model_type), "")
        raise unsupported("model_type", model_type,
                          (f"{what} is not supported; " if what else "")
                          + "jaxtrain.hf.siglip converts transformers SiglipModel checkpoints "
                          "only (model_type 'siglip')")
    text = _sub_config(hf, "text", _TEXT_DEFAULTS)
    vision = _sub_config(hf, "vision", _VISION_DEFAULTS)
    if not vision["vision_use_head"]:
        raise unsupported("vision_config.vision_use_head", False,
                          "SiglipModel's image embedding is the attention-pooling head's output")
    act = text["hidden_act"]
    try:
        get_activation(act)
    except ValueError as e:
        raise unsupported("text_config.hidden_act", act, str(e)) from None
    if vision["hidden_act"] != act:
        raise unsupported("vision_config.hidden_act", vision["hidden_act"],
                          f"differs from text_config.hidden_act={act!r}; jaxtrain's SigLIP uses "
                          "one activation for both towers")
    if float(vision["layer_norm_eps"]) != float(text["layer_norm_eps"]):
        raise unsupported("vision_config.layer_norm_eps", vision["layer_norm_eps"],
                          f"differs from text_config.layer_norm_eps={text['layer_norm_eps']!r}; "
                          "jaxtrain's SigLIP uses one epsilon")
    v_width = int(vision["hidden_size"])
    projection = text["projection_size"]
    if projection is not None and int(projection) != v_width:
        raise unsupported("text_config.projection_size", projection,
                          f"must equal vision_config.hidden_size ({v_width}): the text and image "
                          "embeddings are compared by a dot product")
    fields: dict[str, Any] = {
        "image_size": _square("vision_config.image_size", vision["image_size"]),
        "patch_size": _square("vision_config.patch_size", vision["patch_size"]),
        "channels": int(vision["num_channels"]),
        "vision_width": v_width,
        "vision_layers": int(vision["num_hidden_layers"]),
        "vision_heads": int(vision["num_attention_heads"]),
        "vision_mlp_dim": int(vision["intermediate_size"]),
        "vocab_size": int(text["vocab_size"]),
        "text_max_len": int(text["max_position_embeddings"]),
        "text_width": int(text["hidden_size"]),
        "text_layers": int(text["num_hidden_layers"]),
        "text_heads": int(text["num_attention_heads"]),
        "text_mlp_dim": int(text["intermediate_size"]),
        "activation": act,
        "layer_norm_eps": float(text["layer_norm_eps"]),
    }
    return SiglipConfig.from_dict({**fields, **overrides})


def config_to_hf(cfg: SiglipConfig, *, pad_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict[str, Any]:
    """A transformers ``SiglipModel`` ``config.json`` dict for ``cfg`` (``init_temperature``,
    ``logit_bias_init``, ``max_logit_scale`` and the runtime fields have no counterpart; the
    checkpoint holds the trained ``logit_scale`` / ``logit_bias``). ``pad_token_id`` /
    ``eos_token_id``: the tokenizer's, written to ``text_config`` (unused by the model)."""
    common = {"hidden_act": cfg.activation, "layer_norm_eps": cfg.layer_norm_eps,
              "attention_dropout": 0.0}
    text = {
        "model_type": "siglip_text_model", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.text_width, "intermediate_size": cfg.text_mlp_dim,
        "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
        "max_position_embeddings": cfg.text_max_len, "projection_size": cfg.vision_width,
        **common,
    }
    text.update({k: v for k, v in (("pad_token_id", pad_token_id),
                                   ("eos_token_id", eos_token_id)) if v is not None})
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": cfg.vision_width,
        "intermediate_size": cfg.vision_mlp_dim, "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads, "num_channels": cfg.channels,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "vision_use_head": True,
        **common,
    }
    return {"architectures": ["SiglipModel"], "model_type": MODEL_TYPE, "text_config": text,
            "vision_config": vision, "initializer_factor": 1.0, "torch_dtype": "float32",
            "dtype": "float32"}


# --------------------------------------------------------------------------------------------
# state dicts <-> parameter trees
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    hf: str  # name in the state dict (the head's in_proj split into q/k/v_proj: _split_in_proj)
    path: tuple[str, ...]  # path in the Flax tree
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _copy(hf: str, path: tuple[str, ...], shape: tuple[int, ...]) -> _Entry:
    return _Entry(hf, path, shape, shape, same, same)


def _scalar(name: str) -> _Entry:
    return _Entry(name, (name,), (1,), (), lambda x: x.reshape(()), lambda x: x.reshape(1))


def _linear(hf: str, path: tuple[str, ...], d_in: int, d_out: int) -> list[_Entry]:
    return [_Entry(f"{hf}.weight", (*path, "kernel"), (d_out, d_in), (d_in, d_out),
                   transpose, transpose),
            _copy(f"{hf}.bias", (*path, "bias"), (d_out,))]


def _layer_norm(hf: str, path: tuple[str, ...], d: int) -> list[_Entry]:
    return [_copy(f"{hf}.weight", (*path, "scale"), (d,)),
            _copy(f"{hf}.bias", (*path, "bias"), (d,))]


def _attention(hf: str, path: tuple[str, ...], d: int, n: int) -> list[_Entry]:
    """{q,k,v,out}_proj of a multi-head attention of width d with n heads."""
    dh = d // n
    out: list[_Entry] = []
    for name in ("q_proj", "k_proj", "v_proj"):
        p, h = (*path, name), f"{hf}.{name}"
        out.append(_Entry(f"{h}.weight", (*p, "kernel"), (d, d), (d, n, dh),
                          lambda w, d=d, n=n, dh=dh: w.T.reshape(d, n, dh),
                          lambda k, d=d: k.reshape(d, d).T))
        out.append(_Entry(f"{h}.bias", (*p, "bias"), (d,), (n, dh),
                          lambda b, n=n, dh=dh: b.reshape(n, dh), lambda b, d=d: b.reshape(d)))
    p, h = (*path, "out_proj"), f"{hf}.out_proj"
    out.append(_Entry(f"{h}.weight", (*p, "kernel"), (d, d), (n, dh, d),
                      lambda w, d=d, n=n, dh=dh: w.T.reshape(n, dh, d),
                      lambda k, d=d: k.reshape(d, d).T))
    out.append(_copy(f"{h}.bias", (*p, "bias"), (d,)))
    return out


def _mlp(hf: str, path: tuple[str, ...], d: int, f: int) -> list[_Entry]:
    return [*_linear(f"{hf}.fc1", (*path, "fc1"), d, f),
            *_linear(f"{hf}.fc2", (*path, "fc2"), f, d)]


def _tower_layers(cfg: SiglipConfig, tower: str) -> list[_Entry]:
    d, n = getattr(cfg, f"{tower}_width"), getattr(cfg, f"{tower}_heads")
    f = getattr(cfg, f"{tower}_mlp_dim")
    out: list[_Entry] = []
    for i in range(getattr(cfg, f"{tower}_layers")):
        hf, path = f"{tower}_model.encoder.layers.{i}", (f"{tower}_model", "encoder", f"layers_{i}")
        out += _layer_norm(f"{hf}.layer_norm1", (*path, "layer_norm1"), d)
        out += _attention(f"{hf}.self_attn", (*path, "self_attn"), d, n)
        out += _layer_norm(f"{hf}.layer_norm2", (*path, "layer_norm2"), d)
        out += _mlp(f"{hf}.mlp", (*path, "mlp"), d, f)
    return out


def _entries(cfg: SiglipConfig) -> list[_Entry]:
    dt, dv, c, p = cfg.text_width, cfg.vision_width, cfg.channels, cfg.patch_size
    tm, vm = "text_model", "vision_model"
    return [
        _scalar("logit_scale"),
        _scalar("logit_bias"),
        _copy(f"{tm}.embeddings.token_embedding.weight",
              (tm, "embeddings", "token_embedding", "embedding"), (cfg.vocab_size, dt)),
        _copy(f"{tm}.embeddings.position_embedding.weight",
              (tm, "embeddings", "position_embedding", "embedding"), (cfg.text_max_len, dt)),
        *_tower_layers(cfg, "text"),
        *_layer_norm(f"{tm}.final_layer_norm", (tm, "final_layer_norm"), dt),
        *_linear(f"{tm}.head", (tm, "head"), dt, dv),
        _Entry(f"{vm}.embeddings.patch_embedding.weight",
               (vm, "embeddings", "patch_embedding", "kernel"), (dv, c, p, p), (p, p, c, dv),
               lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
        _copy(f"{vm}.embeddings.patch_embedding.bias",
              (vm, "embeddings", "patch_embedding", "bias"), (dv,)),
        _copy(f"{vm}.embeddings.position_embedding.weight",
              (vm, "embeddings", "position_embedding", "embedding"), (cfg.num_patches, dv)),
        *_tower_layers(cfg, "vision"),
        *_layer_norm(f"{vm}.post_layernorm", (vm, "post_layernorm"), dv),
        _copy(f"{vm}.head.probe", (vm, "head", "probe"), (1, 1, dv)),
        *_attention(f"{vm}.head.attention", (vm, "head", "attention"), dv, cfg.vision_heads),
        *_layer_norm(f"{vm}.head.layernorm", (vm, "head", "layernorm"), dv),
        *_mlp(f"{vm}.head.mlp", (vm, "head", "mlp"), dv, cfg.vision_mlp_dim),
    ]


def _split_in_proj(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with torch ``MultiheadAttention``'s packed ``in_proj_weight`` [3E, E] /
    ``in_proj_bias`` [3E] (rows: q, k, v) of the pooling head as ``{q,k,v}_proj.{weight,bias}``."""
    out = dict(state)
    for kind in ("weight", "bias"):
        packed = out.pop(f"{_IN_PROJ}{kind}", None)
        if packed is None:
            continue
        packed = np.asarray(packed)
        if packed.shape[0] % 3:
            raise ValueError(f"{_IN_PROJ}{kind} has shape {list(packed.shape)}; its first axis "
                             "must stack q, k and v (a multiple of 3)")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(packed, 3), strict=True):
            out[f"vision_model.head.attention.{name}.{kind}"] = part
    return out


def _pack_in_proj(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`_split_in_proj`."""
    out = dict(state)
    for kind in ("weight", "bias"):
        parts = [out.pop(f"vision_model.head.attention.{n}.{kind}")
                 for n in ("q_proj", "k_proj", "v_proj")]
        out[f"{_IN_PROJ}{kind}"] = np.ascontiguousarray(np.concatenate(parts, axis=0))
    return out


def params_from_hf(state: Mapping[str, Any], cfg: SiglipConfig) -> Params:
    """The unboxed Flax parameter tree of :class:`Siglip` (float32 numpy) from a transformers
    ``SiglipModel`` state dict. ``ValueError`` listing missing / unexpected keys and shape
    mismatches (with the expected shapes)."""
    state = _split_in_proj(state)
    entries = {e.hf: e for e in _entries(cfg)}
    missing = [n for n in entries if n not in state]
    unexpected = [n for n in state if n not in entries and not _IGNORED_KEY.match(n)]
    shapes = [f"{n}: got {list(np.shape(state[n]))}, expected {list(e.hf_shape)}"
              for n, e in entries.items() if n in state and tuple(np.shape(state[n])) != e.hf_shape]
    if missing or unexpected or shapes:
        raise mismatch_error("Hugging Face state dict", "the SigLIP config", missing, unexpected,
                             shapes)
    params: Params = {}
    for name, e in entries.items():
        tree = params
        for key in e.path[:-1]:
            tree = tree.setdefault(key, {})
        tree[e.path[-1]] = e.to_jax(np.asarray(state[name], dtype=np.float32))
    return params


def params_to_hf(params: Any, cfg: SiglipConfig) -> dict[str, np.ndarray]:
    """The transformers ``SiglipModel`` state dict (float32 numpy) of a :class:`Siglip`
    parameter tree (boxed or unboxed, jax or numpy). Inverse of :func:`params_from_hf`."""
    import flax.linen as nn

    flat = flatten(nn.unbox(params))
    entries = {e.path: e for e in _entries(cfg)}
    missing = ["/".join(p) for p in entries if p not in flat]
    unexpected = ["/".join(p) for p in flat if p not in entries]
    shapes = [f"{'/'.join(p)}: got {list(np.shape(flat[p]))}, expected {list(e.shape)}"
              for p, e in entries.items() if p in flat and tuple(np.shape(flat[p])) != e.shape]
    if missing or unexpected or shapes:
        raise mismatch_error("jaxtrain parameter tree", "the SigLIP config", missing, unexpected,
                             shapes)
    state = {e.hf: f32(e.to_hf(to_numpy(flat[p]))) for p, e in entries.items()}
    return {k: np.ascontiguousarray(v) if v.ndim else v for k, v in _pack_in_proj(state).items()}


# --------------------------------------------------------------------------------------------
# image preprocessing (preprocessor_config.json)
# --------------------------------------------------------------------------------------------

def _channels(file: str, key: str, value: Any) -> list[float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)] * 3
    if isinstance(value, list | tuple) and len(value) == 3:
        return [float(v) for v in value]
    raise ValueError(f"{file}: {key}={value!r} must be 3 numbers (one per RGB channel)")


def _size(file: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Mapping) and set(value) == {"height", "width"} \
            and value["height"] == value["width"]:
        return int(value["height"])
    raise ValueError(f"{file}: unsupported size={value!r}; expected {{'height': N, 'width': N}} "
                     "(SigLIP resizes to a square)")


def image_preprocessing_from_hf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The image preprocessing of a ``SiglipImageProcessor`` ``preprocessor_config.json`` in
    ``path`` as jaxtrain data keys: ``image_resize`` = ``image_crop`` = the square size,
    ``image_resize_mode`` = ``'squash'`` (resize straight to the square, no crop),
    ``image_mean`` / ``image_std`` (default 0.5; ``do_normalize: false`` gives 0 / 1),
    ``image_interpolation`` (default bicubic). ``ValueError`` for what jaxtrain cannot do."""
    file = os.path.join(os.fspath(path), PREPROCESSOR)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist; save the processor with "
                                "SiglipImageProcessor.save_pretrained(path)")
    with open(file) as f:
        hf = json.load(f)
    for flag in ("do_resize", "do_rescale"):
        if hf.get(flag, True) is False:
            raise ValueError(f"{file}: {flag}=false is not supported (SigLIP preprocessing "
                             "resizes and scales pixels to [0, 1])")
    if hf.get("do_center_crop"):
        raise ValueError(f"{file}: do_center_crop=true is not a SiglipImageProcessor setting")
    factor = hf.get("rescale_factor", 1 / 255)
    if not math.isclose(float(factor), 1 / 255, rel_tol=1e-6):
        raise ValueError(f"{file}: rescale_factor={factor!r} is not supported (expected 1/255)")
    resample = hf.get("resample", 3)
    if isinstance(resample, str) and resample.lower() in PIL_RESAMPLE.values():
        interpolation = resample.lower()
    elif isinstance(resample, int) and resample in PIL_RESAMPLE:
        interpolation = PIL_RESAMPLE[resample]
    else:
        raise ValueError(f"{file}: unknown resample={resample!r}; expected a PIL resampling "
                         f"code {PIL_RESAMPLE}")
    size = _size(file, hf.get("size", 224))
    normalize = hf.get("do_normalize", True)
    return {
        "image_resize": size,
        "image_crop": size,
        "image_mean": (_channels(file, "image_mean", hf.get("image_mean", SIGLIP_MEAN))
                       if normalize else [0.0] * 3),
        "image_std": (_channels(file, "image_std", hf.get("image_std", SIGLIP_STD))
                      if normalize else [1.0] * 3),
        "image_interpolation": interpolation,
        "image_resize_mode": "squash",
    }


def image_preprocessing_to_hf(prep: Mapping[str, Any]) -> dict[str, Any]:
    """The ``SiglipImageProcessor`` ``preprocessor_config.json`` dict of a preprocessing dict
    (the keys of :func:`image_preprocessing_from_hf`; ``image_resize_mode`` optional). A
    ``ValueError`` when it resizes the shorter side to more than it crops (``shorter_crop``):
    SigLIP's processor resizes to the square, no crop; with ``squash`` that is what it does."""
    keys = ("image_resize", "image_crop", "image_mean", "image_std", "image_interpolation")
    missing = [k for k in keys if k not in prep]
    if missing:
        raise ValueError(f"image_preprocessing lacks {missing} (keys: {list(keys)})")
    crop = int(prep["image_crop"])
    if prep.get("image_resize_mode", "shorter_crop") != "squash" and \
            prep["image_resize"] not in (0, crop):
        raise ValueError(
            f"image_preprocessing resizes the shorter side to {prep['image_resize']} then crops "
            f"{crop}: SiglipImageProcessor resizes to {crop}x{crop} with no crop, so it would "
            f"see other pixels. Train with data.image_resize_mode = 'squash' (SigLIP's), or "
            f"data.image_resize = 0 or {crop}.")
    codes = {v: k for k, v in PIL_RESAMPLE.items()}
    if prep["image_interpolation"] not in codes:
        raise ValueError(f"image_preprocessing['image_interpolation']="
                         f"{prep['image_interpolation']!r}; expected one of {list(codes)}")
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "SiglipProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": crop, "width": crop},
        "resample": codes[prep["image_interpolation"]],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _channels("image_preprocessing", "image_mean", prep["image_mean"]),
        "image_std": _channels("image_preprocessing", "image_std", prep["image_std"]),
    }


def data_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.data`` settings the directory implies: ``tokenizer`` (the directory itself)
    when it holds tokenizer files, and the image preprocessing of its
    ``preprocessor_config.json`` (:func:`image_preprocessing_from_hf`) when it has one; without
    one, SigLIP's default mean = std = 0.5 (``SiglipImageProcessor``'s). Either way
    ``image_resize_mode = 'squash'``, as SigLIP's processor resizes."""
    path = os.fspath(path)
    out: dict[str, Any] = {"tokenizer": path} if has_tokenizer_files(path) else {}
    if os.path.isfile(os.path.join(path, PREPROCESSOR)):
        out.update(image_preprocessing_from_hf(path))
    else:
        out.update(image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
                   image_resize_mode="squash")
    return out


# --------------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------------

def load_hf(path: str | os.PathLike[str], **overrides: Any) -> tuple[SiglipConfig, Params]:
    """``(config, params)`` of a local transformers ``SiglipModel`` directory (float32 numpy
    weights); ``overrides`` are :class:`SiglipConfig` fields (``dtype='bfloat16'``, ...). The
    vision tower alone (:class:`jaxtrain.models.siglip.SiglipVision`) takes
    ``params["vision_model"]``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path} does not exist (pass "
                                "a local directory; download with huggingface_hub first)")
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
    try:
        params = params_from_hf(read_state(path, "SiglipModel"), cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return cfg, params


def save_hf(
    path: str | os.PathLike[str],
    params: Any,
    cfg: SiglipConfig,
    *,
    image_preprocessing: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: str = "float32",
) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (or shards + index above
    ``max_shard_bytes``; weights in ``dtype``) that ``transformers.SiglipModel.from_pretrained``
    loads, plus ``preprocessor_config.json`` from ``image_preprocessing``
    (:func:`image_preprocessing_to_hf`) and the ``tokenizer``'s files when given. Everything is
    validated before anything is written. In a multi-process job call it from one process."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0; got {max_shard_bytes}")
    ids: dict[str, int | None] = {}
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise TypeError(f"tokenizer must be a transformers tokenizer (with save_pretrained); "
                            f"got {type(tokenizer).__name__}")
        if len(tokenizer) > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's "
                             f"vocab_size is {cfg.vocab_size}")
        ids = {"pad_token_id": getattr(tokenizer, "pad_token_id", None),
               "eos_token_id": getattr(tokenizer, "eos_token_id", None)}
    hf = config_to_hf(cfg, **ids)
    state = cast_state(params_to_hf(params, cfg), dtype)
    hf.update(torch_dtype=dtype, dtype=dtype)
    preprocessor = None
    if image_preprocessing is not None:
        preprocessor = image_preprocessing_to_hf(image_preprocessing)
        if int(image_preprocessing["image_crop"]) != cfg.image_size:
            raise ValueError(f"image_preprocessing['image_crop']="
                             f"{image_preprocessing['image_crop']} must equal the model's "
                             f"image_size ({cfg.image_size})")
    path = os.fspath(path)
    write_state(path, state, max_shard_bytes)
    write_json(os.path.join(path, CONFIG), hf)
    if preprocessor is not None:
        write_json(os.path.join(path, PREPROCESSOR), preprocessor)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def transformers_outputs(path: str | os.PathLike[str], cfg: SiglipConfig, params: Any,
                         seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ours, transformers'): L2-normalised ``image_embeds`` / ``text_embeds`` and
    ``logits_per_image`` of this model and of ``transformers.SiglipModel`` loaded from ``path``
    (written by :func:`save_hf`) for the same random images and full-length token rows: how an
    export checks its directory. Needs torch."""
    import jax
    import torch
    import transformers

    from jaxtrain.models.siglip import Siglip

    rng = np.random.default_rng(seed)
    b = 2
    images = rng.standard_normal((b, cfg.image_size, cfg.image_size, cfg.channels))
    images = images.astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, (b, cfg.text_max_len)).astype(np.int32)
    f32_cfg = dataclasses.replace(cfg, dtype="float32", attention_impl=None)
    out = jax.jit(Siglip(f32_cfg).apply)({"params": params}, images, tokens)
    scale, bias = np.exp(np.asarray(out["logit_scale"])), np.asarray(out["logit_bias"])
    ours = {"image_embeds": np.asarray(out["image_embeds"]),
            "text_embeds": np.asarray(out["text_embeds"])}
    ours["logits_per_image"] = scale * ours["image_embeds"] @ ours["text_embeds"].T + bias
    model = transformers.SiglipModel.from_pretrained(os.fspath(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = model(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)),
                       input_ids=torch.as_tensor(tokens, dtype=torch.long))
    return ours, {k: getattr(theirs, k).numpy() for k in ours}
