"""The sentence-transformers format: an ``embedder`` run's text side as a folder that
``sentence_transformers.SentenceTransformer(path)`` loads, whose ``encode()`` gives jaxtrain's
embeddings.

    python -m jaxtrain.export --workdir=runs/embed --format=sentence-transformers --out=st/
    SentenceTransformer("st/").encode(texts, prompt_name="query")   # = the task's query rows

The folder (the layout of the models on the Hugging Face hub, which every sentence-transformers
version reads)::

    config.json, model.safetensors   the text tower as a transformers model AutoModel loads:
                                     BertModel (bert tower) or LlamaModel / Qwen2Model /
                                     MistralModel (llama tower, causal)
    tokenizer files                  the run's data.tokenizer; with last-token pooling its
                                     post-processor appends the eos the training rows end with
    modules.json                     Transformer -> Pooling [-> Dense] [-> Normalize]
    sentence_bert_config.json        max_seq_length = model.text_max_len
    1_Pooling/config.json            cls | mean | lasttoken (model.pooling)
    2_Dense/                         model.embed_dim > 0: the projection, no bias, identity
    3_Normalize/                     model.normalize
    config_sentence_transformers.json  prompts {"query": contrastive.query_prefix,
                                     "document": contrastive.positive_prefix} (when set)

Refused (ExportError): a model other than the ``embedder`` family; a clip or siglip text tower
or an image tower (sentence-transformers' Transformer module holds a text AutoModel); a
bidirectional decoder (``causal=False``: transformers' decoders are causal); the built-in
caption vocabulary (no Hugging Face tokenizer). The folder is written to a temporary directory
next to ``out`` and moved into place after its check: the tokenizer's ids equal the task's
token rows, and, with sentence-transformers installed, ``encode()`` equals the task's
embeddings (else the weights are reloaded and compared).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxtrain.export.checks import ExportError, ExportVerificationError, verify_arrays

FORMAT = "sentence-transformers"
TOWERS = ("bert", "llama")
POOLING_MODES = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}
# Texts the check embeds (any tokenizer reads them).
CHECK_TEXTS = ("a red circle", "two small blue squares on the left of a green triangle", "x",
               "A yellow star, above; 3 shapes!")
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _write_json(path: str, content: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def check_exportable(task: Any) -> Any:
    """The run's :class:`~jaxtrain.models.embedder.EmbedderConfig`; an ExportError saying why
    and what to do when its model cannot be written as a sentence-transformers folder."""
    model = task.config.get("model") or {}
    name = model.get("name")
    cfg = getattr(task, "model_config", None)
    if name != "embedder" or cfg is None or not hasattr(cfg, "text_tower"):
        raise ExportError(
            f"format '{FORMAT}' writes text embedding models (model.name='embedder' with a "
            f"{' or '.join(TOWERS)} text tower); this run's model is {name!r} (task "
            f"{task.name!r}): use --format=safetensors,stablehlo or hf.")
    check_config(cfg, task.data_config.tokenizer)
    return cfg


def check_config(cfg: Any, tokenizer: str) -> None:
    """An ExportError unless the embedder config ``cfg`` with the tokenizer named ``tokenizer``
    (``data.tokenizer``) can be written as a sentence-transformers folder."""
    if cfg.text_tower not in TOWERS:
        raise ExportError(
            f"format '{FORMAT}': the text tower is {cfg.text_tower!r}; sentence-transformers' "
            f"Transformer module holds a text AutoModel, which jaxtrain writes for "
            f"{' and '.join(TOWERS)} towers. Use --format=safetensors,stablehlo.")
    if cfg.image_tower != "none":
        raise ExportError(
            f"format '{FORMAT}': this embedder has an image tower ({cfg.image_tower!r}); a "
            "sentence-transformers text folder would drop it. Use --format=safetensors,"
            "stablehlo.")
    if cfg.text_tower == "llama" and not cfg.causal:
        raise ExportError(
            f"format '{FORMAT}': the llama tower is bidirectional (model.causal=False), but "
            "transformers' LlamaModel / Qwen2Model / MistralModel are causal: AutoModel would "
            "compute other embeddings. Export with --format=safetensors,stablehlo.")
    if not tokenizer:
        raise ExportError(
            f"format '{FORMAT}': the run uses the built-in caption vocabulary "
            "(data.tokenizer=''), which is no Hugging Face tokenizer: train with a tokenizer "
            "directory (or a built-in Hugging Face one) to export this way.")


def _llama_model_type(cfg: Any, requested: str) -> str:
    """``requested`` when that architecture can hold ``cfg``, else the one that can."""
    from jaxtrain.hf.llama import config_to_hf

    for model_type in (requested, "qwen2" if cfg.attention_bias else
                       "mistral" if cfg.sliding_window else "llama"):
        try:
            config_to_hf(cfg, model_type)
            return model_type
        except ValueError:
            continue
    raise ExportError(f"format '{FORMAT}': the llama tower has no Hugging Face architecture "
                      f"(attention_bias={cfg.attention_bias}, sliding_window="
                      f"{cfg.sliding_window}, num_experts={cfg.num_experts}).")


def append_eos_processor(tokenizer: Any) -> None:
    """Make a fast tokenizer end every encoding with its eos (as the embedder's last-token rows
    do): its post-processor followed by a template appending eos. Nothing when it already
    does."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None:
        raise ExportError(f"format '{FORMAT}': last-token pooling ends texts with an eos, but the "
                          "tokenizer has none.")
    if tokenizer("a")["input_ids"][-1:] == [eos_id]:
        return
    backend = tokenizer.backend_tokenizer
    template = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 $B:1 {eos}:1", special_tokens=[(eos, eos_id)])
    old = backend.post_processor
    backend.post_processor = template if old is None else processors.Sequence([old, template])


