"""The end of a run: `export.at_end` (the chosen checkpoint exported into <workdir>/export/<format>
by the export CLI's functions; not after a preemption; an unknown format refused before
training), the Hugging Face export of a chat model loaded by transformers with its tokenizer
and chat template (ids equal to our chat formatting, greedy generation equal to our model's),
the DPO `--hf_out` export of a run whose shape comes from `init_from`, and file modes (exported
safetensors 0644 like every other file, not safetensors' 0600)."""

import json
import os
import stat

import jax
import numpy as np
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain.data import chat
from jaxtrain.export import cli, export_bundle, export_params
from jaxtrain.export.at_end import export_checkpoint
from jaxtrain.file_modes import umask
from jaxtrain.lora import save_adapters
from jaxtrain.tasks.dpo import DPOTask
from jaxtrain.weights import read_run
from tests.test_lm_task import load_config

# a tiny LM on random tokens (no tokenizer): vocab 512, 2 layers of width 32
SYNTHETIC = dict(train__steps=2, optim__warmup_steps=1, eval__every=0, data__kind="synthetic",
                 model__vocab_size=512, data__train_examples=64, data__eval_examples=8)
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 10 - 2?"},
        {"role": "assistant", "content": "8"}]


def usual(path) -> bool:
    """The file has the mode open() gives: 0666 less the umask (0644 with umask 022)."""
    return stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask()


@pytest.fixture(autouse=True)
def report_on(monkeypatch):
    """The run report is drawn here even where the suite turns it off (JAXTRAIN_REPORT=0): the
    function-scoped tests' runs (the module-scoped fixture sets it itself)."""
    monkeypatch.setenv("JAXTRAIN_REPORT", "1")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 2-step chat SFT run (GPT-2 tokenizer, ChatML) exporting 'hf' at its end."""
    c = load_config("sft", "runlocal", train__steps=2, optim__warmup_steps=1, eval__every=0,
                    data__train_examples=32, data__eval_examples=8, checkpoint__every=0)
    with c.unlocked():
        del c.evals["generation"]  # the perplexity eval (the best metric) is enough here
    c.export.at_end = ("hf",)
    workdir = str(tmp_path_factory.mktemp("sft") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXTRAIN_REPORT", "1")  # drawn even where the suite turns it off
        result = Trainer(c, workdir, devices=jax.devices()[:1]).train()
    return workdir, result


@pytest.mark.slow
def test_hf_export_at_end_chats_in_transformers(sft_run):
    torch = pytest.importorskip("torch")
    import transformers

    workdir, result = sft_run
    out = os.path.join(workdir, "export", "hf")
    assert result.exports == {"hf": out}
    assert json.load(open(os.path.join(out, "export.json")))["step"] == 2
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # the chat template round trip: transformers' rendering = the training data's ids
    ids = tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    config, params = read_run(workdir)
    ours = load_config("sft", "runlocal")
    from jaxtrain.data.tokenizers import load_tokenizer

    gpt2 = load_tokenizer(ours.data.tokenizer)
    want, mask = chat.tokenize_chat(CHAT, gpt2, max_len=1000)
    assert list(ids) == want.tolist() and mask.sum() > 0
    # greedy generation from the rendered prompt: transformers' = our model's
    prompt = tok.apply_chat_template(CHAT[:-1], add_generation_prompt=True,
                                     tokenize=True)["input_ids"]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    got = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    from jaxtrain.export.inference import inference_task

    task = inference_task(config)
    apply = jax.jit(task.model.apply)
    seq = list(prompt)
    for _ in range(len(got)):
        logits, _ = apply({"params": params}, np.asarray([seq], np.int32))
        seq.append(int(np.argmax(logits[0, -1])))
    assert seq[len(prompt):] == got
    # every file of the export has the usual mode, the weights included
    assert sorted(f for f in os.listdir(out) if not usual(os.path.join(out, f))) == []
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(os.listdir(out))


@pytest.mark.slow
def test_run_report_at_end(sft_run):
    workdir, result = sft_run
    assert result.report_path == os.path.join(workdir, "report.png")
    with open(result.report_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_dpo_hf_out_takes_the_shape_of_init_from(sft_run, tmp_path):
    """README's DPO step 3: a DPO run started from an SFT run (init_from gives the model its
    shape; config.model keeps the DPO defaults, 256 wide) exports with --hf_out at the SFT
    model's shape, with the tokenizer and the chat template the pairs were rendered with."""
    sft, _ = sft_run
    c = DPOTask.default_config()
    c.task, c.init_from, c.model.vocab_size = "dpo", sft, 50304
    sft_config, params = read_run(sft)
    assert c.model.hidden_size != sft_config["model"]["hidden_size"]
    export_params(str(tmp_path / "dpo"), params, c.to_dict())
    cli(str(tmp_path / "dpo"), hf_out=str(tmp_path / "hf"))
    hf = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf["hidden_size"] == sft_config["model"]["hidden_size"] == 32
    assert hf["eos_token_id"] == 50256
    files = set(os.listdir(tmp_path / "hf"))
    assert {"tokenizer.json", "model.safetensors"} <= files
    assert "chat_template" in (tmp_path / "hf" / "tokenizer_config.json").read_text() or \
        "chat_template.jinja" in files
    # the bundle's hf format is the same folder
    export_bundle(str(tmp_path / "dpo"), str(tmp_path / "bundle"), "hf")
    assert json.load(open(tmp_path / "bundle" / "hf" / "config.json")) == hf


