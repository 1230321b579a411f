"""Per-device memory of a config's train step on machines you do not have.

    # TPU: compiled ahead of time by the TPU compiler (libtpu), no TPU needed. Python >= 3.12:
    #   python3.12 -m venv /work/tpuvenv && /work/tpuvenv/bin/pip install "jax[tpu]" flax optax \
    #       orbax-checkpoint ml-collections absl-py grain datasets transformers tensorboardX
    PYTHONPATH=. /work/tpuvenv/bin/python benchmarks/memory_plan.py \
        --config=configs/lm.py:size=7b --config.data.seq_len=4096 --config.train.batch_size=8 \
        --config.mesh.data=1 --config.mesh.fsdp=-1 --topology=v5p-16 \
        --remat=none,full,dots_no_batch

    # GPU (or anything else): the estimate alone, nothing compiled, seconds
    python benchmarks/memory_plan.py --config=configs/lm.py:size=70b ... --topology=gpu-64 \
        --estimate --hbm_gib=80

    # simulated CPU devices (XLA:CPU's plan, a cross-check of the exact parts)
    python benchmarks/memory_plan.py ... --topology=v5p-16 --platform=cpu

For every remat policy (and offload setting) asked, one row: the compiled step's per-device
arguments, outputs, temporaries and total (arguments + outputs + temporaries - aliased, i.e. the
donated state counted once), next to the estimate of `benchmarks/memory_estimate.py` (parameter,
gradient and optimizer bytes exact from shapes and shardings; activations by its formula) and
whether it fits the device's memory (--hbm_gib, default the topology's: v5p 95 GiB, v5e 16 GiB,
v4 32 GiB, v6e 32 GiB, gpu 79.6 GiB = an H100 80GB, of which JAX takes 75% by default).
A step the TPU compiler rejects as too big for the chip's memory is a row saying so, with the
temporaries it asked for. Nothing proportional to the model is allocated: the state is
`jax.eval_shape`'s, the inputs are ShapeDtypeStructs with shardings; one batch of the config's
data is read for its shapes (use --config.data.kind=synthetic --config.data.train_examples=N for
a data set that is not here).

Topologies: v5p-N and v4-N count TensorCores (2 per chip: v5p-16 = 8 chips, v5p-128 = 64
chips); v5e-N / v5litepod-N and v6e-N count chips; `v5p:4x4x4` names the chip grid directly;
gpu-N (N devices) is for --estimate and --platform=cpu only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
from typing import Any

# Simulated CPU devices must be asked for before JAX starts.
_PLATFORM = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--platform=")), "tpu")
_n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")), "")
if (_PLATFORM == "cpu" or _n.startswith("gpu-") or "--estimate" in sys.argv) and \
        "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _m = re.match(r"^[a-z0-9]+-(\d+)$", _n)
    if _m:
        _chips = int(_m.group(1)) // (2 if _n.startswith(("v5p", "v4")) else 1)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_chips}")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_estimate as est  # noqa: E402

from jaxtrain import Trainer  # noqa: E402
from jaxtrain.errors import ConfigError  # noqa: E402
from jaxtrain.mesh import batch_sharding  # noqa: E402

GIB = est.GIB
# gpu: an H100 80GB holds 81559 MiB (79.6 GiB); JAX preallocates 75% of it unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise, so plan for <= 60 GiB there.
HBM_GIB = {"v5p": 95.0, "v5e": 16.0, "v5litepod": 16.0, "v4": 32.0, "v6e": 32.0, "gpu": 79.6}
# chips -> chip grid (v5p / v4: 3-D tori; v5e / v6e: 2-D), as the TPU docs and MaxText name them
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
           256: "4x8x8", 512: "8x8x8"}
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}
# offload setting -> the config keys it sets (jaxtrain's host offload keys)
OFFLOAD = {"none": {}, "state": {"optim.offload_state": True},
           "params": {"model.offload_params": True},
           "both": {"optim.offload_state": True, "model.offload_params": True}}


def parse_topology(name: str) -> dict[str, Any]:
    """'v5p-16' -> {'family': 'v5p', 'chips': 8, 'grid': 'v5p:2x2x2', 'hbm_gib': 95.0}."""
    m = re.fullmatch(r"(v5p|v4|v5e|v5litepod|v6e):(\d+(?:x\d+)+)", name)
    if m:
        family, dims = m.group(1), m.group(2)
        chips = 1
        for d in dims.split("x"):
            chips *= int(d)
        return {"family": family, "chips": chips, "grid": name, "hbm_gib": HBM_GIB[family]}
    m = re.fullmatch(r"(v5p|v4|v5e|v5litepod|v6e|gpu)-(\d+)", name)
    if not m:
        raise ConfigError(
            f"--topology={name!r}: expected v5p-N, v4-N (TensorCores, 2 per chip), v5e-N, "
            "v6e-N (chips), gpu-N (devices; --estimate or --platform=cpu), or a chip grid such "
            "as v5p:2x2x2.")
    family, n = m.group(1), int(m.group(2))
    chips = n // 2 if family in ("v5p", "v4") else n
    grids = GRID_3D if family in ("v5p", "v4") else GRID_2D
    grid = None if family == "gpu" else grids.get(chips)
    if family != "gpu" and grid is None:
        raise ConfigError(f"--topology={name!r}: no known chip grid for {chips} chips; "
                          f"known: {sorted(grids)} chips, or name the grid (e.g. v5p:4x4x4).")
    tpu = "v5e" if family == "v5litepod" else family
    return {"family": family, "chips": chips, "grid": grid and f"{tpu}:{grid}",
            "hbm_gib": HBM_GIB[family]}


def topology_devices(topo: dict[str, Any], platform: str) -> list:
    """The devices to build the mesh on: the TPU topology's (no hardware needed), or the first
    `chips` simulated CPU devices."""
    if platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < topo["chips"]:
            raise ConfigError(
                f"--platform=cpu needs {topo['chips']} devices, JAX has {len(devices)}: set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={topo['chips']}.")
        return devices[: topo["chips"]]
    if topo["grid"] is None:
        raise ConfigError("--topology=gpu-N has no compiler here: add --estimate (or "
                          "--platform=cpu for XLA:CPU's figures).")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topo["grid"],
                                                 platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - report why, with the way out
        hint = ("another process holds libtpu: wait for it, or run this one with "
                "ALLOW_MULTIPLE_LIBTPU_LOAD=1" if "lockfile" in str(e) else
                "the TPU compile needs libtpu (pip install 'jax[tpu]', Python >= 3.12); without "
                "it use --estimate, or --platform=cpu")
        raise ConfigError(f"Cannot get the TPU topology {topo['grid']!r} "
                          f"({type(e).__name__}: {e}): {hint}.") from e


def with_overrides(config, overrides: dict[str, Any]):
    """A copy of `config` with dotted keys set; a key the config lacks is a ConfigError."""
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        section, key = dotted.rsplit(".", 1)
        block = config
        for part in section.split("."):
            block = block[part]
        if key not in block:
            raise ConfigError(f"this jaxtrain has no config key {dotted}")
        block[key] = value
    return config


def abstract_inputs(trainer: Trainer) -> tuple[Any, dict]:
    """(state, batch) as ShapeDtypeStructs with the trainer's shardings (batch shapes from one
    batch of the config's data)."""
    host = next(trainer.task.train_iterator(
        seed=0, batch_size=trainer.config.train.batch_size, process_index=0, process_count=1))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=batch_sharding(trainer.mesh, v.ndim))
             for k, v in host.items()}
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    return state, batch


