"""The `generation` evaluator (jaxtrain/evaluators/generation.py) and what it is built from:
BLEU / ROUGE / exact match against sacrebleu and rouge-score called directly, the held-out
(prompt, reference) pairs of chat, text and preference data, completion text cut at the end of
the assistant's turn, and the evaluator end to end on a tiny SFT run (metrics, samples on disk,
the best checkpoint chosen by a generation metric)."""

import json
import math
import os
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from jaxtrain import ConfigError, Trainer
from jaxtrain.api import build_task
from jaxtrain.data import chat, preference, text
from jaxtrain.data.tokenizers import load_tokenizer
from jaxtrain.evaluator import EvalContext
from jaxtrain.evaluators import build_evaluators, eval_config
from jaxtrain.generate import heldout
from jaxtrain.generate.text import TextFormat, end_of_turn
from jaxtrain.mesh import make_mesh
from jaxtrain.metrics.text import bleu, exact_match, rouge, text_metrics
from tests.test_lm_task import load_config

COMPLETIONS = ["The capital of France is Paris.", "7 + 5 = 12.", "the cat sat on a mat",
               '"dog" in capital letters is "DOG".']
REFERENCES = ["The capital of France is Paris.", "7 + 5 = 13.", "the cat sat on the mat",
              '"dog" in capital letters is "DOG".  ']
METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match", "mean_output_tokens",
           "examples")


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


# ------------------------------------------------------------------------------ metrics


def test_bleu_and_rouge_equal_the_libraries():
    want_bleu = sacrebleu.corpus_bleu(COMPLETIONS, [REFERENCES]).score
    assert bleu(COMPLETIONS, REFERENCES) == pytest.approx(want_bleu, abs=1e-9)
    assert 0 < want_bleu < 100
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(r, c) for c, r in zip(COMPLETIONS, REFERENCES, strict=True)]
    got = rouge(COMPLETIONS, REFERENCES)
    for t in ("rouge1", "rouge2", "rougeL"):
        assert got[t] == pytest.approx(np.mean([s[t].fmeasure for s in scores]), abs=1e-12)
    # by hand: the third pair shares 5 of 6 unigrams (P = R = 5/6)
    assert scores[2]["rouge1"].fmeasure == pytest.approx(5 / 6)


def test_exact_match_by_hand():
    # 1st equal; 2nd and 3rd differ; 4th equal once the trailing whitespace goes
    assert exact_match(COMPLETIONS, REFERENCES) == 0.5
    assert exact_match(["a  b\n"], ["a b"]) == 1.0
    assert exact_match(["a b."], ["a b"]) == 0.0
    assert text_metrics(["x"], ["x"])["bleu"] == pytest.approx(0.0)  # a 1-token corpus: no 4-grams
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        bleu(["a", "b"], ["a"])


# ------------------------------------------------------------------------------ text in and out


def test_completion_text_cuts_the_chatml_turn_end(gpt2):
    fmt = TextFormat(gpt2, chat=True)
    assert end_of_turn(gpt2) == "<|im_end|>"
    assert fmt.turn_end_ids == ()  # ChatML as plain GPT-2 text: several tokens, no stop id
    assert fmt.stop_ids(True) == (gpt2.eos_token_id,)
    answer = gpt2("Paris.<|im_end|>\n<|im_start|>user\nMore", add_special_tokens=False)
    ids = answer["input_ids"]
    assert gpt2.decode(ids[1]) == ".<"  # the marker's first character merged with the answer's
    text, count, stopped = fmt.completion_text(ids)
    assert (text, stopped) == ("Paris.", True)
    assert count == len(gpt2("Paris.<|im_end|>", add_special_tokens=False)["input_ids"])
    # eos stops: not part of the text, counted
    text, count, stopped = fmt.completion_text([*ids[:1], gpt2.eos_token_id, *ids[1:]])
    assert (text, count, stopped) == ("Paris", 2, True)
    # neither: all of it
    plain = TextFormat(gpt2)
    text, count, stopped = plain.completion_text(ids, chat=False)
    assert (text, count, stopped) == ("Paris.<|im_end|>\n<|im_start|>user\nMore", len(ids), False)


