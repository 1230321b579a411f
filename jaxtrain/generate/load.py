"""A language model to generate from, with its tokenizer: a jaxtrain run's checkpoint
(:func:`load_run`) or a Hugging Face model directory (:func:`load_hf_dir`).

A run's checkpoint is chosen by ``checkpoint``: ``latest`` (the newest step on disk), ``best``
(the step of the best ``checkpoint.best_metric``, recorded in every checkpoint's metadata as
``progress.best_step``) or a step number. Its params are the whole model's: a LoRA run's
adapters merged into the base (:func:`jaxtrain.weights.read_run`), a DPO run's policy. The
model's shape is the run's ``model`` config, or, for a run started from ``init_from``, the
shape of those weights (read from their ``config.json`` / saved config; the directory must
still exist). The tokenizer and chat template are the run's ``data.tokenizer``'s, what
training used; the context is the run's row length (``data.seq_len``; DPO:
``data.max_length``). A Hugging Face directory brings its own tokenizer (or ``tokenizer``) and
its context is ``max_position_embeddings``.

Everything here is checked before anything compiles; problems are ConfigErrors that name the
path and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from jaxtrain.checkpoint import read_meta, saved_steps
from jaxtrain.errors import ConfigError
from jaxtrain.hub import resolve
from jaxtrain.models.registry import CAUSAL_LM, ModelFamily, family_for_hf_dir
from jaxtrain.weights import is_hf_dir, read_run, run_family


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for :class:`jaxtrain.generate.decode.Generator`."""

    cfg: Any  # the family's model config (LlamaConfig)
    params: Any  # host numpy arrays, the whole model's
    tokenizer: Any
    max_context: int  # the longest prompt + completion: the trained row length / HF positions
    chat: bool  # trained on conversations (SFT on chat data, DPO): plain prompts are user turns
    add_special_tokens: bool  # plain prompts get the tokenizer's special tokens (HF models)
    where: str  # what was loaded, for messages: "runs/sft step 300"


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps saved under ``<workdir>/checkpoints``, ascending."""
    return saved_steps(os.path.join(workdir, "checkpoints"))


def pick_step(workdir: str, checkpoint: str = "latest") -> int:
    """The step `checkpoint` names in `workdir`: ``latest``, ``best`` or a step number."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir!r} does not exist: give the --workdir of a "
                          "`python -m jaxtrain.main` run.")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"--workdir {workdir!r} has no checkpoint (no checkpoints/<step>/state"
                          "): train it first (python -m jaxtrain.main --config=... "
                          f"--workdir={workdir}), or give another workdir.")
    root = os.path.join(workdir, "checkpoints")
    if checkpoint == "latest":
        return steps[-1]
    if checkpoint == "best":
        meta = read_meta(os.path.join(root, str(steps[-1])))
        best = (meta.get("progress") or {}).get("best_step")
        metric = (meta.get("config") or {}).get("checkpoint", {}).get("best_metric")
        if best is None:
            raise ConfigError(
                f"--checkpoint=best: {workdir!r} records no best step (its config's "
                f"checkpoint.best_metric is {metric!r}, and no evaluation ranked a checkpoint)"
                f". Use --checkpoint=latest or a step of {steps}.")
        if best not in steps:
            raise ConfigError(f"--checkpoint=best: the best step of {workdir!r} is {best}, "
                              f"which is no longer on disk (steps: {steps}). Use "
                              "--checkpoint=latest or one of those steps.")
        return int(best)
    try:
        step = int(checkpoint)
    except ValueError:
        raise ConfigError(f"--checkpoint={checkpoint!r} must be 'best', 'latest' or a step "
                          "number.") from None
    if step not in steps:
        raise ConfigError(f"--checkpoint={step}: {workdir!r} has no checkpoint of step {step}; "
                          f"its steps are {steps}.")
    return step


# ------------------------------------------------------------------------------ runs


def trained_on_chat(config: Mapping[str, Any]) -> bool:
    """A run whose rows were conversations: chat SFT (``data.kind='chat'``) or DPO."""
    return config.get("task") == "dpo" or config.get("data", {}).get("kind") == "chat"


