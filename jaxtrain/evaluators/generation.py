"""``generation``: decode held-out prompts and score the completions against references.

The task gives (prompt, reference) pairs (``heldout_prompts``: chat, the conversation before
its last assistant turn rendered with the chat template SFT used, and that turn; DPO, the
prompt and the chosen answer; plain text, a document window's first tokens and its
continuation: :mod:`jaxtrain.generate.heldout`). They are decoded with the KV-cache
:class:`jaxtrain.generate.decode.Generator` on the run's mesh (greedy by default; ``temperature``
/ ``top_k`` / ``top_p`` / ``seed`` sample), at most ``max_new_tokens`` per prompt and never past
the model's trained length, stopping at eos or the end of the assistant's turn
(:class:`jaxtrain.generate.text.TextFormat`). The compiled decoder is reused by every
evaluation of a run.

Metrics (:mod:`jaxtrain.metrics.text`): ``bleu`` (sacrebleu corpus BLEU, 0-100), ``rouge1``,
``rouge2``, ``rougeL`` (rouge-score F-measure, mean, 0-1), ``exact_match`` (whitespace
normalised), ``mean_output_tokens`` (tokens generated per prompt, the stop token or the one
ending the turn marker included), ``examples``. Any can be ``checkpoint.best_metric`` /
``eval.early_stop_metric`` (``eval/<name>/bleu``, ...).

Samples (process 0): every row in ``<workdir>/samples/<name>/step_<N>.jsonl`` (``index``,
``prompt``, ``reference``, ``completion``, ``output_tokens``, ``finish_reason``), and the first
``num_samples`` as tensorboard text (``eval/<name>/samples``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxtrain.errors import ConfigError
from jaxtrain.evaluator import EvalContext, LoopEvaluator
from jaxtrain.generate.decode import Generator, SamplingConfig
from jaxtrain.generate.heldout import HeldoutPrompt
from jaxtrain.generate.text import TextFormat
from jaxtrain.metrics.text import text_metrics


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """Sample rows as markdown for tensorboard (texts in indented code blocks, verbatim)."""
    def block(text: str) -> str:
        return "\n".join("    " + line for line in (text or "(empty)").splitlines() or [""])

    parts = []
    for row in rows:
        parts.append(f"**Sample {row['index']}** ({row['finish_reason']}, "
                     f"{row['output_tokens']} tokens)\n\nPrompt:\n\n{block(row['prompt'])}\n\n"
                     f"Reference:\n\n{block(row['reference'])}\n\nCompletion:\n\n"
                     f"{block(row['completion'])}\n")
    return "\n".join(parts)


class GenerationEvaluator(LoopEvaluator):
    type = "generation"
    requires = ("heldout_prompts", "tokenizer", "model_config")

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(dict(
            source="",  # '' = the task's held-out split; else a dataset read whole
            max_examples=100,  # decode at most this many prompts (0 = all)
            max_new_tokens=32,
            temperature=0.0,  # 0 = greedy
            top_k=0,  # 0 = off
            top_p=1.0,  # 1 = off
            seed=0,
            num_samples=4,  # samples shown in tensorboard (the jsonl has every row)
        ))

    @classmethod
    def config_rules(cls, prefix: str):
        return [(prefix + "max_examples", lambda v: v >= 0, "must be >= 0 (0 = all)"),
                (prefix + "max_new_tokens", lambda v: v >= 1, "must be >= 1"),
                (prefix + "temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
                (prefix + "top_k", lambda v: v >= 0, "must be >= 0 (0 = off)"),
                (prefix + "top_p", lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"),
                (prefix + "num_samples", lambda v: v >= 0, "must be >= 0")]

    def __init__(self, name: str, config: ml_collections.ConfigDict, task: Any):
        super().__init__(name, config, task)
        self.prompts: list[HeldoutPrompt] | None = None
        self._generator: Generator | None = None

    @property
    def context(self) -> int:
        """The model's trained sequence length (the task's inference length: ``data.seq_len``,
        DPO ``data.max_length``)."""
        return int(self.task.inference_inputs(1)["tokens"].shape[1])

    def prepare(self, *, batch_size: int, process_index: int, process_count: int) -> None:
        """Read the held-out prompts and references (an error when there are none)."""
        c = self.config
        self.prompts = list(self.task.heldout_prompts(
            source=c.source, max_examples=c.max_examples, continuation_tokens=c.max_new_tokens))
        if not self.prompts:
            raise ConfigError(
                f"Evaluator {self.name!r} (generation) has no prompts: its data (evals."
                f"{self.name}.source, or the task's held-out split) gave no (prompt, reference) "
                f"pair whose prompt fits the model's {self.context} tokens. Give it data, or "
                f"delete evals.{self.name}.")
        self.format = TextFormat(self.task.tokenizer)
        logging.info("Evaluator %r: %d prompts, at most %d new tokens each.", self.name,
                     len(self.prompts), c.max_new_tokens)

    @property
    def generator_in_use(self) -> Generator | None:
        """The Generator whose compiled programs serve every evaluation (None before the
        first)."""
        return self._generator

    def generator(self, params: Any, mesh: Any) -> Generator:
        """The Generator, with `params`: built at the first evaluation, its weights replaced
        at later ones (its compiled programs serve them all)."""
        if self._generator is None:
            self._generator = Generator(self.task.model_config, params, mesh=mesh,
                                        pad_id=self.format.pad_id, max_context=self.context)
        else:
            self._generator.set_params(params)
        return self._generator

    def run(self, params: Any, frozen: Any, context: EvalContext) -> dict[str, float]:
        if self.prompts is None:
            self.prepare(batch_size=context.batch_size, process_index=jax.process_index(),
                         process_count=jax.process_count())
        c, fmt = self.config, self.format
        generator = self.generator(params, context.mesh)
        batch = max(1, min(context.batch_size, len(self.prompts)))
        rows: list[dict[str, Any]] = []
        for start in range(0, len(self.prompts), batch):
            chunk = self.prompts[start:start + batch]
            ids = [p.prompt_ids for p in chunk]
            ids += [ids[0]] * (batch - len(ids))  # every chunk one shape: one program
            chat = any(p.chat for p in chunk)
            sampling = SamplingConfig(
                max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                top_p=c.top_p, seed=c.seed + start, eos_ids=fmt.eos_ids,
                stop_ids=fmt.turn_end_ids if chat else ())
            completions = generator.generate(ids, sampling)
            for i, (p, out) in enumerate(zip(chunk, completions, strict=False)):
                text, count, stopped = fmt.completion_text(out.tokens, chat=p.chat)
                rows.append({"index": start + i, "prompt": p.prompt, "reference": p.reference,
                             "completion": text, "output_tokens": count,
                             "finish_reason": "stop" if stopped else out.finish_reason})
        metrics = text_metrics([r["completion"] for r in rows], [r["reference"] for r in rows])
        metrics["mean_output_tokens"] = float(np.mean([r["output_tokens"] for r in rows]))
        metrics["examples"] = float(len(rows))
        if jax.process_index() == 0:
            self.write_samples(rows, context)
        return metrics

    def write_samples(self, rows: list[dict[str, Any]], context: EvalContext) -> None:
        """Every row to ``samples/<name>/step_<N>.jsonl``; the first ``num_samples`` to
        tensorboard text."""
        if context.workdir:
            directory = os.path.join(context.workdir, "samples", self.name)
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"step_{context.step}.jsonl")
            with open(path + ".tmp", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            os.replace(path + ".tmp", path)
        shown = rows[: self.config.num_samples]
        if shown and context.writer is not None:
            context.writer.write_text(context.step, f"eval/{self.name}/samples",
                                      samples_markdown(shown))
        if shown:
            logging.info("eval/%s sample: %r -> %r (reference %r)", self.name,
                         shown[0]["prompt"][-80:], shown[0]["completion"],
                         shown[0]["reference"])