def test_chat_prompts_are_rendered_as_sft_renders_them(gpt2):
    examples = chat.builtin_chat_examples(30, seed=1)
    got = heldout.chat_prompts(examples, gpt2, max_prompt_tokens=1000, max_examples=25)
    assert len(got) == 25
    for p, e in zip(got, examples, strict=False):
        messages = e["messages"]
        assert p.prompt == chat.chat_prompt(messages[:-1], gpt2)
        assert p.prompt.endswith("<|im_start|>assistant\n")
        assert p.reference == messages[-1]["content"]
        assert list(p.prompt_ids) == gpt2(p.prompt, add_special_tokens=False)["input_ids"]
        # SFT's rows hold the same tokens: the prompt, then the answer
        full, _ = chat.render_chat(messages, gpt2)
        assert full.startswith(p.prompt)
    # prompts longer than the limit are left out, in order
    every = heldout.chat_prompts(examples, gpt2, max_prompt_tokens=1000)
    assert len(every) == 30 and every[:25] == got
    short = heldout.chat_prompts(examples, gpt2, max_prompt_tokens=40)
    assert short == [p for p in every if len(p.prompt_ids) <= 40]
    assert 0 < len(short) < 30


def test_text_and_preference_prompts(gpt2):
    doc = " ".join(f"word{i}" for i in range(200))
    ids = gpt2(doc, add_special_tokens=False)["input_ids"]
    got = heldout.text_prompts([doc, "too short"], gpt2, prompt_tokens=8, continuation_tokens=4)
    assert len(got) == len(ids) // 12
    assert list(got[1].prompt_ids) == ids[12:20]
    assert got[1].reference == gpt2.decode(ids[20:24])
    assert not got[0].chat
    assert len(heldout.text_prompts([doc], gpt2, prompt_tokens=8, continuation_tokens=4,
                                    max_examples=3)) == 3
    pairs = preference.builtin_preference_examples(5, seed=1)
    got = heldout.preference_prompts(pairs, gpt2, max_prompt_tokens=10)
    for p, pair in zip(got, pairs, strict=True):
        assert p.reference == pair["chosen"][0]["content"]
        full = gpt2(chat.chat_prompt(pair["prompt"], gpt2), add_special_tokens=False)
        assert list(p.prompt_ids) == full["input_ids"][-10:]  # the end kept, as DPO does


# ------------------------------------------------------------------------------ end to end


