"""The engine's configuration: defaults, and validation with errors that name the key and the rule.

Every config file starts from :func:`base_config` and fills in the task's sections (`model`,
`data`). :func:`validate` runs before anything is compiled: it rejects unknown keys (naming the
nearest valid ones), wrong types and impossible values.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections

from jaxtrain.errors import ConfigError
from jaxtrain.trackers import check_report_to

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "linear", "cosine", "cosine_restarts", "wsd", "rsqrt")
NONFINITE_MODES = ("skip", "error")
MODES = ("min", "max")




def parse_variants(arg: str | None, valid: Iterable[str], config_file: str) -> dict[str, str]:
    """`get_config(arg)`'s "a,b=1" -> {"a": "", "b": "1"}; unknown names are a ConfigError."""
    args = dict(kv.partition("=")[::2] for kv in (arg or "").split(",") if kv)
    unknown = sorted(set(args) - {v.partition("=")[0] for v in valid})
    if unknown:
        raise ConfigError(
            f"Unknown {config_file} variant(s) {unknown}; valid: {', '.join(valid)}."
        )
    return args


def set_steps(c: ml_collections.ConfigDict, steps: int) -> None:
    """A config file's `:steps=N` variant: `train.steps = N`, the warmup scaled with it so it
    keeps its share of the run, `W' = min(round(W · N / T), N - 1)` (T, W: the config's steps
    and `optim.warmup_steps` before; a `warmup_ratio` scales by itself). A 300-step run with 30
    warmup steps becomes, at `steps=30`, 30 steps with 3."""
    if steps <= 0:
        raise ConfigError(f"The variant steps={steps} must be > 0.")
    total, warmup = c.train.steps, c.optim.warmup_steps
    c.train.steps = steps
    if warmup > 0:
        c.optim.warmup_steps = min(round(warmup * steps / total), steps - 1)


def cadence(steps: int) -> ml_collections.FieldReference:
    """The default of a cadence key (`eval.every`, `checkpoint.every`, `evals.<name>.every`): a
    number of steps, which may be set to 'epoch' (the step where each epoch ends). Typed
    `object`, so a config file and a command-line override (`--config.eval.every=epoch`) may set
    either; :func:`validate` checks the value (an int, or 'epoch')."""
    return ml_collections.FieldReference(steps, field_type=object)


