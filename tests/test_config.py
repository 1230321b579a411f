import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain.config import base_config, validate
from jaxtrain.tasks import get_task
from jaxtrain.tasks.clip import ClipTask
from tests import toy_task

ROOT = Path(__file__).resolve().parents[1]


def clip_config(arg="runlocal"):
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import clip

        return clip.get_config(arg)
    finally:
        sys.path.pop(0)


def test_unknown_key_names_key_and_close_match():
    c = ml_collections.ConfigDict(toy_task.config().to_dict())
    c.optim.learning_rate = 0.1
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*Valid keys here: .*lr"):
        validate(c, toy_task.RegressionTask.default_config())
    c = ml_collections.ConfigDict(toy_task.config().to_dict())
    c.train.step = 3
    with pytest.raises(ConfigError, match=r"'train\.step'.*Did you mean 'train\.steps'"):
        validate(c, toy_task.RegressionTask.default_config())


def test_locked_config_rejects_misspelt_key():
    c = clip_config()
    with pytest.raises(AttributeError, match=r'Did you mean "lr"'):
        c.optim.lrr = 1.0


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("optim__lr", -1.0, r"'optim\.lr' must be > 0"),
        ("train__steps", 0, r"'train\.steps' must be > 0"),
        ("optim__name", "adam", r"'optim\.name' must be one of"),
        ("train__nonfinite", "ignore", r"'train\.nonfinite' must be one of"),
        ("optim__warmup_steps", 100, r"warmup_steps.*must be smaller than train\.steps"),
        ("checkpoint__best_metric", "loss", r"must name an evaluator.s metric"),
        ("checkpoint__best_metric", "eval/nope/loss", r"evaluators of this run: \[.val.\]"),
        ("optim__param_groups", (("[", 0.1),), r"regex '\[' is invalid"),
        ("mesh__data", 0, r"'mesh\.data' must be -1"),
    ],
)
def test_impossible_values(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(toy_task.config(**{key: value}), toy_task.RegressionTask.default_config())


def test_wrong_type_names_key():
    d = toy_task.config().to_dict()
    d["train"]["steps"] = "ten"  # e.g. a config built from a dict or JSON
    c = ml_collections.ConfigDict(d)
    with pytest.raises(ConfigError, match=r"'train\.steps' must be int.*got str 'ten'"):
        validate(c, toy_task.RegressionTask.default_config())


def test_batch_not_divisible_by_data_parallel_size():
    with pytest.raises(ConfigError, match=r"not divisible by the data-parallel size 8"):
        Trainer(toy_task.config(train__batch_size=12))
    with pytest.raises(ConfigError, match=r"mesh .* needs 6 devices but 8"):
        Trainer(toy_task.config(mesh__data=3, mesh__tensor=2))


def test_unknown_task_and_variant():
    with pytest.raises(ConfigError, match=r"Unknown config.task 'clips'.*Did you mean 'clip'"):
        get_task("clips")
    with pytest.raises(ValueError, match=r"Unknown configs/clip.py variant"):
        clip_config("runlokal")


def test_task_rules():
    c = clip_config()
    c.data.eval_examples = 1000
    with pytest.raises(ConfigError, match=r"data\.eval_examples' must be in \[1, 240\]"):
        validate(c, ClipTask.default_config(), ClipTask.config_rules())


def test_base_config_is_valid_for_clip():
    validate(clip_config(""), ClipTask.default_config(), ClipTask.config_rules())
    assert set(base_config()) <= set(ClipTask.default_config())


def test_cli_misspelt_override_fails_before_compiling(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", f"--config={ROOT}/configs/clip.py:runlocal",
         f"--workdir={tmp_path}", "--config.optim.lrr=0.1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "lr" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