def sft_config(**overrides):
    kw = dict(train__steps=4, eval__every=2, checkpoint__every=2, checkpoint__async_save=False,
              checkpoint__best_metric="eval/generation/rougeL", checkpoint__best_mode="max",
              data__train_examples=64, data__eval_examples=24)
    c = load_config("sft", **{**kw, **overrides})
    c.evals.generation.max_examples = 12
    c.evals.generation.max_new_tokens = 16
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny SFT run evaluated at steps 2 and 4, its best checkpoint by ROUGE-L."""
    workdir = str(tmp_path_factory.mktemp("gen_sft"))
    # on 1 device (about half the CPU time of 8); the evaluator on 8: test_dpo_prompts_...
    trainer = Trainer(sft_config(), workdir, devices=jax.devices()[:1])
    result = trainer.train()
    evals = {int(m["step"]): m for m in result.metrics if "eval/generation/bleu" in m}
    return types.SimpleNamespace(workdir=workdir, result=result, trainer=trainer, evals=evals)


def test_the_evaluator_reports_finite_metrics_every_evaluation(run):
    assert sorted(run.evals) == [2, 4]
    for step, m in run.evals.items():
        for name in METRICS:
            assert math.isfinite(m[f"eval/generation/{name}"]), (step, name)
        assert m["eval/generation/examples"] == 12
        assert 1 <= m["eval/generation/mean_output_tokens"] <= 16
        assert 0 <= m["eval/generation/bleu"] <= 100
        assert 0 <= m["eval/generation/rougeL"] <= 1
    # one compiled decoder served both evaluations (12 prompts: one batch of eval.batch_size)
    gen = run.trainer.evaluators["generation"].generator_in_use
    assert len(gen.compiled_keys) == 1 and gen.compiled_keys[0][0] == 16


def test_samples_are_written_with_every_row(run):
    ev = run.trainer.evaluators["generation"]
    for step in (2, 4):
        path = os.path.join(run.workdir, "samples", "generation", f"step_{step}.jsonl")
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        assert [r["index"] for r in rows] == list(range(12))
        for r, p in zip(rows, ev.prompts, strict=True):
            assert r["prompt"] == p.prompt and r["reference"] == p.reference
            assert p.prompt.endswith("<|im_start|>assistant\n")
            assert isinstance(r["completion"], str) and "<|im_end|>" not in r["completion"]
            assert r["finish_reason"] in ("stop", "length")
            assert 1 <= r["output_tokens"] <= 16
        mean = np.mean([r["output_tokens"] for r in rows])
        assert mean == pytest.approx(run.evals[step]["eval/generation/mean_output_tokens"])
        got = text_metrics([r["completion"] for r in rows], [r["reference"] for r in rows])
        for name, value in got.items():
            assert run.evals[step][f"eval/generation/{name}"] == pytest.approx(value)


def test_a_generation_metric_picks_the_best_checkpoint(run):
    scores = {s: m["eval/generation/rougeL"] for s, m in run.evals.items()}
    best = max(scores, key=lambda s: (scores[s], -s))  # of equal values the first is kept
    assert run.result.best_step == best
    assert run.result.best_metric == pytest.approx(scores[best])


def test_bad_generation_configs_are_named():
    c = sft_config()
    c.evals.generation.top_p = 0.0
    _, task = build_task(c)
    with pytest.raises(ConfigError, match=r"evals\.generation\.top_p"):
        build_evaluators(c, task)
    c = load_config("lm", data__kind="synthetic")
    c.unlock()
    c.evals.gen = eval_config("generation")
    _, task = build_task(c)
    ev = build_evaluators(c, task)["gen"]
    with pytest.raises(ConfigError, match="synthetic"):
        ev.prepare(batch_size=8, process_index=0, process_count=1)


def test_dpo_prompts_decode_with_the_policy(tmp_path):
    """The DPO task's held-out prompts and chosen answers, decoded by the evaluator with the
    policy's params (a random tiny policy: the metrics exist, the samples are written)."""
    c = load_config("dpo", init_from="", model__hidden_size=32, model__num_layers=2,
                    model__num_heads=2, model__num_kv_heads=1, model__intermediate_size=64,
                    model__vocab_size=50304)
    c.unlock()
    c.evals.gen = eval_config("generation", max_examples=6, max_new_tokens=8)
    _, task = build_task(c)
    pairs = preference.load_preference_examples("builtin", split="validation", n=6, seed=c.seed)
    ev = build_evaluators(c, task)["gen"]
    ev.prepare(batch_size=8, process_index=0, process_count=1)
    assert [p.reference for p in ev.prompts] == [p["chosen"][0]["content"] for p in pairs]
    assert all(len(p.prompt_ids) <= c.data.max_prompt_length for p in ev.prompts)
    params = jax.tree.map(np.asarray, nn.unbox(task.init_params(jax.random.key(0))))
    metrics = ev.run(params, {}, EvalContext(mesh=make_mesh({"data": -1}), step=3,
                                             workdir=str(tmp_path), writer=None, batch_size=8))
    assert set(METRICS) <= set(metrics) and metrics["examples"] == 6
    with open(tmp_path / "samples" / "gen" / "step_3.jsonl") as f:
        assert len(f.readlines()) == 6


def test_text_prompts_are_windows_of_the_heldout_documents():
    c = load_config("lm")
    _, task = build_task(c)
    got = task.heldout_prompts(max_examples=5, continuation_tokens=16)
    assert len(got) == 5
    half = c.data.seq_len // 2
    for p in got:
        assert len(p.prompt_ids) == half and not p.chat
        assert len(task.tokenizer(p.reference, add_special_tokens=False)["input_ids"]) <= 17
    docs = text.load_documents("shakespeare", split="validation")
    first = task.tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert list(got[0].prompt_ids) == first[:half]
    assert got[0].reference == task.tokenizer.decode(first[half:half + 16])