def base_config() -> ml_collections.ConfigDict:
    """Engine defaults shared by every task. Task configs override and add `model` / `data`."""
    c = ml_collections.ConfigDict()
    c.task = ""  # registered task name, e.g. 'clip'
    c.seed = 0  # one seed; params, dropout and data order are derived from it by name
    # Start from a chosen checkpoint: '' = the workdir's latest (if any); a step of this workdir
    # ('40': resume there, later checkpoints moved aside as <step>.after-resume-<time>); or a path
    # to another run's workdir / checkpoints dir / step dir (a fine-tune: its params, a fresh
    # optimizer, step 0). Once this workdir has checkpoints of its own, a path is ignored.
    c.resume_from = ""

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    # ZeRO-1/2: params replicated over `data` (as plain data parallel), the optimizer state split
    # over it (each leaf on its largest dimension `data` divides; see jaxtrain.mesh.split_over)
    c.mesh.shard_optimizer = False

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global batch, over all devices and hosts
    c.train.steps = 1000
    # > 0: train this many passes over the data instead of train.steps (leave train.steps at its
    # default): steps = ceil(epochs * Task.num_train_examples() / batch_size); the LR schedule
    # and warmup_ratio follow the derived steps (jaxtrain/epochs.py).
    c.train.epochs = 0.0
    c.train.accum_steps = 1  # gradient accumulation: the batch is split in this many microbatches
    c.train.nonfinite = "skip"  # NaN/Inf loss or grads: 'skip' the update, or stop with an 'error'
    c.train.max_nonfinite_streak = 25  # 'skip' mode: stop after this many in a row; 0 = never
    # float16 compute (model.dtype='float16'): 'dynamic', a fixed scale as a string ('1024'), or
    # 'none'. See jaxtrain/loss_scale.py; dynamic's overflow-skipped steps are not 'nonfinite'.
    c.train.loss_scale = "none"
    c.train.loss_scale_init = 2.0**15  # 'dynamic': the first scale S
    c.train.loss_scale_growth_interval = 2000  # 'dynamic': double S after this many good steps
    c.train.log_every = 50
    c.train.progress_bar = True
    c.train.peak_tflops = 0.0  # per-device peak for MFU; 0 = look up known accelerators
    # batches read and put on the devices ahead of the step, in a thread (jaxtrain/prefetch.py);
    # 2 = double buffering, 0 = read and copy in the step's thread
    c.train.prefetch_to_device = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 0.0
    c.optim.wd_exclude = r"(bias|scale|norm|embed|pos_emb|logit_scale)"
    c.optim.clip_norm = 1.0
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.warmup_ratio = 0.0
    c.optim.min_lr_ratio = 0.0
    c.optim.num_cycles = 2
    c.optim.decay_ratio = 0.2
    c.optim.rsqrt_timescale = 0
    c.optim.param_groups = ()  # ((regex, lr_multiplier), ...); multiplier 0 freezes
    # Keep the optimizer state in host memory (memory kind 'pinned_host', same sharding); the
    # step brings it to the device for the update and sends it back. See jaxtrain/offload.py.
    c.optim.offload_state = False

    c.eval = ml_collections.ConfigDict()
    c.eval.every = cadence(200)  # evaluators' default cadence; 0 = only at the end; 'epoch'
    c.eval.batch_size = 256  # evaluators' default global batch
    c.eval.early_stop_metric = ""  # e.g. 'eval/retrieval/mean_recall@1'; '' = no early stopping
    c.eval.early_stop_mode = "max"
    c.eval.patience = 3  # evaluations without improvement before stopping
    c.eval.min_delta = 0.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = cadence(200)  # 0 = only at the end; 'epoch' = where each epoch ends
    c.checkpoint.keep = 3  # most recent checkpoints kept
    c.checkpoint.best_metric = ""  # also keep the best by this eval metric; '' = off
    c.checkpoint.best_mode = "max"
    c.checkpoint.async_save = True
    # No checkpoint of the workdir can be read: 'error' (exit 2, listing them) or 'start_over'
    # (move them aside as <step>.corrupt and train from step 0). Readable ones always resume.
    c.checkpoint.if_unreadable = "error"
    # Precision of params-only saves (python -m jaxtrain.export: --params_out, safetensors, HF;
    # its --dtype overrides): '' = as trained, or 'bfloat16' | 'float16' | 'float32'. Floating
    # params are cast on write; the training checkpoint always keeps full precision.
    c.checkpoint.save_dtype = ""

    # When the run ends normally (not preempted, not on an error), export a checkpoint as
    # `python -m jaxtrain.export` would, into <workdir>/export/<format> (process 0): formats from
    # 'safetensors', 'stablehlo', 'hf', 'sentence-transformers'; () = none. `checkpoint`: 'best'
    # (the best by checkpoint.best_metric when there is one, else the last) or 'last'.
    c.export = ml_collections.ConfigDict()
    c.export.at_end = ()
    c.export.checkpoint = "best"

    # LoRA (any task): rank 0 = off. See jaxtrain/lora.py.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.lora.dropout = 0.0
    c.lora.targets = r".*(q_proj|k_proj|v_proj|o_proj)/kernel"  # regex over kernel paths
    c.lora.trainable = ""  # regex: other parameters trained in full (e.g. '.*norm.*')
    c.lora.base_dtype = "float32"  # frozen base weights: 'float32' | 'bfloat16'

    # The run's name in every tracker and in the logs; '' = the workdir's folder name
    # (jaxtrain.trackers.run_name). Sweeps name their trials '<sweep>/trial_<NNNN>'.
    c.run_name = ""
    # Trackers (jaxtrain/trackers.py): where metrics go, any of 'tensorboard' (<workdir>/
    # tensorboard), 'jsonl' (<workdir>/metrics.jsonl, read back on resume) and 'wandb' (pip
    # install 'jaxtrain[wandb]'; the W&B run id is kept in <workdir>/wandb_run_id, so a restart
    # resumes the same run; WANDB_MODE=offline works without network).
    c.logging = ml_collections.ConfigDict()
    c.logging.report_to = ("tensorboard", "jsonl")
    c.logging.wandb_project = "jaxtrain"
    c.logging.wandb_entity = ""  # '' = your default W&B entity
    c.logging.wandb_tags = ()  # e.g. ('clip', 'baseline')
    c.logging.wandb_group = ""  # '' = none; sweeps group their trials by the sweep's name

    c.model = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    # Named evaluators, `evals.<name> = jaxtrain.evaluator.eval_config(type, ...)`: metrics
    # `eval/<name>/...`. Tasks set their defaults; a config may add, change or delete them.
    c.evals = ml_collections.ConfigDict()
    return c