def compiled_memory(trainer: Trainer) -> dict[str, int]:
    """The compiled step's memory analysis, per device, in bytes."""
    state, batch = abstract_inputs(trainer)
    memory = trainer.compiled_step(state, batch).fn.memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
            "host_temp_size_in_bytes", "host_alias_size_in_bytes")
    out = {k.removesuffix("_size_in_bytes"): int(getattr(memory, k, 0) or 0) for k in keys}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    out["host_total"] = (out["host_argument"] + out["host_output"] + out["host_temp"]
                         - out["host_alias"])
    return out


def mesh_sizes(trainer: Trainer) -> tuple[int, int, int]:
    """(rows per device per microbatch, tensor size, fsdp size)."""
    shape = dict(trainer.mesh.shape)
    dp = shape.get("data", 1) * shape.get("fsdp", 1)
    rows = trainer.config.train.batch_size // dp // trainer.config.train.accum_steps
    return max(rows, 1), shape.get("tensor", 1), shape.get("fsdp", 1)


def plan_row(config, devices, policy: str, offload: str, compile_step: bool,
             platform: str) -> dict[str, Any]:
    """One row of the plan: the estimate, and (compile_step) the compiled figures."""
    overrides = {"model.remat_policy": policy, **OFFLOAD[offload]}
    flash = platform == "gpu" and config.model.get("attention_impl") == "cudnn"
    if config.model.get("attention_impl") == "cudnn":
        overrides["model.attention_impl"] = None  # cuDNN needs a GPU to trace: XLA's here
    cfg = with_overrides(config, overrides)
    trainer = Trainer(cfg, workdir="/tmp/jaxtrain-memory-plan", devices=devices)
    rows, tp, fsdp = mesh_sizes(trainer)
    model = (dataclasses.replace(est.DecoderShape.from_model_config(cfg.model),
                                 flash_attention=flash)
             if "num_kv_heads" in cfg.model else None)
    state = est.state_bytes(trainer.abstract_state, trainer.state_shardings)
    row = {"policy": policy, "offload": offload, "devices": len(devices),
           "mesh": {k: v for k, v in trainer.mesh.shape.items() if v > 1},
           "batch": cfg.train.batch_size, "seq_len": cfg.data.get("seq_len"),
           "estimate_gib": est.estimate(state, model, policy, rows,
                                        cfg.data.get("seq_len") or 1, tp, fsdp)}
    if compile_step:
        try:
            memory = compiled_memory(trainer)
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler's "does not fit"
            row["compiled_oom"] = compile_oom(str(e))
            if row["compiled_oom"] is None:
                raise
            return row
        row["compiled_gib"] = {k: round(v / GIB, 3) for k, v in memory.items()}
        row["compiled_bytes"] = memory
    return row