@pytest.mark.slow
def test_export_at_end_not_after_a_preemption(tmp_path):
    """A run stopped early by stop_at_step (as a preemption) writes its report but exports
    nothing; the re-run that finishes it exports the last checkpoint."""
    c = load_config("lm", **SYNTHETIC)
    c.export.at_end = ("safetensors, ",)  # as the command line's comma-separated value
    c.export.checkpoint = "last"
    workdir = str(tmp_path / "run")
    result = Trainer(c, workdir, devices=jax.devices()[:1]).train(stop_at_step=1)
    assert result.final_step == 1 and result.exports == {}
    assert os.path.isfile(result.report_path)
    assert not os.path.exists(os.path.join(workdir, "export"))
    result = Trainer(c, workdir, devices=jax.devices()[:1]).train()
    out = os.path.join(workdir, "export", "safetensors")
    assert result.exports == {"safetensors": out}
    manifest = json.load(open(os.path.join(out, "export.json")))
    assert manifest["step"] == 2 and manifest["formats"] == ["safetensors"]
    assert usual(os.path.join(out, "params.safetensors"))


@pytest.mark.parametrize("formats,match", [
    (("onnx",), "unknown export format 'onnx'.*safetensors, stablehlo, hf"),
    (("sentence-transformers", "tflite"), "unknown export format 'tflite'"),
])
def test_unknown_format_is_refused_before_training(tmp_path, formats, match):
    c = load_config("lm", **SYNTHETIC)
    c.export.at_end = formats
    with pytest.raises(ConfigError, match=match):
        Trainer(c, str(tmp_path / "run"), devices=jax.devices()[:1]).train()
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_hf_for_a_model_without_one_is_refused_before_training(tmp_path):
    from tests import toy_task

    c = toy_task.config()
    c.export.at_end = ("hf",)
    with pytest.raises(ConfigError, match="export.at_end' asks for 'hf'.*no Hugging Face "
                                          "format.*tasks with one: clip"):
        Trainer(c, str(tmp_path / "run"), task=toy_task.RegressionTask,
                devices=jax.devices()[:1]).train()
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_export_checkpoint_choice(tmp_path):
    steps = [tmp_path / "checkpoints" / str(s) for s in (10, 20, 30)]
    for s in steps:
        s.mkdir(parents=True)
    paths = [str(s) for s in steps]
    assert export_checkpoint(paths[0], paths, "best") == paths[0]
    assert export_checkpoint(paths[0], paths, "last") == paths[2]
    assert export_checkpoint(None, paths, "best") == paths[2]  # no best: the last
    assert export_checkpoint(str(tmp_path / "gone"), paths, "best") == paths[2]
    assert export_checkpoint(None, [], "best") is None


def test_lora_adapters_have_the_usual_mode(tmp_path):
    import ml_collections

    save_adapters(str(tmp_path), {"a": np.ones((2, 2), np.float32)},
                  ml_collections.ConfigDict({"rank": 2}))
    assert usual(tmp_path / "adapters.safetensors")