# ---------------------------------------------------------------------------------------------
# Validation


def _flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            out[path] = value
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _close(key: str, valid: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def check_keys(cfg: Mapping, schema: Mapping, *, prefix: str = "", skip: str = "") -> None:
    """Every key of `cfg` must exist in `schema` (recursively); else name it and the nearest.
    `prefix` is prepended to key paths in messages; keys under `skip` (e.g. "evals.") are
    left to their own check."""
    flat_cfg, flat_schema = _flatten(cfg), _flatten(schema)
    for path in flat_cfg:
        if path not in flat_schema and not (skip and path.startswith(skip)):
            parent = path.rpartition(".")[0]
            siblings = [p for p in flat_schema if p.rpartition(".")[0] == parent]
            raise ConfigError(
                f"Unknown config key '{prefix}{path}'.{_close(path, siblings)} "
                f"Valid keys here: {', '.join(sorted(s.rpartition('.')[2] for s in siblings))}."
            )


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


def check_types(cfg: Mapping, schema: Mapping, *, prefix: str = "") -> None:
    flat_schema = _flatten(schema)
    for path, value in _flatten(cfg).items():
        default = flat_schema.get(path)
        if isinstance(default, Mapping | ml_collections.ConfigDict):
            continue
        if value == "epoch" and re.fullmatch(r"eval\.every|checkpoint\.every|evals\.[^.]+\.every",
                                             prefix + path):  # a cadence key (see `cadence`)
            continue
        if not _type_ok(value, default):
            raise ConfigError(
                f"Config key '{prefix}{path}' must be {type(default).__name__} "
                f"(like its default {default!r}), got {type(value).__name__} {value!r}."
            )


Rule = tuple[str, Callable[[Any], bool], str]


def _is_regex(value: str) -> bool:
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _is_loss_scale(value: str) -> bool:
    """'none', 'dynamic', or a positive finite number (a fixed scale) written as a string."""
    if value in ("none", "dynamic"):
        return True
    try:
        return 0 < float(value) < float("inf")
    except (TypeError, ValueError):
        return False


_RULES: list[Rule] = [
    ("seed", lambda v: v >= 0, "must be >= 0"),
    ("train.batch_size", lambda v: v > 0, "must be > 0"),
    ("train.steps", lambda v: v > 0, "must be > 0"),
    ("train.epochs", lambda v: v >= 0, "must be >= 0 (0 = use train.steps)"),
    ("train.accum_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.nonfinite", lambda v: v in NONFINITE_MODES, f"must be one of {NONFINITE_MODES}"),
    ("train.max_nonfinite_streak", lambda v: v >= 0, "must be >= 0 (0 = never stop)"),
    ("train.loss_scale", _is_loss_scale,
     "must be 'none', 'dynamic' or a positive number as a string (a fixed scale, e.g. '1024')"),
    ("train.loss_scale_init", lambda v: v >= 1, "must be >= 1 (e.g. 32768.0 = 2**15)"),
    ("train.loss_scale_growth_interval", lambda v: v >= 1, "must be >= 1"),
    ("train.log_every", lambda v: v > 0, "must be > 0"),
    ("train.peak_tflops", lambda v: v >= 0, "must be >= 0"),
    ("train.prefetch_to_device", lambda v: v >= 0, "must be >= 0 (0 = no device prefetch)"),
    ("optim.name", lambda v: v in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
    ("optim.schedule", lambda v: v in SCHEDULES, f"must be one of {SCHEDULES}"),
    ("optim.lr", lambda v: v > 0, "must be > 0 (freeze parameters with optim.param_groups)"),
    ("optim.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("optim.clip_norm", lambda v: v is None or v >= 0, "must be >= 0 (0 = no clipping)"),
    ("optim.warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("optim.warmup_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("optim.b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optim.num_cycles", lambda v: v >= 1, "must be >= 1"),
    ("optim.decay_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("eval.every", lambda v: v == "epoch" or v >= 0,
     "must be >= 0 (0 = only at the end) or 'epoch'"),
    ("eval.batch_size", lambda v: v > 0, "must be > 0"),
    ("eval.early_stop_mode", lambda v: v in MODES, f"must be one of {MODES}"),
    ("eval.patience", lambda v: v >= 1, "must be >= 1"),
    ("eval.min_delta", lambda v: v >= 0, "must be >= 0"),
    ("checkpoint.every", lambda v: v == "epoch" or v >= 0,
     "must be >= 0 (0 = only at the end) or 'epoch'"),
    ("checkpoint.keep", lambda v: v >= 1, "must be >= 1"),
    ("checkpoint.best_mode", lambda v: v in MODES, f"must be one of {MODES}"),
    ("checkpoint.if_unreadable", lambda v: v in ("error", "start_over"),
     "must be 'error' or 'start_over'"),
    ("checkpoint.save_dtype", lambda v: v in ("", "bfloat16", "float16", "float32"),
     "must be '' (as trained), 'bfloat16', 'float16' or 'float32'"),
    ("export.checkpoint", lambda v: v in ("best", "last"), "must be 'best' or 'last'"),
    ("export.at_end", lambda v: all(isinstance(f, str) and f for f in v),
     "must be a tuple of export format names, e.g. ('hf',) or ('safetensors', 'stablehlo')"),
    ("lora.rank", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("lora.alpha", lambda v: v > 0, "must be > 0"),
    ("lora.dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("lora.base_dtype", lambda v: v in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16'"),
    ("lora.targets", _is_regex, "must be a valid regular expression"),
    ("lora.trainable", _is_regex, "must be a valid regular expression"),
]


def apply_rules(cfg: Mapping, rules: Iterable[Rule]) -> None:
    """Each (key path, predicate, rule text) whose key is in `cfg` must hold."""
    flat = _flatten(cfg)
    for path, ok, rule in rules:
        if path in flat and not ok(flat[path]):
            raise ConfigError(f"Config key '{path}' {rule}; got {flat[path]!r}.")


def check_rules(cfg: ml_collections.ConfigDict, rules: Iterable[Rule] = ()) -> None:
    apply_rules(cfg, [*_RULES, *rules])
    if "logging" in cfg:  # tracker names; 'wandb' needs the package (before anything runs)
        check_report_to(cfg.logging.report_to)
    for name, size in cfg.mesh.items():
        if name == "shard_optimizer":  # a setting, not an axis size (jaxtrain.mesh.MESH_OPTIONS)
            continue
        if size != -1 and size < 1:
            raise ConfigError(
                f"Config key 'mesh.{name}' must be -1 (the rest) or >= 1; got {size}."
            )
    if sum(1 for k, s in cfg.mesh.items() if s == -1 and k != "shard_optimizer") > 1:
        raise ConfigError(f"At most one mesh axis may be -1 ('the rest'); got {dict(cfg.mesh)}.")
    if cfg.optim.warmup_steps > 0 and cfg.optim.warmup_ratio > 0:
        raise ConfigError("Set optim.warmup_steps or optim.warmup_ratio, not both.")
    if cfg.optim.warmup_steps >= cfg.train.steps and not cfg.train.get("epochs"):
        # with train.epochs the steps are derived later (jaxtrain.trainer), checked there
        raise ConfigError(
            f"Config key 'optim.warmup_steps' ({cfg.optim.warmup_steps}) must be smaller than "
            f"train.steps ({cfg.train.steps})."
        )
    if cfg.train.batch_size % cfg.train.accum_steps:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by train.accum_steps "
            f"({cfg.train.accum_steps})."
        )
    for i, group in enumerate(cfg.optim.param_groups):
        if not (isinstance(group, tuple | list) and len(group) == 2):
            raise ConfigError(
                f"optim.param_groups[{i}] must be a (regex, lr_multiplier) pair; got {group!r}."
            )
        try:
            re.compile(group[0])
        except re.error as e:
            raise ConfigError(f"optim.param_groups[{i}] regex {group[0]!r} is invalid: {e}") from e
        if not isinstance(group[1], int | float) or group[1] < 0:
            raise ConfigError(
                f"optim.param_groups[{i}] multiplier must be a number >= 0; got {group[1]!r}."
            )
    evals = sorted(cfg.get("evals", {}))
    for key in ("eval.early_stop_metric", "checkpoint.best_metric"):
        metric = cfg.eval.early_stop_metric if key.startswith("eval.") else \
            cfg.checkpoint.best_metric
        if metric and (not metric.startswith("eval/") or metric.split("/")[1] not in evals
                       or metric.count("/") < 2):
            raise ConfigError(
                f"Config key '{key}' must name an evaluator's metric, 'eval/<evaluator>/<metric>'"
                f" (evaluators of this run: {evals}), e.g. 'eval/{(evals or ['val'])[0]}/loss'; "
                f"got {metric!r}."
            )


def check_divisibility(cfg: ml_collections.ConfigDict, data_parallel: int) -> None:
    """The global (micro)batch must split evenly over the data-parallel devices."""
    micro = cfg.train.batch_size // cfg.train.accum_steps
    if micro % data_parallel:
        raise ConfigError(
            f"train.batch_size / train.accum_steps = {micro} is not divisible by the "
            f"data-parallel size {data_parallel} (mesh.data x mesh.fsdp x mesh.expert). Choose a "
            f"batch size that is a multiple of {data_parallel * cfg.train.accum_steps}."
        )
    if cfg.eval.batch_size % data_parallel:
        raise ConfigError(
            f"eval.batch_size ({cfg.eval.batch_size}) is not divisible by the data-parallel size "
            f"{data_parallel}; use a multiple of {data_parallel}."
        )


def validate(
    cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, rules: Iterable[Rule] = ()
) -> None:
    """Check names, types and values of `cfg` against `schema` (the defaults) and the rules."""
    check_keys(cfg, schema, skip="evals.")
    check_types(cfg, schema)
    check_rules(cfg, rules)
    if cfg.train.get("epochs") and cfg.train.steps != schema.train.steps:
        raise ConfigError(
            f"Set train.epochs ({cfg.train.epochs}) or train.steps ({cfg.train.steps}), not both: "
            f"with epochs the steps are derived from the dataset size. Drop the train.steps "
            f"override (its default is {schema.train.steps}) or set train.epochs=0.")
    for name, block in cfg.get("evals", {}).items():
        if not isinstance(block, Mapping | ml_collections.ConfigDict) or not block.get("type"):
            raise ConfigError(
                f"Config key 'evals.{name}' must be an evaluator block with a 'type' (e.g. "
                f"jaxtrain.evaluator.eval_config('retrieval')); got {block!r}.")
