"""``python -m jaxtrain.data.prepare --config=CONFIG --out=DIR``: write a run's data once, in
the form training reads fastest.

- A contrastive (image–text) config: its training part (and eval part, if it has one) as
  resized uint8 images + texts in ArrayRecord shards with ``prepared.json``
  (:mod:`jaxtrain.data.prepared_pairs`). Train on them with ``--config.data.name=DIR``.
  Flags: ``--image_format=raw|jpeg``, ``--short_side`` (random-resized-crop training: the
  stored shorter side; 0 = 256/224 of the crop), ``--rows_per_shard``, ``--jpeg_quality``,
  ``--overwrite``, ``--workers`` (processes that decode and resize).
- A language-model config (text, chat, preference data): its token store
  (``jaxtrain.data.token_store.build_token_store(config, out)``).

The same config overrides as training (``--config.data.name=...``). The model's image size is
the task's (so ``init_from`` weights count), which is why this entry point builds the task.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import ml_collections
from absl import app, flags, logging

from jaxtrain.errors import ConfigError


@functools.cache
def define_flags() -> dict[str, flags.FlagHolder]:
    """--config (shared with ``jaxtrain.main``: defined once per process), --out and the
    preparation options."""
    from jaxtrain.cli import define_run_flags

    return dict(
        config=define_run_flags().config,
        out=flags.DEFINE_string("out", None, "Directory to write the prepared data to."),
        image_format=flags.DEFINE_enum(
            "image_format", "raw", ["raw", "jpeg"],
            "Images as uint8 pixels (fastest to read) or re-encoded JPEG (~10x smaller)."),
        short_side=flags.DEFINE_integer(
            "short_side", 0, "random_resized_crop training: the stored shorter side "
            "(0 = round(crop * 256 / 224))."),
        rows_per_shard=flags.DEFINE_integer("rows_per_shard", 4096,
                                            "Rows per ArrayRecord shard."),
        jpeg_quality=flags.DEFINE_integer("jpeg_quality", 95,
                                          "--image_format=jpeg: the JPEG quality."),
        overwrite=flags.DEFINE_bool("overwrite", False,
                                    "Replace other prepared data in --out."),
        workers=flags.DEFINE_integer("workers", 0, "Processes decoding and resizing images "
                                     "(0 = this one)."),
    )


def is_pair_config(config: ml_collections.ConfigDict) -> bool:
    """Whether the config's data block is contrastive pairs (else a language-model kind)."""
    return "image_column" in config.get("data", {})


def prepare(config: ml_collections.ConfigDict, out: str, **options: Any) -> Any:
    """Prepare ``config``'s data into ``out`` (module docstring); ``options``:
    :func:`jaxtrain.data.prepared_pairs.prepare_pairs`'s keywords (pairs only). Returns the
    manifest (pairs) or what ``build_token_store`` returns."""
    if not is_pair_config(config):
        try:
            from jaxtrain.data.token_store import build_token_store
        except ImportError as e:
            raise ConfigError(
                f"The config's task {config.get('task')!r} reads text: preparing it means "
                "building a token store, and jaxtrain.data.token_store.build_token_store is "
                f"not available in this install ({e}).") from e
        return build_token_store(config, out)
    from jaxtrain.api import build_task
    from jaxtrain.data.pair_writer import prepare_pairs

    _, task = build_task(config)
    model = task.model_config
    if not model.image_size:
        raise ConfigError("The model has no image tower (image size 0): a text-only pair "
                          "config has no images to prepare.")
    return prepare_pairs(task.data_config, out, mode=config.contrastive.mode,
                         num_negatives=config.contrastive.num_negatives,
                         image_size=model.image_size, text_max_len=model.text_max_len,
                         seed=config.seed, **options)


def main(argv: list[str]) -> int:
    """Prepare the --config's data into --out; exit code 2 on a bad config or data."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = define_flags()
    config, out = f["config"].value, f["out"].value
    options = {}
    if is_pair_config(config):
        options = {k: f[k].value for k in ("image_format", "short_side", "rows_per_shard",
                                           "jpeg_quality", "overwrite", "workers")}
    try:
        result = prepare(config, out, **options)
    except (ConfigError, ValueError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        return 2
    if isinstance(result, dict) and "parts" in result:
        parts = ", ".join(f"{w}: {p['rows']} rows in {len(p['shards'])} shards"
                          for w, p in result["parts"].items())
        logging.info("Prepared %s into %s (%s; fingerprint %s). Train with "
                     "--config.data.name=%s", result["source"], out, parts,
                     result["fingerprint"][:12], out)
    return 0


def run() -> None:
    """``python -m jaxtrain.data.prepare``."""
    from jaxtrain.cli import parse_flags, setup_logging

    define_flags()
    flags.mark_flags_as_required(["config", "out"])
    setup_logging()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run())