def run_model_config(config: Mapping[str, Any], family: ModelFamily) -> Any:
    """The model config of a saved run: its ``model`` block, with the shape of its
    ``init_from`` weights when it started from some (as :func:`jaxtrain.weights.starting_model`
    makes it)."""
    init_from = config.get("init_from") or ""
    if not init_from:
        return family.config(config["model"])
    init_from = resolve(init_from, "init_from")  # a Hub id: its snapshot in the Hub cache
    if not os.path.exists(init_from):
        raise ConfigError(f"The run started from init_from={init_from!r}, which gives the model "
                          "its shape, and that path no longer exists: restore it.")
    if is_hf_dir(init_from):
        hf = family.hf()
        if hasattr(hf, "config_from_hf"):  # the shape from config.json alone
            with open(os.path.join(init_from, "config.json")) as f:
                shape = hf.config_from_hf(json.load(f))
        else:
            shape = family.load_hf(init_from)[0]
    else:
        steps = checkpoint_steps(init_from)
        saved = read_meta(os.path.join(init_from, "checkpoints", str(steps[-1]))).get(
            "config", {}) if steps else {}
        if not saved:
            raise ConfigError(f"The run started from init_from={init_from!r}, which gives the "
                              "model its shape, and it holds no checkpoint now.")
        shape = run_model_config(saved, family)
    return family.pretrained_config(shape, config["model"])


def _context(config: Mapping[str, Any]) -> int:
    data = config.get("data", {})
    return int(data.get("seq_len") or data.get("max_length") or 0)


def load_run(workdir: str, checkpoint: str = "latest") -> LoadedModel:
    """The model of a jaxtrain language-model run (module docstring); a ConfigError for a
    missing workdir / checkpoint / step, or a run of another kind of model (CLIP)."""
    from jaxtrain.data.tokenizers import load_lm_tokenizer

    step = pick_step(workdir, checkpoint)
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    config = read_meta(step_dir).get("config") or {}
    if not config.get("task"):
        raise ConfigError(f"{step_dir}: the checkpoint's metadata holds no run config: is "
                          f"{workdir!r} a jaxtrain run?")
    family = run_family(config)
    if family.kind != CAUSAL_LM:
        raise ConfigError(
            f"--workdir {workdir!r} is a {config['task']!r} run of a {family.title} "
            f"(model.name {family.name!r}), not a language model: generation needs an 'lm' or "
            "'dpo' run (or --hf=DIR).")
    cfg = run_model_config(config, family)
    name = config.get("data", {}).get("tokenizer", "gpt2")
    try:
        tokenizer = load_lm_tokenizer(name, cfg.vocab_size)
    except (OSError, ValueError) as e:
        raise ConfigError(f"The run's tokenizer (data.tokenizer={name!r}) cannot be loaded: "
                          f"{e}") from None
    _, params = read_run(step_dir)
    return LoadedModel(cfg=cfg, params=params, tokenizer=tokenizer,
                       max_context=_context(config),
                       chat=trained_on_chat(config), add_special_tokens=False,
                       where=f"{workdir} step {step}")


# ------------------------------------------------------------------------------ HF directories


def load_hf_dir(path: str, tokenizer: str = "") -> LoadedModel:
    """A Hugging Face causal LM directory and its tokenizer (or `tokenizer`, a directory or
    hub name); a ConfigError when it is not one, or has no tokenizer."""
    from jaxtrain.data.tokenizers import load_tokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"--hf {path!r} is not a Hugging Face model directory (no "
                          "config.json).")
    family = family_for_hf_dir(path)
    if family.kind != CAUSAL_LM:
        raise ConfigError(f"--hf {path!r} holds a {family.title}, not a language model.")
    name = tokenizer or path
    try:
        tok = load_tokenizer(name, strict=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"No tokenizer for --hf {path!r} ({name!r}: {e}): save one there "
                          "(tokenizer.save_pretrained) or pass --tokenizer=DIR.") from None
    try:
        cfg, params = family.load_hf(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--hf {path!r}: {e}") from None
    with open(os.path.join(path, "config.json")) as f:
        positions = int(json.load(f).get("max_position_embeddings") or 0)
    return LoadedModel(cfg=cfg, params=params, tokenizer=tok, max_context=positions,
                       chat=False, add_special_tokens=True, where=path)
