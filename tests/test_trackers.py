"""Trackers (`logging.report_to`): the W&B run written offline holds the run's history, config,
name and tags, and a restart resumes the same run; run names; config errors for an unknown
tracker or a missing wandb package."""

import datetime
import json
import struct
import sys
import time
from pathlib import Path

import pytest

import jaxtrain
from jaxtrain import trackers
from jaxtrain.errors import ConfigError
from tests import toy_task


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: a 7-byte header (":W&B", 0xBEE1, version),
    then 32 KiB blocks of chunks, each [crc32c u32][length u16][type u8] + payload, type
    1 = a whole record, 2/3/4 = its first / middle / last part (LevelDB's log format)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def offline_run(folder: Path) -> dict:
    """What an offline run folder holds: its run record, config and history rows by step
    (a name with '/' is stored as its parts, `nested_key`)."""
    (path,) = folder.glob("run-*.wandb")
    out = {"history": {}, "config": {}}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, project=r.run.project,
                       tags=list(r.run.tags), group=r.run.run_group)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            row = {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
            out["history"].setdefault(r.history.step.num, {}).update(row)
    return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)


def jsonl(workdir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record.pop("step"), {}).update(record)
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_history_config_name_and_resumes(tmp_path, offline):
    workdir = tmp_path / "toy_wandb"
    cfg = toy_task.config(logging__report_to=("tensorboard", "jsonl", "wandb"),
                          logging__wandb_tags=("toy", "ci"), logging__wandb_project="jt-test",
                          run_name="toy/lr-0.01")
    first = jaxtrain.Trainer(cfg, str(workdir)).train(stop_at_step=4)  # stops as if preempted
    run_id = (workdir / "wandb_run_id").read_text().strip()
    (folder,) = (workdir / "wandb").glob("offline-run-*")
    run = offline_run(folder)
    assert (run["id"], run["name"], run["project"], run["tags"]) == \
        (run_id, "toy/lr-0.01", "jt-test", ["toy", "ci"])
    assert run["config"]["train"]["steps"] == 8 and run["config"]["optim"]["lr"] == 0.01
    assert run["config"]["run_name"] == "toy/lr-0.01"
    # the history is the run's records, as metrics.jsonl has them
    assert run["history"] == jsonl(workdir)
    assert {"train/loss", "eval/val/loss"} <= set(run["history"][4])
    assert first.final_step == 4 and (workdir / "tensorboard").is_dir()

    # wandb names an offline folder by its start second: a restart in the same second would
    # reuse the first one (a test on a fast machine, not a real restart)
    while folder.name.split("-")[2] == datetime.datetime.now().strftime("%Y%m%d_%H%M%S"):
        time.sleep(0.05)
    jaxtrain.Trainer(cfg, str(workdir)).train()  # the restart: same W&B run, steps 5..8
    assert (workdir / "wandb_run_id").read_text().strip() == run_id
    folders = sorted((workdir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    resumed = offline_run(folders[1])
    assert resumed["id"] == run_id and resumed["name"] == "toy/lr-0.01"
    assert min(resumed["history"]) >= 4 and max(resumed["history"]) == 8
    merged = {step: dict(row) for step, row in run["history"].items()}
    for step, row in resumed["history"].items():  # step 4: the restart's compile time too
        merged.setdefault(step, {}).update(row)
    assert merged == jsonl(workdir) and {2, 4, 6, 8} <= set(merged)


def test_report_to_picks_the_trackers(tmp_path):
    workdir = tmp_path / "only_jsonl"
    cfg = toy_task.config(logging__report_to=("jsonl",), train__steps=2, eval__every=0,
                          checkpoint__every=0)
    result = jaxtrain.Trainer(cfg, str(workdir)).train()
    assert result.final_step == 2 and sorted(jsonl(workdir)) == [0, 2]
    assert not (workdir / "tensorboard").exists() and not (workdir / "wandb").exists()


def test_report_to_from_the_command_line():
    # --config.logging.report_to=tensorboard,wandb reaches the config as ('tensorboard,wandb',)
    assert trackers.report_to_names(("tensorboard,wandb",)) == ("tensorboard", "wandb")
    assert trackers.report_to_names("jsonl") == ("jsonl",)
    assert trackers.report_to_names(("tensorboard", "jsonl")) == ("tensorboard", "jsonl")


def test_run_name_defaults_to_the_workdir_folder(tmp_path):
    cfg = toy_task.config()
    assert trackers.run_name(cfg, str(tmp_path / "runs" / "clip_b32") + "/") == "clip_b32"
    cfg.run_name = "baseline"
    assert trackers.run_name(cfg, str(tmp_path / "runs" / "clip_b32")) == "baseline"


@pytest.mark.parametrize("report_to, message", [
    (("tensorboard", "wandbb"), "unknown tracker(s) ['wandbb']; valid: tensorboard, jsonl, wandb"),
    (("jsonl", "jsonl"), "repeats a tracker"),
])
def test_a_bad_tracker_name_is_a_config_error(tmp_path, report_to, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        jaxtrain.Trainer(toy_task.config(logging__report_to=report_to), str(tmp_path / "w"))


def test_wandb_not_installed_is_a_config_error_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    cfg = toy_task.config(logging__report_to=("tensorboard", "jsonl", "wandb"))
    with pytest.raises(ConfigError, match=r"pip install 'jaxtrain\[wandb\]'"):
        jaxtrain.Trainer(cfg, str(tmp_path / "w"))  # at validation, before anything runs
    # and where a config skipped validation: at the start of the run, nothing trained
    with pytest.raises(ConfigError, match=r"pip install 'jaxtrain\[wandb\]'"):
        trackers.WandbTracker(cfg, str(tmp_path))