def _tokenizer(name: str, cfg: Any) -> Any:
    """The run's tokenizer, ready for sentence-transformers: a pad token (its eos when it has
    none, as the training rows), model_max_length = text_max_len, no truncation/padding state,
    eos appended for last-token pooling."""
    from jaxtrain.data.tokenizers import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(name, strict=False))
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"format '{FORMAT}': the tokenizer {name!r} is not a fast "
                          "(tokenizer.json) tokenizer.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    tok.model_max_length = cfg.text_max_len
    if cfg.pooling == "last_token":
        append_eos_processor(tok)
    return tok


def write_folder(path: str, cfg: Any, params: Mapping[str, Any], tokenizer: str,
                 prefixes: Mapping[str, str], model_type: str = "llama",
                 dtype: str = "float32") -> dict[str, Any]:
    """Write the sentence-transformers folder of an embedder (``cfg``: its EmbedderConfig,
    ``params``: its parameter tree, ``tokenizer``: the run's ``data.tokenizer``, ``prefixes``:
    role ('query', 'positive') -> instruction prefix) to ``path`` (see the module doc).
    Returns what was written."""
    check_config(cfg, tokenizer)
    text = cfg.text_config
    tok = _tokenizer(tokenizer, cfg)
    if cfg.text_tower == "bert":
        from jaxtrain.hf import bert as hf_bert

        hf_bert.save_hf(path, params["text"], text, tokenizer=tok, dtype=dtype or "float32")
        written = {"model": "BertModel"}
    else:
        from jaxtrain.hf import llama_encoder

        model_type = _llama_model_type(text, model_type)
        llama_encoder.save_hf(path, params["text"], text, model_type=model_type, tokenizer=tok,
                              dtype=dtype or "float32")
        written = {"model": llama_encoder.BASE_ARCHITECTURES[model_type]}
    width = cfg.text_width
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"}]

    def add(kind: str) -> str:
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_{kind}",
                        "type": f"sentence_transformers.models.{kind}"})
        os.makedirs(os.path.join(path, f"{i}_{kind}"), exist_ok=True)
        return os.path.join(path, f"{i}_{kind}")

    mode = POOLING_MODES[cfg.pooling]
    _write_json(os.path.join(add("Pooling"), "config.json"), {
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": mode == "lasttoken",
        "include_prompt": True,
    })
    if cfg.embed_dim:
        from jaxtrain.file_modes import save_safetensors as save_file  # mode 0644
        from jaxtrain.hf.files import to_numpy

        dense = add("Dense")
        kernel = to_numpy(params["text_projection"]["kernel"])  # [D, E]
        save_file({"linear.weight": np.ascontiguousarray(kernel.T)},
                  os.path.join(dense, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(dense, "config.json"), {
            "in_features": width, "out_features": cfg.embed_dim, "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity"})
    if cfg.normalize:
        add("Normalize")
    _write_json(os.path.join(path, "modules.json"), modules)
    _write_json(os.path.join(path, "sentence_bert_config.json"),
                {"max_seq_length": cfg.text_max_len, "do_lower_case": False})
    prompts = {k: v for k, v in (("query", prefixes.get("query", "")),
                                 ("document", prefixes.get("positive", ""))) if v}
    _write_json(os.path.join(path, "config_sentence_transformers.json"), {
        "prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    return {**written, "pooling": mode, "dense": bool(cfg.embed_dim),
            "normalize": cfg.normalize, "prompts": prompts, "max_seq_length": cfg.text_max_len}


def embeddings(cfg: Any, params: Any, rows: np.ndarray) -> np.ndarray:
    """The embedder's (``cfg``, ``params``) float32 embeddings of token ``rows`` (padded with
    -1), L2-normalised when ``cfg.normalize`` (what the folder computes)."""
    import jax

    from jaxtrain.models.embedder import Embedder

    f32 = dataclasses.replace(cfg, dtype="float32", remat=False)
    e = np.asarray(jax.jit(lambda p, x: Embedder(f32).apply({"params": p}, x,
                                                            method="encode_text"))(params, rows))
    if cfg.normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


def verify_folder(path: str, cfg: Any, params: Any,
                  tokenize: Callable[[list[str], str], np.ndarray],
                  prefixes: Mapping[str, str], texts: Sequence[str] = CHECK_TEXTS
                  ) -> dict[str, Any]:
    """Check the folder of the embedder ``cfg``, ``params``: its tokenizer gives the training
    rows (``tokenize(texts, role)``, as ``ClipTask.tokenize_texts``; ``prefixes``: role ->
    prefix) and, with sentence-transformers installed, ``SentenceTransformer(path).encode()``
    (with the role's prompt) equals :func:`embeddings` of those rows (``|diff| <= 1e-5 + 1e-4
    |ours|``); without it, the weights are reloaded and compared. An ExportVerificationError
    naming the difference if not."""
    import importlib.util

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    max_len = cfg.text_max_len
    roles = {"query": "query", "positive": "document"}
    rows_of = {role: tokenize(list(texts), role) for role in roles}
    for role in roles:
        prefix = prefixes.get(role, "")
        rows = rows_of[role]
        for text, row in zip(texts, rows, strict=True):
            want = [int(i) for i, real in zip(row, row >= 0, strict=True) if real]
            got = tok(prefix + text, truncation=True, max_length=max_len)["input_ids"]
            if got != want:
                raise ExportVerificationError(
                    f"format '{FORMAT}': the exported tokenizer gives {got} for {role} text "
                    f"{text!r}, the training rows {want}.")
    checked = {"tokenizer": "ids equal the task's rows"}
    if importlib.util.find_spec("sentence_transformers") is None or \
            importlib.util.find_spec("torch") is None:
        if cfg.text_tower == "bert":
            from jaxtrain.hf.bert import load_hf
        else:
            from jaxtrain.hf.llama_encoder import load_hf
        from jaxtrain.export.params import flatten_params

        _, loaded = load_hf(path)
        diff = verify_arrays(FORMAT, f"{path} reloaded", flatten_params(loaded),
                             flatten_params(params["text"]), atol=1e-6)
        return {**checked, "checked": "params (sentence-transformers not installed)",
                "max_abs_diff": diff}
    from sentence_transformers import SentenceTransformer

    from jaxtrain.export.hf import quiet_transformers

    with quiet_transformers():
        model = SentenceTransformer(path, device="cpu")
    worst = 0.0
    for role, prompt in roles.items():
        ours = embeddings(cfg, params, rows_of[role])
        kwargs = {"prompt_name": prompt} if prompt in (model.prompts or {}) else {}
        theirs = model.encode(list(texts), convert_to_numpy=True, batch_size=len(texts),
                              **kwargs)
        diff = float(np.max(np.abs(theirs - ours)))
        if not np.allclose(theirs, ours, **TOL):
            raise ExportVerificationError(
                f"format '{FORMAT}': SentenceTransformer({path!r}).encode() differs from "
                f"jaxtrain's {role} embeddings by up to {diff:.3g} (tolerance {TOL}).")
        worst = max(worst, diff)
    return {**checked, "checked": "encode() equals the task's embeddings (sentence-"
            "transformers, torch)", "max_abs_diff": worst}


def export_sentence_transformers(workdir: str, out: str, *, model_type: str = "llama",
                                 overwrite: bool = False, dtype: str | None = None) -> dict:
    """Write ``workdir``'s newest checkpoint (LoRA merged) as a sentence-transformers folder at
    ``out``, checked (:func:`verify_folder`) before it is moved into place. ``model_type``: the
    architecture of a llama tower (when it can hold the tower; else the one that can);
    ``dtype``: as :func:`jaxtrain.export.export_bundle`'s, but float32 only (the check compares
    embeddings at float32 tolerance). Returns what was written and checked."""
    from jaxtrain.export.bundle import check_out, move_into_place
    from jaxtrain.export.inference import check_params, inference_task
    from jaxtrain.export.params import cast_params, save_dtype
    from jaxtrain.weights import read_run

    if not workdir:
        raise ExportError("No workdir: give --workdir, the run to export.")
    if not out:
        raise ExportError("No output directory: give --out, the folder to write.")
    out = os.path.abspath(out)
    check_out(out, overwrite)
    config, params = read_run(workdir)
    task = inference_task(config)
    check_exportable(task)
    check_params(task, params)
    dtype = save_dtype(dtype, config)
    if dtype not in ("", "float32"):
        raise ExportError(f"format '{FORMAT}' writes float32 weights (their check compares "
                          f"embeddings at float32 tolerance); got dtype {dtype!r}: pass "
                          "--dtype=fp32.")
    params = cast_params(params, dtype)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        cfg, name = task.model_config, task.data_config.tokenizer
        prefixes = {"query": task.prefixes["query"], "positive": task.prefixes["positive"]}
        written = write_folder(tmp, cfg, params, name, prefixes, model_type=model_type)
        written["check"] = verify_folder(tmp, cfg, params, task.tokenize_texts, prefixes)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Wrote a sentence-transformers folder of %s to %s: %s", workdir, out, written)
    return written
