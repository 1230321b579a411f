"""The Hugging Face format: a `transformers` directory written by the run's model family
(:mod:`jaxtrain.models.registry`: its HF conversion module), checked by loading it with
transformers (torch) and comparing its outputs with ours (the module's
``transformers_outputs``), or, without torch, by reloading it with the family's ``load_hf`` and
comparing the params.

Nothing here knows a model: the family's ``save_hf`` says by its parameters which of the run's
settings it takes (:func:`save_options`: ``model_type``, ``image_preprocessing``,
``tokenizer``); its ``transformers_outputs(path, cfg, params, seed)`` -> (ours, theirs) gives
the outputs to compare (a module without one is checked by reloading the params)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxtrain.errors import ConfigError
from jaxtrain.export.checks import ExportError, verify_arrays, verify_outputs
from jaxtrain.export.params import flatten_params
from jaxtrain.models.registry import ModelFamily, get_model, model_names
from jaxtrain.tasks import TASKS, Task, get_task


def task_family(task: Task) -> ModelFamily | None:
    """The model family of a built task: its ``config.model.name`` (see
    :func:`jaxtrain.export.inference.inference_task`, which fills it in for runs saved before
    the name existed); None for a task whose model is no registered family."""
    model = task.config.get("model")
    name = model.get("name") if model is not None else None
    return get_model(name) if name in model_names() else None


def hf_tasks() -> list[str]:
    """The registered tasks whose default model family has a Hugging Face conversion."""
    out = []
    for name in TASKS.names():
        model = get_task(name).default_config().get("model")
        family = model.get("name") if model is not None else None
        if family in model_names() and get_model(family).hf_module:
            out.append(name)
    return out


def check_hf_format(task: Task) -> ModelFamily:
    """The family that writes the task's model as a Hugging Face directory; an ExportError
    naming the tasks that have one when there is none."""
    family = task_family(task)
    if family is None or not family.hf_module:
        why = (f"its model family {family.name!r} has no Hugging Face conversion" if family
               else "its model is no registered model family (config.model.name)")
        raise ExportError(f"format 'hf': the {task.name!r} task has no Hugging Face format "
                          f"({why}; tasks with one: {', '.join(hf_tasks())}); use "
                          "--format=safetensors,stablehlo.")
    try:
        family.hf()
    except ModuleNotFoundError as e:
        if e.name != family.hf_module:
            raise
        raise ExportError(f"format 'hf' for a {family.title} needs {family.hf_module}, which "
                          "this installation lacks; use --format=safetensors,stablehlo.") from None
    if not isinstance(getattr(task, "model_config", None), family.config_cls):
        raise ExportError(f"format 'hf': the {task.name!r} task has no model_config of its "
                          f"model family {family.name!r} ({family.config_cls.__name__}) to "
                          "convert.")
    return family


def _image_preprocessing(task: Task) -> dict[str, Any]:
    """The run's image preprocessing (its data config; crop and resize default to the model's
    image size), as preprocessor_config.json describes it."""
    d = getattr(task, "data_config", None) or task.config.data
    size = task.model_config.image_size
    return {"image_resize": d.image_resize or size, "image_crop": d.image_crop or size,
            "image_mean": list(d.image_mean), "image_std": list(d.image_std),
            "image_interpolation": d.image_interpolation}


def save_options(family: ModelFamily, task: Task, model_type: str,
                 dtype: str = "") -> dict[str, Any]:
    """The keyword arguments of the family's ``save_hf`` that the run supplies, by the names it
    takes: ``model_type`` (--model_type: a language model's architecture),
    ``image_preprocessing`` (the run's, written as preprocessor_config.json), ``tokenizer``
    (the run's Hugging Face tokenizer, when it has one) and ``dtype`` (--dtype: the weights'
    dtype, 'bfloat16' | 'float16' | 'float32'; '' = the family's default, float32). An
    ExportError when a dtype other than float32 is asked of a family whose ``save_hf`` takes
    none."""
    offers: dict[str, Callable[[], Any]] = {
        "model_type": lambda: model_type,
        "image_preprocessing": lambda: _image_preprocessing(task),
        "tokenizer": lambda: getattr(getattr(task, "tokenizer", None), "hf", None),
        "dtype": lambda: dtype or None,
    }
    takes = inspect.signature(family.hf().save_hf).parameters
    if dtype not in ("", "float32") and "dtype" not in takes:
        raise ExportError(f"format 'hf': {family.hf_module}.save_hf writes float32 only (it "
                          f"takes no dtype); export the {family.title} without --dtype (and "
                          "checkpoint.save_dtype '') or with --dtype=fp32.")
    options = {k: offer() for k, offer in offers.items() if k in takes}
    return {k: v for k, v in options.items() if v is not None}


def torch_available() -> bool:
    """Whether torch and transformers are installed (the check compares outputs then)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No 'Loading weights' progress bar from transformers (restored after)."""
    import transformers

    hf_logging = transformers.utils.logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _hf_tol(ref: np.ndarray) -> float:
    return 1e-3 * (1.0 + float(np.max(np.abs(ref), initial=0.0)))


def save_hf(path: str, family: ModelFamily, cfg: Any, params: Any,
            options: Mapping[str, Any]) -> None:
    """The family's ``save_hf``; a model the Hugging Face format cannot express (its
    ValueError) or a family without a conversion is an ExportError."""
    try:
        family.save_hf(path, params, cfg, **options)
    except (ValueError, ConfigError) as e:
        raise ExportError(f"format 'hf': {e}") from None


def export_hf(path: str, family: ModelFamily, cfg: Any, params: Any,
              options: Mapping[str, Any] | None = None, seed: int = 0,
              task: Task | None = None) -> dict:
    """A Hugging Face directory of the model (``family``, ``cfg``, ``params``; ``options``: its
    ``save_hf``'s, see :func:`save_options`), checked: loaded with ``transformers`` (torch) and
    its outputs compared with ours (within 1e-3 relative and 1e-3 (1 + max |ours|) absolute),
    or, without torch, reloaded with the family's ``load_hf`` and its params compared. With
    the run's ``task``, a language model's tokenizer and chat template are written beside it
    and checked (:func:`jaxtrain.export.tokenizer.save_tokenizer`)."""
    save_hf(path, family, cfg, params, options or {})
    extra: dict[str, Any] = {}
    if task is not None:
        from jaxtrain.export.tokenizer import save_tokenizer

        written = save_tokenizer(path, family, task)
        if written:
            extra["tokenizer"] = written
    module = family.hf()
    if not torch_available() or not hasattr(module, "transformers_outputs"):
        _, loaded = family.load_hf(path)
        diff = verify_arrays("hf", f"{path} reloaded with load_hf", flatten_params(loaded),
                             flatten_params(params), atol=1e-6)
        why = "torch not installed" if not torch_available() else \
            f"{family.hf_module} has no transformers_outputs"
        return {"checked": f"params (load_hf; {why})", "max_abs_diff": diff, **extra}
    with quiet_transformers():
        ours, theirs = module.transformers_outputs(path, cfg, params, seed=seed)
    worst = 0.0
    for name, ref in ours.items():
        worst = max(worst, verify_outputs("hf", f"transformers' model in {path}",
                                          {name: theirs[name]}, {name: ref}, 1e-3,
                                          _hf_tol(ref)))
    return {"checked": "outputs (transformers, torch)", "max_abs_diff": worst, **extra}
