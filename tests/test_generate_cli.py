"""`python -m jaxtrain.generate` (jaxtrain/generate/cli.py, load.py, text.py): completions of a
tiny SFT run printed and written; a Hugging Face directory decoded token for token as
transformers' greedy `generate`; a LoRA run decoded as its merged Hugging Face export; bad
input (no checkpoint, a CLIP run, a missing step, a prompt longer than the context, a bad
prompts file) is exit 2 with one message, before anything compiles."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxtrain import ConfigError, Trainer
from jaxtrain.data.tokenizers import load_tokenizer
from jaxtrain.export.cli import cli as export_cli
from jaxtrain.generate.cli import generate_completions, read_prompts_file
from jaxtrain.generate.load import pick_step
from jaxtrain.generate.text import TextFormat
from tests.test_lm_task import load_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 7 + 41?", 'Spell "milk" backwards.']


def sft_config(**overrides):
    kw = dict(train__steps=4, eval__every=0, checkpoint__every=2, checkpoint__async_save=False,
              data__seq_len=64, data__train_examples=64, data__eval_examples=24,
              optim__warmup_steps=0, optim__lr=1e-2)
    c = load_config("sft", **{**kw, **overrides})
    c.unlock()
    del c.evals["generation"]  # not what these tests are about
    c.lock()
    return c


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 4-step tiny SFT run (context: data.seq_len = 64), checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("gen_cli_sft"))
    Trainer(sft_config(), workdir, devices=jax.devices()[:1]).train()  # only its weights matter
    return workdir


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxtrain.generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_completions_of_a_run_are_printed_and_written(sft_run, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    rows_in = [{"prompt": "What is 2 + 3?"},
               {"messages": [{"role": "system", "content": "You are a concise assistant."},
                             {"role": "user", "content": "Name the capital of Peru."}]}]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows_in) + "\n")
    out = tmp_path / "out" / "completions.jsonl"
    proc = run_cli(f"--workdir={sft_run}", f"--prompt={PROMPTS[0]}",
                   f"--prompts_file={prompts_file}", "--max_new_tokens=8", f"--output={out}",
                   "--checkpoint=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPTS[0], rows_in[0]["prompt"],
                                           rows_in[1]["messages"]]
    # a chat run: string prompts are user turns of its chat template (ChatML on GPT-2)
    fmt = TextFormat(load_tokenizer("gpt2"), chat=True)
    for r, given in zip(rows, [PROMPTS[0], rows_in[0]["prompt"], rows_in[1]["messages"]],
                        strict=True):
        assert r["prompt_tokens"] == len(fmt.encode(given))
        assert 1 <= r["output_tokens"] == len(r["tokens"]) <= 8
        assert r["finish_reason"] in ("stop", "length")
        assert r["completion"] == fmt.completion_text(r["tokens"])[0]
    for i, r in enumerate(rows):
        assert f"--- completion {i} ({r['finish_reason']}, {r['output_tokens']} tokens) ---\n" \
               f"{r['completion']}\n" in proc.stdout
    assert "Name the capital of Peru." in proc.stdout


@pytest.mark.parametrize("case", ["no_checkpoint", "clip_run", "missing_step", "too_long",
                                  "bad_file"])
def test_bad_input_is_exit_2_with_one_message(case, sft_run, tmp_path):
    args, message = {
        "no_checkpoint": ([f"--workdir={tmp_path}", "--prompt=hi"], "has no checkpoint"),
        "clip_run": ([f"--workdir={tmp_path}", "--prompt=hi"], "not a language model"),
        "missing_step": ([f"--workdir={sft_run}", "--prompt=hi", "--checkpoint=999"],
                         "has no checkpoint of step 999; its steps are [2, 4]"),
        "too_long": ([f"--workdir={sft_run}", "--prompt=" + "word " * 80],
                     "--prompt 0: the prompt has "),
        "bad_file": ([f"--workdir={sft_run}", f"--prompts_file={tmp_path / 'p.jsonl'}"],
                     "p.jsonl line 2: not JSON"),
    }[case]
    if case == "clip_run":  # what the loader reads first: the checkpoint's metadata
        meta = tmp_path / "checkpoints" / "5" / "meta"
        (tmp_path / "checkpoints" / "5" / "state").mkdir(parents=True)
        meta.mkdir()
        (meta / "metadata").write_text(json.dumps(
            {"config": {"task": "clip", "model": {"name": "clip"}}}))
    if case == "bad_file":
        (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ConfigError" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Compiled" not in proc.stderr and proc.stdout == ""
    if case == "too_long":
        assert "the model's context is 64 tokens" in proc.stderr


def test_flag_errors_are_config_errors(sft_run, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of --workdir"):
        generate_completions(workdir=sft_run, hf=str(tmp_path), prompts=["x"])
    with pytest.raises(ConfigError, match="--top_p=0.0 must be in"):
        generate_completions(workdir=sft_run, prompts=["x"], top_p=0.0)
    # best: the step the run's checkpoint.best_metric chose (eval/val/loss, evaluated at the end)
    assert pick_step(sft_run, "best") == 4 and pick_step(sft_run, "latest") == 4
    assert pick_step(sft_run, "2") == 2
    meta = tmp_path / "run" / "checkpoints" / "3" / "meta"
    (meta.parent / "state").mkdir(parents=True)
    meta.mkdir()
    (meta / "metadata").write_text(json.dumps({"progress": {"best_step": None}, "config": {
        "task": "lm", "checkpoint": {"best_metric": ""}}}))
    with pytest.raises(ConfigError, match="records no best step .* a step of \\[3\\]"):
        pick_step(str(tmp_path / "run"), "best")
    with pytest.raises(ConfigError, match="must be 'best', 'latest' or a step number"):
        pick_step(sft_run, "newest")
    (tmp_path / "p.txt").write_text("first\n\n  \nsecond line\n")
    assert [(p.value, p.where) for p in read_prompts_file(str(tmp_path / "p.txt"))] == [
        ("first", f"{tmp_path / 'p.txt'} line 1"), ("second line", f"{tmp_path / 'p.txt'} line 4")]


def test_hf_dir_decodes_as_transformers_greedy(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    tok = copy.deepcopy(load_tokenizer("gpt2"))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    prompts = ["The quick brown fox jumps over the lazy dog and", "Hello", "1, 2, 3, 4,"]
    rows = generate_completions(hf=str(tmp_path / "hf"), prompts=prompts, max_new_tokens=32,
                                batch_size=3)  # one batch of ragged, left-padded prompts
    for prompt, row in zip(prompts, rows, strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=32,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        want = out[0, ids.shape[1]:].tolist()
        assert row["tokens"] == want[: row["output_tokens"]]
        assert row["output_tokens"] == len(want) == 32 or want[-1] == tok.eos_token_id
        assert row["prompt_tokens"] == ids.shape[1]


def test_a_lora_run_decodes_as_its_merged_export(tmp_path):
    c = sft_config(lora__rank=4, train__steps=3, checkpoint__every=0)
    workdir = str(tmp_path / "lora")
    Trainer(c, workdir, devices=jax.devices()[:1]).train()
    export_cli(workdir, hf_out=str(tmp_path / "hf"))
    assert os.path.isfile(tmp_path / "hf" / "config.json")
    from_run = generate_completions(workdir=workdir, prompts=PROMPTS, max_new_tokens=12)
    from_export = generate_completions(hf=str(tmp_path / "hf"), tokenizer="gpt2", chat=True,
                                       prompts=PROMPTS, max_new_tokens=12)
    assert [r["tokens"] for r in from_run] == [r["tokens"] for r in from_export]
    assert [r["completion"] for r in from_run] == [r["completion"] for r in from_export]