def compile_oom(message: str) -> dict[str, float] | None:
    """{'temp': GiB asked, 'hbm': GiB available} from the TPU compiler's CompileTimeHbmOom
    message, else None."""
    m = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G",
                  message)
    return {"temp": float(m.group(1)), "hbm": float(m.group(2))} if m else None


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(rows: list[dict], hbm_gib: float) -> str:
    """The plan as text: GiB per device."""
    head = (f"{'policy':<22}{'offload':<8}{'params':>8}{'opt':>8}{'grads':>8}{'acts~':>8}"
            f"{'trans~':>8}{'est':>8}{'args':>8}{'out':>8}{'temp':>8}{'total':>8}{'host':>7}"
            f"  fits {hbm_gib:g} GiB")
    lines = [head]
    for r in rows:
        e, c = r["estimate_gib"], r.get("compiled_gib", {})
        total = c.get("total", e["total"])
        fits = "-" if total is None else ("yes" if total <= hbm_gib else "no")
        if "compiled_oom" in r:
            fits = (f"no: the compiler needs {r['compiled_oom']['temp']:g}G of temporaries, "
                    f"{r['compiled_oom']['hbm']:g}G available")
        lines.append(
            f"{r['policy']:<22}{r['offload']:<8}{fmt(e['params']):>8}{fmt(e['opt_state']):>8}"
            f"{fmt(e['grads']):>8}{fmt(e['activations']):>8}{fmt(e['transient']):>8}"
            f"{fmt(e['total']):>8}{fmt(c.get('argument')):>8}{fmt(c.get('output')):>8}"
            f"{fmt(c.get('temp')):>8}{fmt(c.get('total')):>8}"
            f"{fmt(c.get('host_total', e['host_state'] + (e.get('host_activations') or 0))):>7}"
            f"  {fits}")
    return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-16", "v5p-16, v5p-128, v5e-64, v4-16, "
                                "v5p:2x2x2, gpu-8 (see the module docstring).")
