"""Export when training ends (`export.at_end`, `export.checkpoint`): the chosen checkpoint of
the run written in each asked format into ``<workdir>/export/<format>``, by the export CLI's own
functions (no subprocess):

    hf                      export/hf/: a Hugging Face directory (:func:`export_hf_dir`; a
                            language model's with its tokenizer and chat template)
    safetensors, stablehlo  export/<format>/: a bundle of that one format (:func:`export_bundle`)
    sentence-transformers   export/sentence-transformers/ (:func:`export_sentence_transformers`)

`export.checkpoint = 'best'` takes the best checkpoint by ``checkpoint.best_metric`` when the
run kept one, else the last; ``'last'`` the last. An existing export folder is replaced (a
finished run re-run in its workdir exports again); every export is verified before it is moved
into place, as the CLI's are. In a multi-process job process 0 writes, as the CLI runs once."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jaxtrain.errors import ConfigError
from jaxtrain.export.bundle import FORMATS, export_bundle
from jaxtrain.export.hf import check_hf_format
from jaxtrain.export.hf_dir import export_hf_dir
from jaxtrain.export.sentence_transformers import FORMAT as ST_FORMAT
from jaxtrain.export.sentence_transformers import export_sentence_transformers

AT_END_FORMATS = (*FORMATS, ST_FORMAT)


def at_end_formats(config: Mapping[str, Any]) -> tuple[str, ...]:
    """`config.export.at_end`, checked: a ConfigError naming an unknown format and the valid
    ones. Call it before training, so a typo costs no run. An item may hold several formats
    comma-separated (the command line's `--config.export.at_end=hf,stablehlo`)."""
    wanted = tuple(f.strip().lower() for item in config["export"]["at_end"]
                   for f in str(item).split(",") if f.strip())
    unknown = [f for f in wanted if f not in AT_END_FORMATS]
    if unknown:
        raise ConfigError(
            f"Config key 'export.at_end' names the unknown export format {unknown[0]!r}: "
            f"valid formats are {', '.join(AT_END_FORMATS)} (those of python -m "
            "jaxtrain.export), e.g. export.at_end=('hf',).")
    return tuple(dict.fromkeys(wanted))


def check_at_end(config: Mapping[str, Any], task: Any) -> tuple[str, ...]:
    """:func:`at_end_formats`, and 'hf' only for a task that has a Hugging Face format (its
    model family's conversion): a ConfigError before training otherwise."""
    formats = at_end_formats(config)
    if "hf" in formats:
        from jaxtrain.export.checks import ExportError

        try:
            check_hf_format(getattr(task, "inner", task))  # LoRA: the model's own task
        except ExportError as e:
            raise ConfigError(f"Config key 'export.at_end' asks for 'hf': {e}") from None
    return formats


def export_checkpoint(best_path: str | None, paths: Sequence[str], which: str) -> str | None:
    """The checkpoint directory to export: the best (`best_path`, when `which` is 'best' and
    it exists), else the newest of `paths`; None without any."""
    if which == "best" and best_path and os.path.isdir(best_path):
        return best_path
    existing = [p for p in paths if os.path.isdir(p)]
    return max(existing, key=lambda p: int(os.path.basename(p))) if existing else None


def export_at_end(workdir: str, formats: Sequence[str], checkpoint: str,
                  model_type: str = "llama") -> dict[str, str]:
    """Write `checkpoint` (a step directory of the run in `workdir`) in each of `formats` into
    ``<workdir>/export/<format>`` (module docstring); returns {format: folder}. Process 0 writes;
    every process gets the same dict."""
    out = {f: os.path.join(os.path.abspath(workdir), "export", f) for f in formats}
    if jax.process_index() != 0:
        return out
    for fmt, folder in out.items():
        if fmt == "hf":
            export_hf_dir(checkpoint, folder, model_type=model_type, overwrite=True)
        elif fmt == ST_FORMAT:
            export_sentence_transformers(checkpoint, folder, overwrite=True)
        else:
            export_bundle(checkpoint, folder, [fmt], overwrite=True)
    return out
