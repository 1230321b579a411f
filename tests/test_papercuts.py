"""What a new user hit following the README: the default workdir of a config variant, the LR
finder's "To train with it" command, `:steps=N` with the configs' warmups, and --show_config."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtrain.cli import default_workdir
from jaxtrain.config import set_steps, validate
from jaxtrain.lr_find import train_command
from jaxtrain.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
# A value for each variant that takes one (paths: only validated here, never read).
VALUES = {"N": "2", "M": "t2t", "C": "16", "K": "1", "PATH": "/nowhere/model", "DIR": "/nowhere"}


def config_module(name):
    spec = importlib.util.spec_from_file_location(f"papercuts_{name}", ROOT / "configs" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arg, workdir", [
    ("configs/clip.py", "runs/clip"),
    ("configs/clip.py:runlocal", "runs/clip-runlocal"),  # not the default run's workdir
    ("configs/clip.py:runlocal,steps=5", "runs/clip-runlocal"),  # steps=N: the same run
    ("configs/clip.py:siglip,mode=t2t", "runs/clip-mode_t2t-siglip"),
    ("configs/clip.py:mode=t2t,siglip", "runs/clip-mode_t2t-siglip"),  # order-free
    ("/abs/configs/clip.py:hf=/ckpt/clip-vit-base-patch32/", "runs/clip-hf_clip-vit-base-patch32"),
    ("configs/dpo.py:init=openai/gpt x", "runs/dpo-init_gpt_x"),
    ("configs/distill.py", "runs/distill"),
    ("configs/distill.py:clip", "runs/distill-clip"),  # LM and CLIP students apart
    ("configs/lm.py:size=350m", "runs/lm-size_350m"),
])
def test_default_workdir_names_the_variant(arg, workdir):
    assert default_workdir(arg) == workdir


def test_teacher_and_reference_defaults_are_the_workdirs_their_configs_train_in():
    distill, dpo = config_module("distill"), config_module("dpo")
    for arg, teacher_config in [(None, "configs/lm.py"), ("runlocal", "configs/lm.py:runlocal"),
                                ("clip", "configs/clip.py"),
                                ("clip,runlocal", "configs/clip.py:runlocal")]:
        assert distill.get_config(arg).distill.teacher == default_workdir(teacher_config)
    assert dpo.get_config(None).init_from == default_workdir("configs/sft.py")
    assert dpo.get_config("runlocal").init_from == default_workdir("configs/sft.py:runlocal")


def test_lr_find_command_trains_in_the_finders_workdir():
    arg = "configs/clip.py:runlocal"
    command = train_command(arg, {"optim.lr": 1.0, "train.batch_size": 32},
                            default_workdir(arg), 0.00123)
    assert command[:3] == ["python", "-m", "jaxtrain.main"]
    assert f"--config={arg}" in command  # the variant is kept
    assert "--workdir=runs/clip-runlocal" in command  # where lr_find/ was written
    assert "--config.train.batch_size=32" in command
    lr = [c for c in command if c.startswith("--config.optim.lr")]
    assert lr == ["--config.optim.lr=0.00123"]  # the suggestion replaces the swept lr


def variant_args(name):
    """Every variant of a config file alone and with runlocal, each with a value."""
    out = [""]
    for v in config_module(name).VARIANTS:
        key, eq, value = v.partition("=")
        if key == "steps":
            continue
        values = value.split("|") if "|" in value else [VALUES.get(value, value)]
        out += [f"{key}={x}" if eq else key for x in values]
    return out + [f"runlocal,{a}" for a in out if a and a != "runlocal"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_variant_validates_with_few_steps(name):
    """`configs/lm.py:steps=30` used to fail: warmup_steps (30) must be smaller than
    train.steps (30). The warmup now scales with steps=N."""
    module = config_module(name)
    for arg in variant_args(name):
        full = module.get_config(arg or None)
        for steps in (1, 2, 20, 30):
            c = module.get_config(",".join(filter(None, [arg, f"steps={steps}"])))
            assert c.train.steps == steps
            assert c.optim.warmup_steps < steps
            # the same share of the run as the full variant's warmup
            share = round(full.optim.warmup_steps * steps / full.train.steps)
            assert c.optim.warmup_steps == min(share, steps - 1)
            task = get_task(c.task)
            validate(c, task.schema(c), task.config_rules())


def test_steps_keep_the_default_schedules():
    lm = config_module("lm")
    assert lm.get_config(None).optim.warmup_steps == 30  # unchanged without steps=N
    assert lm.get_config("steps=300").optim.warmup_steps == 30
    assert lm.get_config("steps=30").optim.warmup_steps == 3
    assert lm.get_config("steps=3000").optim.warmup_steps == 300
    c = lm.get_config("curriculum,steps=40")  # the curriculum's stages follow steps=N
    assert c.data.curriculum == "32:10,64:20"


def test_set_steps_rejects_nonpositive():
    c = config_module("lm").get_config(None)
    c.unlock()
    with pytest.raises(ValueError, match="steps=0 must be > 0"):
        set_steps(c, 0)


def test_show_config_prints_variants_and_keys_and_exits(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", f"--config={ROOT}/configs/lm.py:runlocal",
         "--config.optim.lr=0.25", "--show_config"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "Default --workdir: runs/lm-runlocal" in out
    assert "size=tiny|small|350m|1b|7b|70b" in out and "curriculum" in out  # the variants
    assert "  optim.lr = 0.25\n" in out  # the override
    assert "  train.steps = 20\n" in out and "  model.hidden_size = 32\n" in out  # runlocal
    assert "  data.tokenizer = 'gpt2'\n" in out
    assert list(tmp_path.iterdir()) == []  # nothing built, no workdir
    help_text = subprocess.run([sys.executable, "-m", "jaxtrain.main", "--help"],
                               capture_output=True, text=True, timeout=300, cwd=ROOT).stdout
    assert "--show_config" in help_text and "--[no]show_config" in help_text