_PLATFORM_FLAG = flags.DEFINE_enum("platform", "tpu", ["tpu", "cpu"], "Compile for the TPU "
                                   "topology (libtpu) or for simulated CPU devices.")
_REMAT = flags.DEFINE_string("remat", "", "Comma-separated remat policies ('' = the config's).")
_OFFLOAD = flags.DEFINE_string("offload", "none", "Comma-separated: none, state, params, both.")
_ESTIMATE = flags.DEFINE_bool("estimate", False, "The estimate alone: nothing compiled.")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Device memory in GiB (0 = the topology's).")
_JSON = flags.DEFINE_bool("json", False, "Also print one JSON line per row.")


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    topo = parse_topology(_TOPOLOGY.value)
    estimate_only = _ESTIMATE.value
    if estimate_only:  # the mesh needs devices: simulated CPU ones, never used
        devices = _abstract_devices(topo["chips"])
    else:
        devices = topology_devices(topo, _PLATFORM_FLAG.value)
    platform = "gpu" if topo["family"] == "gpu" else _PLATFORM_FLAG.value
    policies = [p for p in _REMAT.value.split(",") if p] or [config.model.remat_policy]
    rows, skipped = [], []
    for offload in _OFFLOAD.value.split(","):
        if offload not in OFFLOAD:
            raise ConfigError(f"--offload={offload!r}: choose from {', '.join(OFFLOAD)}.")
        missing = [k for k in OFFLOAD[offload] if not _has_key(config, k)]
        if missing:
            skipped.append(f"offload={offload}: this jaxtrain has no {', '.join(missing)}")
            continue
        for policy in policies:
            rows.append(plan_row(config, devices, policy, offload, not estimate_only, platform))
            if _JSON.value:
                print(json.dumps(rows[-1]), flush=True)
    hbm = _HBM.value or topo["hbm_gib"]
    r0 = rows[0] if rows else {}
    print(f"{_TOPOLOGY.value} ({topo['chips']} devices, {platform}"
          f"{', estimate only' if estimate_only else ', compiled'}); mesh {r0.get('mesh')}; "
          f"batch {r0.get('batch')} x {r0.get('seq_len')}; GiB per device "
          "(~ = estimated; total = args + out + temp - aliased)")
    print(table(rows, hbm))
    for s in skipped:
        print(f"skipped {s}")
    if platform == "cpu" and not estimate_only:
        print("XLA:CPU: arguments and outputs are exact; its temporaries ignore the remat "
              "policy (it schedules the recomputation before the backward pass), so read the "
              "estimate or the TPU compile for activations.")


def _has_key(config, dotted: str) -> bool:
    section, key = dotted.rsplit(".", 1)
    block = config
    for part in section.split("."):
        if part not in block:
            return False
        block = block[part]
    return key in block


def _abstract_devices(n: int) -> list:
    """n stand-in devices for a mesh that is never compiled for (--estimate): simulated CPU
    devices (their count is set before JAX starts)."""
    cpu = jax.devices("cpu")
    if len(cpu) >= n:
        return cpu[:n]
    raise ConfigError(
        f"--estimate for {n} devices found {len(cpu)} CPU devices: XLA_FLAGS already sets "
        f"--xla_force_host_platform_device_count; set it to {n} or more.")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
